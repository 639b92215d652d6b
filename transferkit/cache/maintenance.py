"""Cache maintenance: the operations behind ``transferkit cache info|verify|prune|merge``.

This module owns whole-cache operations, over every spec folder of a cache root: summarising it
(:func:`cache_summary`), re-checking every shard (:func:`verify_cache`), dropping and compacting
entries (:func:`prune_cache`) and joining caches written by several workers (:func:`merge_caches`).
They work on the shard files of :mod:`transferkit.cache.store`; only :func:`verify_vectors`
(``verify --deep``) runs a backbone, to recompute a sample of vectors from their images.
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
from transferkit.cache.keys import MIRROR, FeatureSpec, FileHashes
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
from transferkit.errors import CacheError, short_repr

#: Most vectors in one shard written by ``prune`` (a shard is built in memory before it is written).
PRUNE_SHARD_ROWS = 65536

#: Seed of ``verify --deep``'s sample of vectors (per spec): the same cache is checked on the same
#: vectors every time, so a result can be repeated. Not ``--seed``, which names the weights' seed.
SAMPLE_SEED = 0


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


def verify_vectors(cache_dir: str | os.PathLike, *, sample: int = 100, weights: str | None = None, seed: int = 0,
                   batch_size: int = 32) -> dict:
    """Recompute a sample of each spec's cached vectors from their images and compare (``--deep``).

    Shard checksums prove the bytes are the ones written; this proves the vectors are the right
    ones. Each sampled vector's image is found through the file-hash index (the paths hashed with
    that content) and read once: only bytes that still hash to the vector's key are used. The model
    is rebuilt from what the spec records (backbone, input size, pooling, storage dtype; for
    augmented views, the settings and view number) with weights whose fingerprint equals the spec's
    ``weights_id``: ``weights`` if given, else the ImageNet file when it is on this machine, else
    random initialisation from ``seed`` (as ``--weights none --seed``). The sample is drawn with the
    fixed :data:`SAMPLE_SEED`, so the same cache is checked on the same vectors every time. A spec
    that cannot be rebuilt here (unknown backbone, no matching weights, augmentation settings of
    another version or damaged) is listed in ``not_checked`` with the reason, never raised.

    Args:
        cache_dir: the cache root.
        sample: vectors recomputed per spec (fewer when fewer have an image to recompute from).
        weights: ``"imagenet"``, ``"none"`` or a weights file: what built the cached vectors.
        seed: the seed of ``--weights none``.
        batch_size: images per backbone call.

    Returns:
        ``{"checked": int, "vectors": int, "mismatches": [(image path, spec folder, detail)],
        "not_checked": [(spec folder, reason)], "no_source": int}``; ``vectors`` counts the vectors
        in sound shards of readable specs, ``no_source`` those whose image is gone or changed (nothing
        to recompute them from). ``checked`` 0 with vectors or specs left unchecked means nothing
        could be verified.

    Example:
        >>> verify_vectors("runs/cache", sample=50)["mismatches"]  # doctest: +SKIP
        []
    """
    root = Path(cache_dir)
    report: dict = {"checked": 0, "vectors": 0, "mismatches": [], "not_checked": [], "no_source": 0}
    specs = cache_specs(root)
    if not specs:
        return report
    sources = FileHashes(root).sources()
    models: dict = {}
    for spec_dir in specs:
        try:
            spec = FeatureSpec(**json.loads((spec_dir / SPEC_FILE).read_text()))
        except (OSError, TypeError, ValueError) as exc:
            report["not_checked"].append((spec_dir, f"its {SPEC_FILE} cannot be read ({exc})"))
            continue
        if spec_dir.name != f"{spec.backbone}-{spec.key()}":
            report["not_checked"].append((spec_dir, f"its {SPEC_FILE} does not give the folder's key"))
            continue
        index: dict[str, tuple[Path, int]] = {}
        for shard in spec_shards(spec_dir):
            if verify_shard(shard) is None:  # damaged shards are the shallow check's business
                for row, key in enumerate(read_keys(shard)):
                    index.setdefault(key, (shard, row))
        keys = sorted(k for k in index if k in sources)
        report["vectors"] += len(index)
        report["no_source"] += len(index) - len(keys)
        if not keys:
            continue
        try:
            augmentation = _augmentation_config(spec.augmentation) if spec.view else None
        except Exception as exc:  # noqa: BLE001 - settings of another version or damaged can fail anyhow
            report["not_checked"].append((spec_dir, (
                f"its augmentation settings {short_repr(spec.augmentation)} cannot be rebuilt by this version of "
                f"transferkit ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else '-'})")))
            continue
        model, why = _rebuild_model(spec, models, weights, seed)
        if model is None:
            report["not_checked"].append((spec_dir, why))
            continue
        rng = np.random.default_rng(SAMPLE_SEED)  # per spec: one spec's sample does not depend on the others
        chosen = [keys[j] for j in sorted(rng.choice(len(keys), size=min(sample, len(keys)), replace=False))]
        for start in range(0, len(chosen), batch_size):
            _compare(spec, spec_dir, model, augmentation, chosen[start:start + batch_size], index, sources, report)
    return report


def _rebuild_model(spec: FeatureSpec, models: dict, weights: str | None, seed: int):
    """``(model, None)``: a backbone whose features have ``spec``'s key, or ``(None, why not)``."""
    import dataclasses

    import keras

    from transferkit.models.registry import get_backbone
    from transferkit.models.weights import load_backbone, resolve_weights

    try:
        backbone = get_backbone(spec.backbone)
    except Exception as exc:  # noqa: BLE001 - an unknown name, from another version or a plug-in
        return None, f"backbone '{spec.backbone}' is not available here ({exc})"
    wanted = dataclasses.replace(spec, augmentation="", view=0).key()
    choices = [weights] if weights else (["imagenet"] if backbone.pretrained else []) + ["none"]
    tried = []
    for choice in choices:
        slot = (spec.backbone, spec.image_size, choice, seed, spec.tta)
        if slot not in models:
            try:
                resolved = resolve_weights(backbone, choice, spec.image_size, download=False)
                keras.utils.set_random_seed(seed)  # --weights none: the seed gives the weights
                models[slot] = load_backbone(backbone, resolved, spec.image_size, mirror=spec.tta == MIRROR)
            except Exception as exc:  # noqa: BLE001 - missing or unfit weights: try the next source
                models[slot] = exc
        model = models[slot]
        if isinstance(model, Exception):
            tried.append(f"{choice}: {str(model).splitlines()[0] if str(model) else type(model).__name__}")
        elif FeatureSpec.for_model(backbone, model, spec.dtype).key() == wanted:
            return model, None
        else:
            tried.append(f"{choice}{' --seed ' + str(seed) if choice == 'none' else ''}: other weights "
                         f"(fingerprint {FeatureSpec.for_model(backbone, model).weights_id})")
    return None, (f"no weights here give fingerprint {spec.weights_id} at format version {spec.version} "
                  f"(tried {'; '.join(tried)}); pass --weights (and --seed for none) as used to build them")


