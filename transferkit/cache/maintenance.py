"""Cache maintenance: the operations behind ``transferkit cache info|verify|prune|merge``.

This module owns whole-cache operations, over every spec folder of a cache root: summarising it
(:func:`cache_summary`), re-checking every shard (:func:`verify_cache`), dropping and compacting
entries (:func:`prune_cache`) and joining caches written by several workers (:func:`merge_caches`).
They work on the shard files of :mod:`transferkit.cache.store`; none of them runs a backbone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.cache.keys import FileHashes
from transferkit.cache.store import (
    LAST_RUN_FILE,
    SPEC_FILE,
    cache_specs,
    damaged_shards,
    read_keys,
    read_rows,
    spec_shards,
    verify_shard,
    write_shard,
)
from transferkit.errors import CacheError

#: Most vectors in one shard written by ``prune`` (a shard is built in memory before it is written).
PRUNE_SHARD_ROWS = 65536


def cache_summary(cache_dir: str | os.PathLike) -> list[dict]:
    """One row per FeatureSpec in a cache: settings, entries, shards, bytes, last run.

    Example:
        >>> [row["entries"] for row in cache_summary("runs/cache")]  # doctest: +SKIP
        [500]
    """
    rows = []
    for spec_dir in cache_specs(cache_dir):
        shards = spec_shards(spec_dir)
        entries = 0
        for shard in shards:
            with contextlib.suppress(Exception):  # damaged shards are `verify`'s business
                entries += len(read_keys(shard))
        last_run = spec_dir / LAST_RUN_FILE
        rows.append({
            "folder": spec_dir.name,
            "spec": json.loads((spec_dir / SPEC_FILE).read_text()),
            "entries": entries,
            "shards": len(shards),
            "bytes": sum(s.stat().st_size for s in shards),
            "last_run": json.loads(last_run.read_text()) if last_run.is_file() else None,
        })
    return rows


def verify_cache(cache_dir: str | os.PathLike) -> tuple[int, list[tuple[Path, str]]]:
    """``(shards checked, [(damaged shard, reason), ...])`` over every spec of a cache.

    Example:
        >>> checked, damaged = verify_cache("runs/cache")  # doctest: +SKIP
    """
    shards = [s for spec_dir in cache_specs(cache_dir) for s in spec_shards(spec_dir)]
    return len(shards), damaged_shards(shards)


def prune_cache(cache_dir: str | os.PathLike, *, missing: bool = False, older_than: float | None = None) -> dict:
    """Drop entries whose images are gone (``missing``) or shards older than a time, and compact.

    An image is "gone" when no file this cache has hashed, at its recorded path, still has those
    bytes. Each spec's surviving vectors are rewritten into one shard (of up to ``PRUNE_SHARD_ROWS``
    vectors) before the old shards are deleted, so an interruption leaves duplicates (harmless), never
    a hole. Temporary files more than an hour old (left by killed runs) are deleted too.

    Args:
        cache_dir: the cache root.
        missing: drop vectors of images that are gone.
        older_than: drop shards last written before this POSIX time.

    Returns:
        ``{"entries_before", "entries_after", "shards_before", "shards_after"}``.

    Example:
        >>> prune_cache("runs/cache", missing=True)["entries_after"]  # doctest: +SKIP
        480
    """
    root = Path(cache_dir)
    live = FileHashes(root).live() if missing else None
    report = dict.fromkeys(("entries_before", "entries_after", "shards_before", "shards_after"), 0)
    for spec_dir in cache_specs(root):
        shards = spec_shards(spec_dir)
        keep_keys: list[str] = []
        keep_vectors: list[np.ndarray] = []
        seen: set[str] = set()
        for shard in shards:
            if verify_shard(shard) is not None:
                continue  # damaged: dropped, its vectors will be computed again
            keys = read_keys(shard)
            report["entries_before"] += len(keys)
            if older_than is not None and shard.stat().st_mtime < older_than:
                continue
            vectors = read_rows(shard, np.arange(len(keys)))
            for key, vector in zip(keys, vectors, strict=True):
                if key not in seen and (live is None or key in live):
                    seen.add(key)
                    keep_keys.append(key)
                    keep_vectors.append(vector)
        report["shards_before"] += len(shards)
        new = {write_shard(spec_dir, keep_keys[i:i + PRUNE_SHARD_ROWS], np.stack(keep_vectors[i:i + PRUNE_SHARD_ROWS]))
               for i in range(0, len(keep_keys), PRUNE_SHARD_ROWS)}
        for shard in shards:
            if shard not in new:
                shard.unlink(missing_ok=True)
        for tmp in spec_dir.glob(".*.tmp"):  # left by a killed writer; an hour is far beyond any write
            with contextlib.suppress(OSError):  # another process may finish or remove it meanwhile
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        report["entries_after"] += len(keep_keys)
        report["shards_after"] += len(new)
    return report


def merge_caches(cache_dir: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> dict:
    """Copy every sound shard of other caches (e.g. one per worker) into ``cache_dir``.

    Shards are named by content, so a shard already present is skipped and merging twice is
    harmless. Damaged shards are reported and not copied.

    Returns:
        ``{"copied", "already_present", "damaged": [(shard, reason), ...]}``.

    Example:
        >>> merge_caches("shared-cache", ["part-0", "part-1"])["copied"]  # doctest: +SKIP
        6
    """
    import shutil

    target_root = Path(cache_dir)
    report: dict = {"copied": 0, "already_present": 0, "damaged": []}
    for source in sources:
        spec_dirs = cache_specs(source)
        if not spec_dirs:
            raise CacheError(f"'{source}' holds no transferkit feature cache (no <backbone>-<key>/spec.json).")
        for spec_dir in spec_dirs:
            target_dir = target_root / spec_dir.name
            target_dir.mkdir(parents=True, exist_ok=True)
            if not (target_dir / SPEC_FILE).exists():
                files.write_bytes(target_dir / SPEC_FILE, (spec_dir / SPEC_FILE).read_bytes())
            for shard in spec_shards(spec_dir):
                if (target_dir / shard.name).exists():
                    report["already_present"] += 1
                elif (reason := verify_shard(shard)) is not None:
                    report["damaged"].append((shard, reason))
                else:
                    with files.atomic_path(target_dir / shard.name, suffix=".h5") as tmp:
                        shutil.copyfile(shard, tmp)
                    report["copied"] += 1
    return report
