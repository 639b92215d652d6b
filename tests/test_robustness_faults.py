"""Robustness, faults during extraction: Ctrl-C, SIGKILL, a full disk and read-only folders.

Each test checks the promise of the issue: the run stops with a clear message naming the path, the cache
keeps every finished vector and stays consistent (``verify`` passes), and the next run completes with
the same vectors an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from transferkit.cache import FeatureCache, FeatureSpec, FileHashes, extract_features
from transferkit.errors import CacheError
from transferkit.testing import make_image_folder
from transferkit.testing import run_cli as run

TINY = ["--backbone", "tiny_test", "--weights", "none", "--image-size", "32"]
NUM_IMAGES = 400



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "photos"
    return make_image_folder(root, num_classes=4, images_per_class=NUM_IMAGES // 4, image_size=32)


@pytest.fixture
def tiny_model():
    """The backbone `transferkit extract --backbone tiny_test --weights none --seed 0` builds."""
    import keras

    from transferkit.models.registry import get_backbone
    from transferkit.models.weights import load_backbone, resolve_weights

    spec = get_backbone("tiny_test")
    keras.utils.set_random_seed(0)
    return load_backbone(spec, resolve_weights(spec, "none"), 32)


def _paths(photos: Path) -> list[Path]:
    return sorted(photos.rglob("*.png"))


def _cache(cache_dir: Path, model) -> FeatureCache:
    from transferkit.models.registry import get_backbone

    return FeatureCache(cache_dir, FeatureSpec.for_model(get_backbone("tiny_test"), model))


def _assert_complete_and_consistent(cache_dir: Path, model, photos: Path) -> None:
    """The cache holds a vector for every image, equal to an uninterrupted computation, and verifies."""
    paths = _paths(photos)
    cache = _cache(cache_dir, model)
    assert cache.verify() == []
    cached = cache.get(FileHashes(cache_dir).hashes(paths))
    assert all(v is not None for v in cached)
    fresh = extract_features(model, paths, None, verbose=0)
    np.testing.assert_allclose(np.stack(cached), fresh.vectors, rtol=1e-5, atol=1e-6)


class _Progress:
    """Reads a child's output in a thread and tracks the Keras progress bar's "done/total" count."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.output, self.done = proc, b"", 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.output += chunk
            counts = re.findall(rb"(\d+)/(\d+)(?!\d)", self.output[-400:])
            if counts:
                self.done = int(counts[-1][0])

    def wait_for(self, count: int, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while self.done < count and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.proc.poll() is None, f"finished before {count} images:\n{self.text()[-2000:]}"
        assert self.done >= count, f"no progress within {timeout} s:\n{self.text()[-2000:]}"
        return self.done

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return code

    def text(self) -> str:
        return self.output.decode(errors="replace")


def _start(args: list[str]) -> _Progress:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1])
    return _Progress(proc)


# ------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_stops_extraction_cleanly_keeps_every_finished_vector_and_the_next_run_resumes(
        photos, tmp_path, tiny_model):
    cache_dir = tmp_path / "cache"
    args = ["extract", photos, *TINY, "--cache-dir", cache_dir, "--batch-size", "2"]
    child = _start(["-m", "transferkit.cli", *map(str, args)])
    done = child.wait_for(20)
    child.proc.send_signal(signal.SIGINT)
    assert child.finish() == 130, child.text()[-2000:]
    assert "Interrupted. Finished features are kept in the cache; run again to resume." in child.text()
    assert "Traceback" not in child.text()

    resumed = run(*args, "-q")
    assert resumed.exit_code == 0, resumed.output
    computed, cached = map(int, re.search(r"computed: (\d+); already cached: (\d+)", resumed.output).groups())
    # extract writes the cache every 512 images: what was finished before Ctrl-C is kept all the same.
    assert cached >= done, f"{done} vectors were finished before Ctrl-C but only {cached} kept"
    assert computed > 0 and computed + cached == NUM_IMAGES, "only the rest was computed"
    _assert_complete_and_consistent(cache_dir, tiny_model, photos)


