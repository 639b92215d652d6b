"""The cache never serves a wrong vector: hash and decode the same bytes, a hash memo that notices
every edit, and ``cache verify --deep`` that recomputes vectors (issue 14)."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from transferkit.cache import FeatureCache, FeatureSpec, FileHashes, extract_features, hash_file
from transferkit.cache.store import read_keys, read_rows, spec_shards, write_shard
from transferkit.cli import main
from transferkit.data.images import load_image
from transferkit.models.registry import get_backbone
from transferkit.models.weights import load_backbone, resolve_weights
from transferkit.testing import make_image_folder

SPEC = FeatureSpec("tiny_test", "w1", 32, "tf")


@pytest.fixture
def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    spec = get_backbone("tiny_test")
    return load_backbone(spec, resolve_weights(spec, "none"), 32)


@pytest.fixture
def two_images(tmp_path):
    folder = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=1, image_size=32)
    first, second = sorted(p for p in folder.rglob("*.png"))
    return first, second


def _vector(model, pixels: np.ndarray) -> np.ndarray:
    return model(pixels[None].astype("float32"), training=False).numpy()[0]


def _replace_on_second_open(monkeypatch, target: Path, new_bytes: bytes) -> list[str]:
    """Another program replaces ``target`` (atomically, by a rename) just before transferkit opens it
    a second time, the window between hashing a file and decoding it if they are separate reads."""
    real = os.path.realpath(target)
    opens: list[str] = []

    def seen(file) -> None:
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) == real:
            opens.append(real)
            if len(opens) == 2:
                swap = target.with_name(".swap")
                swap.write_bytes(new_bytes)
                os.replace(swap, target)

    real_open, real_os_open = builtins.open, os.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: (seen(file), real_open(file, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda file, *a, **k: (seen(file), real_os_open(file, *a, **k))[1])
    return opens


def _assert_every_stored_vector_is_its_bytes_vector(cache_dir, expected: dict[str, np.ndarray]) -> int:
    stored = FeatureCache(cache_dir, SPEC).get(list(expected))
    for (key, vector), got in zip(expected.items(), stored, strict=True):
        if got is not None:
            np.testing.assert_allclose(got, vector, rtol=1e-4, atol=1e-5,
                                       err_msg=f"the vector stored under {key[:12]} is not its image's")
    return sum(got is not None for got in stored)


# ------------------------------------------------------------------ 1. hash and decode the same bytes

def test_a_file_replaced_between_hashing_and_decoding_never_poisons_the_cache(tmp_path, two_images, tiny_model,
                                                                             monkeypatch):
    target, other = two_images
    old_bytes, new_bytes = target.read_bytes(), other.read_bytes()
    expected = {hashlib.sha256(data).hexdigest(): _vector(tiny_model, load_image(path, 32))
                for data, path in ((old_bytes, target), (new_bytes, other))}
    assert not np.allclose(*expected.values(), atol=1e-3), "the two images must give different vectors"

    opens = _replace_on_second_open(monkeypatch, target, new_bytes)
    result = extract_features(tiny_model, [target], FeatureCache(tmp_path / "c", SPEC), verbose=0)
    monkeypatch.undo()

    assert result.ok.all() and len(opens) >= 1
    assert _assert_every_stored_vector_is_its_bytes_vector(tmp_path / "c", expected) == 1
    # What the run returns is the vector of bytes the file really held when it was read.
    assert any(np.allclose(result.vectors[0], v, rtol=1e-4, atol=1e-5) for v in expected.values())


def test_augmented_views_are_stored_only_for_the_bytes_that_were_hashed(tmp_path, two_images, tiny_model,
                                                                       monkeypatch):
    from transferkit.cache.views import view_caches

    target, other = two_images
    old_bytes, new_bytes = target.read_bytes(), other.read_bytes()
    old_key = hashlib.sha256(old_bytes).hexdigest()
    expected = {old_key: _vector(tiny_model, load_image(target, 32))}

    # The file is replaced after the images' own pass read it, before the views' pass reads it.
    _replace_on_second_open(monkeypatch, target, new_bytes)
    cache = FeatureCache(tmp_path / "c", SPEC)
    result = extract_features(tiny_model, [target], cache, views=2, verbose=0)
    monkeypatch.undo()

    _assert_every_stored_vector_is_its_bytes_vector(tmp_path / "c", expected)
    assert not result.ok[0] and "changed" in result.errors[0]
    for view_cache in view_caches(FeatureCache(tmp_path / "c", SPEC), 2, _default_augmentation()):
        assert view_cache.get([old_key]) == [None], "views of the new bytes stored under the old hash"
    # Run again on the file as it is now: consistent vectors for its new bytes, views included.
    again = extract_features(tiny_model, [target], FeatureCache(tmp_path / "c", SPEC), views=2, verbose=0)
    assert again.ok.all() and again.num_views_computed == 2


def _default_augmentation():
    from transferkit.config import TrainConfig

    return TrainConfig(image_dir="", output_dir="")


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp", "gif", "webp", "tif"])
def test_reading_once_keeps_the_pixels_and_the_key(tmp_path, fmt):
    from transferkit.cache.compute import read_image

    folder = make_image_folder(tmp_path / "p", num_classes=1, images_per_class=2, image_size=300, formats=(fmt,))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        pixels, read = read_image(path, 64)
        np.testing.assert_array_equal(pixels, load_image(path, 64))  # training and serving parity
        assert read.digest == hash_file(path) and read.reason is None  # cache keys do not change


def test_reading_a_fifo_named_like_an_image_refuses_at_once(tmp_path):
    from transferkit.cache.compute import read_image

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    pixels, read = read_image(fifo, 32)  # no writer ever comes: a plain open() would wait forever
    assert pixels is None and "not a regular file" in read.reason
    with pytest.raises(OSError, match="not a regular file"):
        hash_file(fifo)


# -------------------------------------------------- 2. the hash memo notices an edit with the same mtime

def _edit_keeping_size_and_mtime(path: Path, offset: int) -> None:
    status = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick, so the kernel gives the edit a new ctime
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert path.stat().st_size == status.st_size and path.stat().st_mtime_ns == status.st_mtime_ns


def test_an_edit_keeping_size_and_mtime_is_hashed_again(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(bytes(range(256)) * 4)
    first = FileHashes(tmp_path / "c").hashes([path])[0]
    _edit_keeping_size_and_mtime(path, 100)
    assert FileHashes(tmp_path / "c").hashes([path]) == [hash_file(path)] != [first]


def test_an_image_edited_in_place_with_its_mtime_restored_gets_a_fresh_vector(tmp_path, tiny_model):
    folder = make_image_folder(tmp_path / "p", num_classes=1, images_per_class=2, image_size=32, formats=("bmp",))
    paths = sorted(p for p in folder.rglob("*.bmp"))
    extract_features(tiny_model, paths, FeatureCache(tmp_path / "c", SPEC), verbose=0)
    _edit_keeping_size_and_mtime(paths[0], len(paths[0].read_bytes()) - 7)  # a pixel byte, same size
    again = extract_features(tiny_model, paths, FeatureCache(tmp_path / "c", SPEC), verbose=0)
    assert again.num_computed == 1 and again.num_cached == 1
    np.testing.assert_allclose(again.vectors[0], _vector(tiny_model, load_image(paths[0], 32)), rtol=1e-4, atol=1e-5)


def test_a_memo_written_by_an_older_version_is_never_trusted_and_left_intact(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"new bytes")
    status = path.stat()
    (tmp_path / "c").mkdir()
    with sqlite3.connect(tmp_path / "c" / "file-hashes.sqlite") as db:  # the old schema: size + mtime only
        db.execute("CREATE TABLE hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)")
        db.execute("INSERT INTO hashes VALUES (?, ?, ?, ?)",
                   (str(path.resolve()), status.st_size, status.st_mtime_ns, "0" * 64))
    db.close()
    assert FileHashes(tmp_path / "c").hashes([path]) == [hash_file(path)]
    with sqlite3.connect(tmp_path / "c" / "file-hashes.sqlite") as db:  # older versions sharing it still work
        assert db.execute("SELECT sha256 FROM hashes").fetchall() == [("0" * 64,)]
    db.close()


# -------------------------------------------------------------- 3. cache verify --deep

def _extract(runner, photos, cache_dir):
    result = runner.invoke(main, ["extract", str(photos), "--backbone", "tiny_test", "--weights", "none",
                                  "--cache-dir", str(cache_dir), "-q"])
    assert result.exit_code == 0, result.output


def _verify(runner, cache_dir, *options):
    return runner.invoke(main, ["cache", "verify", "--cache-dir", str(cache_dir), "--deep", *options])


def test_verify_deep_finds_a_planted_wrong_vector(tmp_path):
    runner = CliRunner()
    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=4, image_size=32)
    cache_dir = tmp_path / "cache"
    _extract(runner, photos, cache_dir)
    clean = _verify(runner, cache_dir)
    assert clean.exit_code == 0, clean.output
    assert "Recomputed 8 sampled vectors from their images: 0 differ" in clean.output

    # Plant: the vectors of two images swapped, in a shard whose checksums are all sound.
    (spec_dir,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    keys, vectors = [], []
    for shard in spec_shards(spec_dir):
        shard_keys = read_keys(shard)
        keys += shard_keys
        vectors.append(read_rows(shard, np.arange(len(shard_keys))))
        shard.unlink()
    vectors = np.concatenate(vectors)
    vectors[[0, 1]] = vectors[[1, 0]]
    write_shard(spec_dir, keys, vectors)
    assert runner.invoke(main,
                         ["cache", "verify", "--cache-dir", str(cache_dir)]).exit_code == 0, "checksums are sound"

    deep = _verify(runner, cache_dir, "--sample", "8")
    assert deep.exit_code == 1, deep.output
    swapped = {p for p in sorted(photos.rglob("*.png")) if hash_file(p) in keys[:2]}
    assert len(swapped) == 2
    for path in swapped:
        assert f"Mismatch: {path.resolve()}: {spec_dir.name}" in deep.output
    assert "2 differ" in deep.output


def test_verify_deep_says_what_it_could_not_check(tmp_path):
    runner = CliRunner()
    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=2, image_size=32)
    cache_dir = tmp_path / "cache"
    _extract(runner, photos, cache_dir)
    other_seed = _verify(runner, cache_dir, "--weights", "none", "--seed", "7")
    assert "Not checked" in other_seed.output and "fingerprint" in other_seed.output
    # Checking nothing is not a success: say so and exit 1.
    assert other_seed.exit_code == 1 and "nothing could be verified" in other_seed.output, other_seed.output
    assert "Traceback" not in other_seed.output
    for path in photos.rglob("*.png"):
        path.unlink()
    gone = _verify(runner, cache_dir)
    assert gone.exit_code == 1 and "nothing could be verified" in gone.output, gone.output
    assert "4 vectors have no unchanged image left" in gone.output
    usage = CliRunner().invoke(main,
                               ["cache", "verify", "--cache-dir", str(cache_dir), "--sample", "3"])
    assert usage.exit_code == 2 and "--deep" in usage.output


def test_verify_deep_recomputes_augmented_views_too(tmp_path, tiny_model):
    from transferkit.cache import verify_vectors

    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=2, image_size=32)
    paths = sorted(photos.rglob("*.png"))
    spec = FeatureSpec.for_model(get_backbone("tiny_test"), tiny_model)
    extract_features(tiny_model, paths, FeatureCache(tmp_path / "c", spec), views=1, verbose=0)
    assert verify_vectors(tmp_path / "c")["checked"] == 8  # 4 images + 4 views, all sound

    (view_dir,) = [p for p in (tmp_path / "c").iterdir()
                   if p.is_dir() and json.loads((p / "spec.json").read_text())["view"] == 1]
    (shard,) = spec_shards(view_dir)
    keys, vectors = read_keys(shard), read_rows(shard, np.arange(4))
    shard.unlink()
    write_shard(view_dir, keys, vectors + 0.5)  # every view vector off, checksums sound
    report = verify_vectors(tmp_path / "c")
    assert report["checked"] == 8 and {Path(p) for p, _, _ in report["mismatches"]} == {p.resolve() for p in paths}
    assert all(spec_dir == view_dir and "augmented view 1" in detail for _, spec_dir, detail in report["mismatches"])


def _views_cache(tmp_path, tiny_model) -> tuple[Path, list[Path], Path]:
    """A cache of 4 images' vectors and one augmented view of each: (cache, image paths, view folder)."""
    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=2, image_size=32)
    paths = sorted(photos.rglob("*.png"))
    spec = FeatureSpec.for_model(get_backbone("tiny_test"), tiny_model)
    extract_features(tiny_model, paths, FeatureCache(tmp_path / "c", spec), views=1, verbose=0)
    (view_dir,) = [p for p in (tmp_path / "c").iterdir()
                   if p.is_dir() and json.loads((p / "spec.json").read_text())["view"] == 1]
    return tmp_path / "c", paths, view_dir


