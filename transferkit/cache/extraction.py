"""Feature extraction: every image's vector from the store where present, one backbone pass for the rest.

This module owns :func:`extract_features`: looking the images up by their remembered hashes
(:class:`~transferkit.cache.keys.FileHashes`) in a :class:`~transferkit.cache.store.FeatureCache`,
running the backbone over a ``tf.data`` pipeline of the rest, and writing fresh vectors to the
store as they come (every ``flush_every`` and on an interruption, so a killed run resumes where
it stopped). The pieces it shares with the augmented views' pass (:mod:`transferkit.cache.views`) are
in :mod:`transferkit.cache.compute`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit import files, runtime
from transferkit.cache import compute

# Re-exported: the names this module held before compute.py was split from it.
from transferkit.cache.compute import ExtractionResult, ImageRead, PendingVectors, decode_error, read_image  # noqa: F401
from transferkit.cache.keys import FileHashes
from transferkit.cache.store import LAST_RUN_FILE, FeatureCache, write_error
from transferkit.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from transferkit.config import TrainConfig


def extract_features(
    model,
    paths: Sequence[Path],
    cache: FeatureCache | None,
    *,
    batch_size: int = 32,
    flush_every: int = 512,
    verbose: int = 1,
    keep_vectors: bool = True,
    views: int = 0,
    augmentation: TrainConfig | None = None,
) -> ExtractionResult:
    """Pooled features for every image: from the cache where present, one backbone pass for the rest.

    Vectors are written to the cache every ``flush_every`` images, so an interrupted extraction
    keeps its finished work and the next call resumes from there.

    Args:
        model: the backbone from :func:`transferkit.models.weights.load_backbone`.
        paths: image files.
        cache: where to look up and store vectors; ``None`` computes everything.
        batch_size: images per backbone call.
        flush_every: images between cache writes.
        verbose: 1 shows a Keras progress bar.
        keep_vectors: False only fills the cache (``vectors`` is then ``None``): memory stays flat
            however large the folder, since no vector is held beyond the batch being written.
        views: also the vectors of this many augmented views per image (see :mod:`transferkit.cache.views`),
            each cached like the originals: a second call computes none of them.
        augmentation: the augmentation strengths (the ``augment_*`` fields) and ``seed`` of the
            views; TrainConfig's defaults when ``None``.

    Example:
        >>> result = extract_features(model, paths, cache, views=4)  # doctest: +SKIP
        >>> result.vectors.shape, result.view_vectors.shape  # doctest: +SKIP
        ((120, 1280), (120, 4, 1280))
    """

    image_size = int(model.input_shape[1])
    feature_dim = int(model.output_shape[-1])
    n = len(paths)
    vectors = np.zeros((n, feature_dim), dtype=np.float32) if keep_vectors else None
    ok = np.ones(n, dtype=bool)
    errors: dict[int, str] = {}

    hashes: list[str | None] = [None] * n
    todo: list[int] = list(range(n))
    num_cached = num_computed = 0
    memo = FileHashes(cache.root) if cache is not None else None
    remembered: dict[int, str] = {}  # image -> the hash the memo gave for its unchanged file
    if memo is not None:  # without a cache (predict, evaluate) there is nothing to look up
        # Unchanged files (same path and status as when last read) are looked up without reading them.
        for i, digest in enumerate(memo.lookup(paths)):
            if isinstance(digest, OSError):
                ok[i] = False
                errors[i] = f"cannot read file: {digest.strerror or digest}"
            elif digest is not None:
                remembered[i] = digest
        rows = list(remembered)
        for i, hit in zip(rows, cache.fill(list(remembered.values()), vectors, rows), strict=True):
            if hit:
                hashes[i] = remembered[i]
                num_cached += 1
        todo = [i for i in range(n) if ok[i] and hashes[i] is None]

    start = time.perf_counter()
    if todo:
        # The rest is read once each: hashed and looked up (a moved or copied file is a hit without
        # decoding), else decoded from those same bytes and run through the backbone.
        reads: dict[int, ImageRead] = {}  # position in todo -> what reading it gave (pipeline threads)
        if cache is not None:
            cache.contains([])  # load the shard index now, not in the pipeline's threads
        predict = compute.compiled_predict(model)  # looked up at call time: tests pace it
        dataset = compute.read_dataset([paths[i] for i in todo], image_size, batch_size, reads, cache)
        progress = progress_bar(len(todo), "image", verbose)
        shown = 0  # images the bar counts as done
        noted: set[int] = set()

        def remember_reads() -> None:
            """New hashes into the memo, before the vectors they key are stored (on a full disk the
            error then names the index, which cannot grow either)."""
            fresh = [(position, read) for position, read in list(reads.items())
                     if position not in noted and read.status is not None
                     and read.digest != remembered.get(todo[position])]
            if memo is not None:
                memo.remember((paths[todo[position]], read.status, read.digest) for position, read in fresh)
            noted.update(position for position, _ in fresh)

        try:
            # Ctrl-C acts between batches (never swallowed inside TensorFlow), after the vectors are saved.
            with runtime.interrupt_checkpoints() as check, PendingVectors(flush_every).kept() as pending:
                for images, positions in dataset:
                    check()
                    batch_vectors = predict(images).numpy()
                    positions = positions.numpy()
                    for vector, position in zip(batch_vectors, positions, strict=True):
                        i = todo[position]
                        hashes[i] = reads[position].digest  # of the bytes decoded, whatever the memo said
                        if keep_vectors:
                            vectors[i] = vector
                        pending.add(cache, hashes[i], vector)
                    num_computed += len(batch_vectors)
                    shown = int(positions[-1]) + 1  # in order: every file before it is done
                    progress.update(shown)
                    if pending.full():
                        remember_reads()
                        pending.flush()
                remember_reads()
        except BaseException:
            with contextlib.suppress(Exception):  # it only saves a read: the original error matters
                remember_reads()  # what was read is remembered, even after an interruption
            raise
        if shown < len(todo):  # unreadable files last: done too (the bar's last line is written once)
            progress.update(len(todo))
        moved = []
        for position, i in enumerate(todo):
            read = reads[position]
            if read.reason is not None:
                ok[i] = False
                errors[i] = read.reason
            elif read.cached:
                hashes[i] = read.digest
                moved.append(i)
        if moved:  # moved, copied or renamed files: the vectors of their bytes were stored before
            for i, hit in zip(moved, cache.fill([hashes[i] for i in moved], vectors, moved), strict=True):
                if hit:
                    num_cached += 1
                else:  # its shard was found damaged and set aside meanwhile
                    ok[i] = False
                    errors[i] = "its cached vector became unreadable during extraction; run again to compute it"
    seconds = time.perf_counter() - start
    if cache is not None and cache.dir.is_dir():
        try:
            files.write_json(cache.dir / LAST_RUN_FILE, {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images": n, "cached": num_cached,
                "computed": num_computed, "hit_rate": round(num_cached / n, 4) if n else 0.0})
        except OSError as exc:
            raise write_error(cache.dir / LAST_RUN_FILE, exc) from exc
    result = ExtractionResult(vectors, ok, errors, num_cached, num_computed, seconds)
    if views:
        from transferkit.cache.views import extract_views

        extract_views(model, paths, hashes, result, cache, views, augmentation, batch_size=batch_size,
                      flush_every=flush_every, verbose=verbose, keep_vectors=keep_vectors)
    return result
