"""A whole folder's features: the library functions behind ``extract``, ``features export``,
``features plot`` and ``lr-find``.

:func:`extract_folder` scans and checks the folder, resolves the weights (before any TensorFlow
work), then looks up or computes every image's vector in the cache; :func:`export_folder_features`
writes them with their labels and ``train``'s split to a feature file.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("transferkit")


def extract_folder(image_dir, backbone, weights, image_size, batch_size, cache_dir, cache_dtype, seed, quiet,
                   select=None, keep_vectors=True, strict=False, views=0, labels="required",
                   allow_outside=False):
    """Scan, check, then compute (or look up) the features of a folder: shared by extract and export.

    With ``views`` K, also K augmented views per image (TrainConfig's default strengths, ``seed``).
    With ``labels="optional"``, a folder without two class folders is read as unlabelled photos
    (see :func:`transferkit.data.scan.scan_folder`); the cache keys do not depend on labels.

    Returns:
        ``(folder, relative paths extracted, ExtractionResult, FeatureCache)``; skipped files
        are logged (with ``strict``, any skipped file raises instead).
    """
    from transferkit import runtime
    from transferkit.cache import FeatureCache, FeatureSpec, default_cache_dir, extract_features
    from transferkit.config import TrainConfig
    from transferkit.data.checks import check_strict
    from transferkit.data.scan import scan_folder
    from transferkit.models.registry import check_image_size, get_backbone
    from transferkit.models.weights import load_backbone, resolve_weights
    from transferkit.serving import outputs

    spec = get_backbone(backbone)
    size = check_image_size(spec, image_size)
    # The hash split of train with the same --seed.
    folder = scan_folder(image_dir, seed=seed, labels=labels, allow_outside=allow_outside)
    if strict:
        check_strict(folder.skipped)  # before any TensorFlow work
    paths = [p for p in folder.paths if select is None or select(p)]
    resolved = resolve_weights(spec, weights, size)
    cache_dir = outputs.check_cache_dir(cache_dir or default_cache_dir(), (image_dir, *folder.scanned_dirs))
    runtime.start_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)  # --weights none: the same seed gives the same vectors
    model = load_backbone(spec, resolved, size)
    cache = FeatureCache(cache_dir, FeatureSpec.for_model(spec, model, cache_dtype))
    augmentation = TrainConfig(image_dir=str(image_dir), output_dir="", seed=seed) if views else None
    result = extract_features(model, [folder.abs_path(p) for p in paths], cache, batch_size=batch_size,
                              verbose=0 if quiet else 1, keep_vectors=keep_vectors, views=views,
                              augmentation=augmentation)
    skipped = list(folder.skipped) + result.skipped_files(paths)
    if strict:
        check_strict(skipped)  # the vectors computed so far stay in the cache
    for rel, reason in skipped:
        log.warning("Skipped %s: %s", rel, reason)
    return folder, paths, result, cache


def export_folder_features(folder, paths, result, cache, output, file_format: str, seed: int,
                           augment_views: int = 0) -> tuple[int, int]:
    """``features export``'s file: one row per image extracted by :func:`extract_folder` (K + 1 per
    image with ``augment_views`` K), with its label and the split ``train`` would give it with
    ``seed``. Warns when a copy of one image sits in two splits. An unlabelled folder's rows have
    no label and no split (the file has no such columns).

    Returns:
        ``(rows written, feature dimension)``.
    """
    from transferkit.cache import FileHashes, write_features
    from transferkit.data.checks import dataset_warnings
    from transferkit.data.splits import assign_roles

    index = {p: i for i, p in enumerate(folder.paths)}
    rows = [index[p] for p, good in zip(paths, result.ok, strict=True) if good]
    roles = None
    if folder.labelled:
        # The rows carry each image's split: say so when a copy of one image sits in two splits.
        hashes = FileHashes(cache.root).hashes([folder.abs_path(p) for p in folder.paths])  # remembered: no re-read
        for message in dataset_warnings(folder, hashes):
            log.warning(message)
        used = np.zeros(len(folder.paths), dtype=bool)
        used[rows] = True
        # Train's rule, not the folders' names: a train/val folder's val/ is train's test split (and a
        # share of train/ its early-stopping val), so the split column is the split train uses.
        roles = assign_roles(folder, used, seed, check=False)
    vectors, views = result.vectors[result.ok], None
    if augment_views:  # K + 1 rows per image, image by image: view 0 (the image), then its views 1..K
        vectors = np.concatenate([vectors[:, None], result.view_vectors[result.ok]], axis=1)
        vectors = vectors.reshape(-1, vectors.shape[-1])
        rows = np.repeat(rows, augment_views + 1).tolist()
        views = np.tile(np.arange(augment_views + 1), len(rows) // (augment_views + 1))
    labelled = {} if roles is None else {"labels": folder.labels[rows], "class_names": folder.class_names,
                                         "splits": [str(roles[i]) for i in rows]}
    write_features(output, file_format, [folder.paths[i] for i in rows], vectors=vectors, views=views, **labelled)
    return len(rows), result.vectors.shape[1]