# ------------------------------------------------------------------------------------------ SIGKILL

_KILLED_SCRIPT = """\
import sys, time, keras
from pathlib import Path
from transferkit.models.registry import get_backbone
from transferkit.cache import FeatureCache, FeatureSpec, compute, extract_features
from transferkit.models.weights import load_backbone, resolve_weights
# The tiny model runs thousands of images a second: at that pace the kill, which lands up to 50 ms
# after the progress the parent reads, could come after the last image. Pace it like a real backbone.
compiled = compute.compiled_predict
def paced(model):
    predict = compiled(model)
    def call(images):
        time.sleep(0.01)
        return predict(images)
    return call
compute.compiled_predict = paced
keras.utils.set_random_seed(0)
spec = get_backbone('tiny_test')
model = load_backbone(spec, resolve_weights(spec, 'none'), 32)
cache = FeatureCache(sys.argv[1], FeatureSpec.for_model(spec, model))
paths = sorted(Path(sys.argv[2]).rglob('*.png'))
extract_features(model, paths, cache, batch_size=4, flush_every=8, verbose=1)
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_complete_consistent_result(photos, tmp_path, tiny_model):
    """Killed three times at seeded random points of the work (often while a shard is being written)."""
    rng = random.Random(20240607)
    cache_dir = tmp_path / "cache"
    cache = _cache(cache_dir, tiny_model)
    kept = [0]
    for _ in range(3):
        remaining = NUM_IMAGES - kept[-1]
        child = _start(["-c", _KILLED_SCRIPT, str(cache_dir), str(photos)])
        child.wait_for(rng.randrange(1, remaining // 3))
        time.sleep(rng.uniform(0, 0.05))
        child.proc.send_signal(signal.SIGKILL)
        assert child.finish() == -signal.SIGKILL, "killed, not finished"
        kept.append(len(FeatureCache(cache_dir, cache.spec)))
    assert kept == sorted(kept) and kept[-1] > 0, f"finished vectors survive each kill: {kept}"
    assert kept[-1] < NUM_IMAGES

    resumed = extract_features(tiny_model, _paths(photos), FeatureCache(cache_dir, cache.spec), verbose=0)
    assert resumed.num_cached == kept[-1] and resumed.num_computed == NUM_IMAGES - kept[-1]
    _assert_complete_and_consistent(cache_dir, tiny_model, photos)
    # Killed writers may leave temporary files: never read as shards, and prune removes old ones.
    leftovers = list(cache.dir.glob(".*.tmp"))
    for tmp in leftovers:
        os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    assert run("cache", "prune", "--cache-dir", cache_dir).exit_code == 0
    assert not list(cache.dir.glob(".*.tmp"))
    _assert_complete_and_consistent(cache_dir, tiny_model, photos)


# ---------------------------------------------------------------------------------------- disk full


def test_disk_full_during_a_cache_write_names_the_path_and_the_next_run_completes(
        photos, tmp_path, tiny_model, monkeypatch):
    from transferkit import files

    paths = _paths(photos)[:120]
    real_publish = files.publish
    writes = []

    def publish(tmp, path):
        if Path(path).name.startswith("shard-"):
            writes.append(path)
            if len(writes) > 2:  # the third shard meets a full disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_publish(tmp, path)

    monkeypatch.setattr(files, "publish", publish)
    cache = _cache(tmp_path / "cache", tiny_model)
    with pytest.raises(CacheError, match=rf"Cannot write to the feature cache '{re.escape(str(cache.dir))}': "
                                         r"No space left on device\. The vectors already stored are intact"):
        extract_features(tiny_model, paths, cache, batch_size=8, flush_every=16, verbose=0)
    assert [p.name for p in cache.dir.iterdir() if p.name.startswith(".")] == [], "no temporary file left"
    assert _cache(tmp_path / "cache", tiny_model).verify() == []
    assert len(_cache(tmp_path / "cache", tiny_model)) == 32, "the two shards written before stay usable"

    monkeypatch.setattr(files, "publish", real_publish)  # space freed
    again = extract_features(tiny_model, paths, _cache(tmp_path / "cache", tiny_model), verbose=0)
    assert again.num_cached == 32 and again.num_computed == len(paths) - 32
    fresh = extract_features(tiny_model, paths, None, verbose=0)
    np.testing.assert_allclose(again.vectors, fresh.vectors, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _mounted_tmpfs(path: Path, size_kb: int, read_only: bool = False):
    """A real small (or read-only) filesystem; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount here ({exc}); the simulated disk-full test covers the same code")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN: {done.stderr.strip()}); the "
                    "simulated disk-full test covers the same code")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=30)