def _compare(spec: FeatureSpec, spec_dir: Path, model, augmentation, keys: list[str], index: dict, sources: dict,
             report: dict) -> None:
    """Recompute the vectors of ``keys`` from their images and record any that differ from the stored ones;
    ``augmentation`` is the TrainConfig of an augmented view's settings (None for plain vectors)."""
    import tensorflow as tf

    from transferkit.cache.compute import compiled_predict, read_image

    images, found, paths = [], [], []
    for key in keys:
        for path in sources[key]:
            pixels, read = read_image(path, spec.image_size)
            if pixels is not None and read.digest == key:  # these very bytes made the key
                images.append(pixels.astype(np.float32))
                found.append(key)
                paths.append(path)
                break
        else:
            report["no_source"] += 1
    if not found:
        return
    batch = np.stack(images)
    if spec.view:
        from transferkit.data.augment import augmented_view, view_seed

        batch = np.stack([augmented_view(tf.constant(image), tf.constant(view_seed(key, spec.view, augmentation.seed)),
                                         augmentation).numpy() for image, key in zip(batch, found, strict=True)])
    fresh = compiled_predict(model)(batch).numpy()
    # Float16 storage rounds each value to 3 decimal digits; a wrong vector is off by far more.
    tolerance = 1e-2 if spec.dtype == "float16" else 1e-3
    for key, path, vector in zip(found, paths, fresh, strict=True):
        shard, row = index[key]
        stored = read_rows(shard, np.array([row]))[0].astype(np.float32)
        difference = float(np.linalg.norm(stored - vector) / max(float(np.linalg.norm(vector)), 1e-12))
        report["checked"] += 1
        if not difference <= tolerance:  # NaN counts as a mismatch
            view = f", augmented view {spec.view}" if spec.view else ""
            report["mismatches"].append((path, spec_dir, (
                f"cached vector differs from the one recomputed from the image (relative difference "
                f"{difference:.3g}, allowed {tolerance:g}; {spec.backbone} {spec.image_size}px, weights "
                f"{spec.weights_id}, {spec.dtype}{view}; key {key[:12]}, {shard.name} row {row})")))


def _augmentation_config(settings: str):
    """The TrainConfig whose augmentation settings :func:`transferkit.cache.views.augmentation_id` gave ``settings``."""
    from transferkit.cache.views import augmentation_id
    from transferkit.config import TrainConfig

    values = dict(item.split("=", 1) for item in settings.split()[1:])
    strengths = {f"augment_{name}": float(value) for name, value in values.items() if name not in ("flip", "seed")}
    config = TrainConfig(image_dir="", output_dir="", augment_flip=values.get("flip") == "1",
                         seed=int(values.get("seed", 0)), **strengths)
    if augmentation_id(config) != settings:
        raise ValueError(f"augmentation settings '{settings}' are from another version of transferkit")
    return config
