"""Feature cache: keys, atomic shards, damaged shards, incremental extraction."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from transferkit.cache import FeatureCache, FeatureSpec, extract_features, hash_file
from transferkit.models.registry import get_backbone
from transferkit.models.weights import load_backbone, resolve_weights

SPEC = FeatureSpec("tiny_test", "w1", 32, "tf")


def test_every_setting_changes_the_key():
    keys = {SPEC.key()}
    for field, value in [("backbone", "other"), ("weights_id", "w2"), ("image_size", 64), ("preprocessing", "caffe"),
                         ("pooling", "max"), ("layer", "block3"), ("resize", "crop"), ("dtype", "float16"),
                         ("version", 99)]:
        keys.add(dataclasses.replace(SPEC, **{field: value}).key())
    assert len(keys) == 10


def test_put_then_read_back_from_a_new_instance(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    FeatureCache(tmp_path, SPEC).put(["a", "b", "c"], vectors)
    again = FeatureCache(tmp_path, SPEC)
    got = again.get(["c", "x", "a"])
    np.testing.assert_array_equal(got[0], vectors[2])
    assert got[1] is None
    np.testing.assert_array_equal(got[2], vectors[0])
    assert not list(again.dir.glob(".tmp-*")), "temporary files must be renamed into place"


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_shard_is_set_aside_not_trusted(tmp_path, caplog):
    cache = FeatureCache(tmp_path, SPEC)
    cache.put(["a"], np.ones((1, 4)))
    shard = next(cache.dir.glob("shard-*.h5"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    fresh = FeatureCache(tmp_path, SPEC)
    with caplog.at_level("WARNING", logger="transferkit"):
        assert fresh.get(["a"]) == [None]
    assert "Damaged cache shard" in caplog.text
    assert fresh.bad_shards == [shard]
    assert not shard.exists() and shard.with_suffix(".bad").exists(), "set aside, so reported once"
    caplog.clear()
    assert FeatureCache(tmp_path, SPEC).get(["a"]) == [None]
    assert "Damaged" not in caplog.text


def test_a_flipped_byte_is_caught_by_verify_and_never_read_as_numbers(tmp_path):
    cache = FeatureCache(tmp_path, SPEC)
    vectors = np.arange(40, dtype="float32").reshape(10, 4)
    keys = [f"k{i}" for i in range(10)]
    cache.put(keys, vectors)
    shard = next(cache.dir.glob("shard-*.h5"))
    assert cache.verify() == []
    # Flip a byte inside the vectors' data (found by value, so the test hits the numbers).
    data = bytearray(shard.read_bytes())
    offset = bytes(data).find(vectors[5].tobytes())
    assert offset > 0
    data[offset + 1] ^= 0xFF
    shard.write_bytes(bytes(data))
    damaged = FeatureCache(tmp_path, SPEC).verify()
    assert [s for s, _ in damaged] == [shard] and "checksum" in damaged[0][1]
    got = FeatureCache(tmp_path, SPEC).get(keys)
    assert all(v is None for v in got), "Fletcher-32 refuses the damaged chunk: recomputed, not trusted"


def test_float16_storage_halves_the_size(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(512, 256)).astype("float32")
    keys = [f"{i:064x}" for i in range(512)]
    sizes = {}
    for dtype in ("float32", "float16"):
        cache = FeatureCache(tmp_path / dtype, dataclasses.replace(SPEC, dtype=dtype))
        cache.put(keys, vectors)
        sizes[dtype] = sum(p.stat().st_size for p in cache.dir.glob("shard-*.h5"))
        got = FeatureCache(tmp_path / dtype, dataclasses.replace(SPEC, dtype=dtype)).get(keys[:3])
        assert got[0].dtype == np.float32
        np.testing.assert_allclose(np.stack(got), vectors[:3], atol=1e-2 if dtype == "float16" else 0)
    assert sizes["float16"] < 0.6 * sizes["float32"]


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    from transferkit.cache import keys as keys_module

    files = []
    for i in range(5):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * 100)
        files.append(tmp_path / f"{i}.bin")
    first = keys_module.FileHashes(tmp_path / "c").hashes(files)
    calls = []
    monkeypatch.setattr(keys_module, "hash_file", lambda p: calls.append(p) or "x")
    assert keys_module.FileHashes(tmp_path / "c").hashes(files) == first and calls == []
    files[2].write_bytes(b"edited, and longer than before")
    keys_module.FileHashes(tmp_path / "c").hashes(files)
    assert [str(p) for p in calls] == [str(files[2].resolve())]


def test_two_writers_at_once(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from transferkit.cache import FeatureCache, FeatureSpec\n"
        "cache = FeatureCache(sys.argv[1], FeatureSpec('tiny_test', 'w1', 32, 'tf'))\n"
        "for b in range(20):\n"
        "    keys = [f'{sys.argv[2]}-{b}-{i}' for i in range(10)]\n"
        "    cache.put(keys, np.full((10, 4), b, dtype='float32'))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = FeatureCache(tmp_path, SPEC)
    assert len(cache) == 400 and cache.verify() == []
    assert float(cache.get(["b-7-3"])[0][0]) == 7.0


@pytest.fixture
def tiny_model():
    spec = get_backbone("tiny_test")
    import keras

    keras.utils.set_random_seed(0)
    return load_backbone(spec, resolve_weights(spec, "none"), 32)


def test_extraction_is_incremental_and_content_addressed(tmp_path, image_folder, tiny_model):
    from PIL import Image

    paths = sorted(p for p in image_folder.rglob("*") if p.is_file())
    cache = FeatureCache(tmp_path / "c", SPEC)
    first = extract_features(tiny_model, paths, cache, batch_size=8, flush_every=10, verbose=0)
    assert first.num_computed == len(paths) and first.num_cached == 0 and first.ok.all()
    assert len(list(cache.dir.glob("shard-*.h5"))) >= 2, "vectors are flushed while extracting"

    # Re-run: nothing computed. Renamed file: still a hit. Edited pixels: a miss.
    moved = paths[0].with_name("renamed" + paths[0].suffix)
    shutil.move(paths[0], moved)
    edited = paths[1]
    image = Image.open(edited).convert("RGB")
    image.putpixel((0, 0), (255, 0, 255))
    image.save(edited)
    paths = [moved] + paths[1:]
    again = extract_features(tiny_model, paths, FeatureCache(tmp_path / "c", SPEC), batch_size=8, verbose=0)
    assert again.num_computed == 1 and again.num_cached == len(paths) - 1
    np.testing.assert_allclose(again.vectors[2:], first.vectors[2:], rtol=1e-5, atol=1e-6)


def test_broken_image_is_reported_not_fatal(tmp_path, image_folder, tiny_model):
    paths = sorted(p for p in image_folder.rglob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(paths[0].read_bytes()[:40])
    result = extract_features(tiny_model, paths + [broken], None, verbose=0)
    assert result.ok.tolist() == [True, True, True, False]
    assert "cannot decode" in result.errors[3]


def test_hash_file_is_content_only(tmp_path):
    (tmp_path / "a").write_bytes(b"xyz")
    (tmp_path / "b").write_bytes(b"xyz")
    assert hash_file(tmp_path / "a") == hash_file(tmp_path / "b")


def test_cache_files_are_readable_by_others(tmp_path):
    import os
    import stat

    cache = FeatureCache(tmp_path, SPEC)
    cache.put(["a"], np.ones((1, 4)))
    old = os.umask(0o022)
    os.umask(old)
    for path in cache.dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old, path


# SIGKILL at several moments, Ctrl-C, a full disk: tests/test_robustness_faults.py.


def test_fill_only_extraction_keeps_no_vectors_and_fills_the_cache(tmp_path, image_folder, tiny_model):
    paths = sorted(p for p in image_folder.rglob("*") if p.is_file())
    result = extract_features(tiny_model, paths, FeatureCache(tmp_path, SPEC), keep_vectors=False, verbose=0)
    assert result.vectors is None and result.num_computed == len(paths)
    again = extract_features(tiny_model, paths, FeatureCache(tmp_path, SPEC), keep_vectors=False, verbose=0)
    assert again.num_computed == 0 and again.num_cached == len(paths)
    full = extract_features(tiny_model, paths, FeatureCache(tmp_path, SPEC), verbose=0)
    assert full.num_computed == 0 and full.vectors.shape == (len(paths), 32) and full.vectors.any()