@pytest.mark.parametrize("settings", [
    "v1 flip=1 crop",  # damaged: a setting without a value
    "v1 flip=1 crop=lots rotation=0.05",  # damaged: not a number
    "v1 flip=1 crop=0.35 sharpen=0.3 seed=0",  # a setting of another version
    "v9 flip=1 crop=0.35 seed=0",  # another version's spelling
])
def test_verify_deep_lists_a_view_it_cannot_rebuild_as_not_checked(tmp_path, tiny_model, settings):
    from transferkit.cache import verify_vectors

    cache_dir, _, view_dir = _views_cache(tmp_path, tiny_model)
    data = json.loads((view_dir / "spec.json").read_text())
    data["augmentation"] = settings  # as written by another transferkit version, or damaged
    moved = view_dir.with_name(f"{data['backbone']}-{FeatureSpec(**data).key()}")
    view_dir.rename(moved)
    (moved / "spec.json").write_text(json.dumps(data))

    report = verify_vectors(cache_dir)

    assert report["checked"] == 4, "the un-augmented vectors are still checked"
    ((spec_dir, reason),) = report["not_checked"]
    assert spec_dir == moved and "augmentation settings" in reason, reason
    result = _verify(CliRunner(), cache_dir)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"Not checked: {moved}" in result.output


def test_verify_deep_samples_the_same_vectors_every_time(tmp_path, tiny_model):
    from transferkit.cache import verify_vectors

    photos = make_image_folder(tmp_path / "photos", num_classes=2, images_per_class=4, image_size=32)
    paths = sorted(photos.rglob("*.png"))
    spec = FeatureSpec.for_model(get_backbone("tiny_test"), tiny_model)
    extract_features(tiny_model, paths, FeatureCache(tmp_path / "c", spec), verbose=0)
    (spec_dir,) = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    (shard,) = spec_shards(spec_dir)
    keys, vectors = read_keys(shard), read_rows(shard, np.arange(len(paths)))
    shard.unlink()
    write_shard(spec_dir, keys, vectors + 0.5)  # every vector wrong: the mismatches are the sample
    samples = [sorted(str(p) for p, _, _ in verify_vectors(tmp_path / "c", sample=3)["mismatches"])
               for _ in range(4)]
    assert len(samples[0]) == 3 and all(sample == samples[0] for sample in samples), samples
