"""Bottleneck feature cache: vectors keyed by image content and by everything that shapes them.

The names below are the cache's public API (what the CLI, training and the comparison use); each
lives in the module that owns its part:

* :mod:`transferkit.cache.keys` - what identifies a vector: :class:`FeatureSpec` (settings and
  format version), :func:`hash_file` (image bytes), :class:`FileHashes` (hashes remembered by
  path and file status: size, nanosecond mtime and ctime, inode, device);
* :mod:`transferkit.cache.store` - the on-disk layout and :class:`FeatureCache`: content-named,
  checksummed HDF5 shards written atomically, damaged shards set aside;
* :mod:`transferkit.cache.extraction` - :func:`extract_features`: look up, read each missing image
  once (the bytes hashed are the bytes decoded), run the backbone, write as it goes so an
  interrupted run resumes;
* :mod:`transferkit.cache.maintenance` - ``cache info|verify [--deep]|prune|merge``;
* :mod:`transferkit.cache.views` - augmented views: a head trains with augmentation, the backbone
  runs once per view;
* :mod:`transferkit.cache.folder` - a whole folder's features (``extract``, ``features export``);
* :mod:`transferkit.cache.feature_files` - ``features export`` to npz, parquet or CSV.

Example:
    >>> from transferkit.cache import FeatureCache, FeatureSpec, extract_features
    >>> cache = FeatureCache("runs/cache", FeatureSpec.for_model(spec, model))  # doctest: +SKIP
    >>> extract_features(model, paths, cache).summary()  # doctest: +SKIP
    '500 computed (78.6 images/s), 0 from cache'
"""

from transferkit.cache.extraction import ExtractionResult, extract_features
from transferkit.cache.feature_files import FEATURE_FORMATS, write_features
from transferkit.cache.keys import FeatureSpec, FileHashes, hash_file
from transferkit.cache.maintenance import cache_summary, merge_caches, prune_cache, verify_cache, verify_vectors
from transferkit.cache.store import FeatureCache, default_cache_dir

__all__ = [
    "FEATURE_FORMATS",
    "ExtractionResult",
    "FeatureCache",
    "FeatureSpec",
    "FileHashes",
    "cache_summary",
    "default_cache_dir",
    "extract_features",
    "hash_file",
    "merge_caches",
    "prune_cache",
    "verify_cache",
    "verify_vectors",
    "write_features",
]