def _fill(folder: Path) -> Path:
    """Fill a filesystem up to the last byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def test_disk_full_on_a_real_small_filesystem(photos, tmp_path, tiny_model):
    small = photos.parent / "small"
    make_image_folder(small, num_classes=2, images_per_class=20, image_size=32)
    paths = sorted(small.rglob("*.png"))
    with _mounted_tmpfs(tmp_path / "disk", 1024) as disk:
        cache_dir = disk / "cache"
        args = ["extract", small, *TINY, "--cache-dir", cache_dir, "-q"]
        assert run(*args).exit_code == 0  # the index and a first shard fit

        for path in paths[:10]:  # edited images need new vectors
            path.write_bytes(path.read_bytes() + b"\0")
        FileHashes(cache_dir).hashes(paths)  # images and shards indexed: the next write is a shard
        assert len(_cache(cache_dir, tiny_model)) == 40
        filler = _fill(disk)
        full = run(*args)
        assert full.exit_code == 1 and "Traceback" not in full.output
        assert f"Error: Cannot write to the feature cache '{_cache(cache_dir, tiny_model).dir}': No space left on " \
               "device. The vectors already stored are intact; free some space" in full.output

        for path in paths[10:20]:  # more edits: now the hash index cannot grow either
            path.write_bytes(path.read_bytes() + b"\0")
        full = run(*args)
        assert full.exit_code == 1 and "Traceback" not in full.output
        assert f"Error: Cannot use the file-hash index '{cache_dir / 'file-hashes.sqlite'}': database or disk is " \
               "full. Free some space" in full.output
        assert run("cache", "verify", "--cache-dir", cache_dir).exit_code == 0

        filler.unlink()
        again = run(*args)
        assert again.exit_code == 0, again.output
        assert "computed: 20; already cached: 20" in again.output
        fresh = extract_features(tiny_model, paths, None, verbose=0)
        cached = _cache(cache_dir, tiny_model).get(FileHashes(cache_dir).hashes(paths))
        np.testing.assert_allclose(np.stack(cached), fresh.vectors, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ read-only


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write to: permission bits for a normal user, a read-only mount for root."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        with _mounted_tmpfs(tmp_path / "read-only", 64, read_only=True) as folder:
            yield folder


def test_read_only_output_folders_are_refused_at_once_naming_the_path(photos, tmp_path, read_only_dir):
    small = photos.parent / "small-ro"
    make_image_folder(small, num_classes=2, images_per_class=10, image_size=32)
    cases = {
        "--cache-dir": ["extract", small, *TINY, "--cache-dir", read_only_dir / "cache"],
        "-o/--output-dir": ["train", small, "-o", read_only_dir / "run", *TINY, "--cache-dir", tmp_path / "c"],
        "-o/--output": ["features", "export", small, "-o", read_only_dir / "f.npz", *TINY,
                        "--cache-dir", tmp_path / "c"],
    }
    for option, args in cases.items():
        result = run(*args, "-q")
        assert result.exit_code == 2, (option, result.output)
        assert re.search(rf"Cannot write to folder '{re.escape(str(read_only_dir))}.*' \({re.escape(option)}\): "
                         r"(Read-only file system|Permission denied)\. Choose a writable folder\.", result.output), \
            result.output
    assert not (tmp_path / "c").exists(), "refused before any other work"
