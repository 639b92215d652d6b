"""Bottleneck feature cache: vectors keyed by image content and by everything that shapes them.

Layout: ``CACHE_DIR/<backbone>-<spec key>/`` holds ``spec.json`` (the settings behind the key)
and ``shard-*.npz`` files, each with the content hashes of its images and their vectors.  A shard
is written to a temporary file and renamed into place, so an interrupted run leaves only whole
shards and the next run computes just what is missing.  A shard that fails to read (bad zip CRC,
wrong shapes) is reported and ignored, so its images are computed again rather than trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from transferkit import files
from transferkit.errors import CacheError

log = logging.getLogger("transferkit")

#: Bumped whenever the meaning of a stored vector changes; old entries then stop matching.
FORMAT_VERSION = 1

#: How the loader resizes (see transferkit.data.load_image); part of every key.
RESIZE_METHOD = "pillow-bilinear-squash"


def default_cache_dir() -> Path:
    """``$TRANSFERKIT_CACHE_DIR``, else the platform's user cache folder (``~/.cache/transferkit``)."""
    if os.environ.get("TRANSFERKIT_CACHE_DIR"):
        return Path(os.environ["TRANSFERKIT_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("transferkit"))


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that changes a feature vector besides the image bytes.

    Example:
        >>> spec = FeatureSpec("mobilenet_v2_035", "ab12", 224, "tf")
        >>> len(spec.key())
        16
    """

    backbone: str
    weights_id: str
    image_size: int
    preprocessing: str
    pooling: str = "avg"
    layer: str = "pooled"
    resize: str = RESIZE_METHOD
    dtype: str = "float32"
    version: int = FORMAT_VERSION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes: the image part of a cache key (renaming keeps it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    """The vectors of one :class:`FeatureSpec`, keyed by image content hash.

    Args:
        cache_dir: the cache root (several specs share it, each in its own sub-folder).
        spec: the settings these vectors were computed with.
    """

    def __init__(self, cache_dir: str | os.PathLike, spec: FeatureSpec):
        self.spec = spec
        self.dir = Path(cache_dir) / f"{spec.backbone}-{spec.key()}"
        self._index: dict[str, np.ndarray] | None = None
        self.bad_shards: list[Path] = []

    def _load(self) -> dict[str, np.ndarray]:
        if self._index is None:
            self._index = {}
            for shard in sorted(self.dir.glob("shard-*.npz")):
                try:
                    with np.load(shard, allow_pickle=False) as data:
                        keys, vectors = data["keys"], data["vectors"]
                    if vectors.ndim != 2 or len(keys) != len(vectors):
                        raise ValueError(f"keys {keys.shape} do not match vectors {vectors.shape}")
                except Exception as exc:  # noqa: BLE001 - any unreadable shard is recomputed
                    # Renamed aside (kept for inspection) so it is reported once, not on every run.
                    bad = shard.with_suffix(".bad")
                    log.warning("Damaged cache shard %s (%s): its vectors will be computed again; "
                                "moved to %s.", shard, exc, bad.name)
                    with contextlib.suppress(OSError):
                        shard.rename(bad)
                    self.bad_shards.append(shard)
                    continue
                self._index.update(zip(keys.tolist(), vectors, strict=True))
        return self._index

    def __len__(self) -> int:
        return len(self._load())

    def get(self, hashes: Sequence[str]) -> list[np.ndarray | None]:
        """The cached vector for each hash, ``None`` where it is missing."""
        index = self._load()
        return [index.get(h) for h in hashes]

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors as one new shard, atomically (temporary file, then rename)."""
        if len(hashes) == 0:
            return
        vectors = np.asarray(vectors, dtype=self.spec.dtype)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            spec_path = self.dir / "spec.json"
            if not spec_path.exists():
                files.write_json(spec_path, asdict(self.spec))
            # Unique shard names let two processes add to one cache without a lock.
            name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
            with files.atomic_path(self.dir / name, suffix=".npz") as tmp:
                np.savez(tmp, keys=np.asarray(hashes, dtype="U64"), vectors=vectors)
        except OSError as exc:
            raise CacheError(
                f"Cannot write to the feature cache '{self.dir}': {exc.strerror or exc}. "
                "Free some space or choose another folder with --cache-dir."
            ) from exc
        self._load().update(zip(hashes, vectors, strict=True))


@dataclass
class ExtractionResult:
    """Features for a list of images, in their order.

    Attributes:
        vectors: ``(n, feature_dim)`` float32; rows of failed images are zeros.
        ok: ``(n,)`` bool, False where the image could not be decoded.
        errors: ``{index: reason}`` for the failed images.
        num_cached: vectors found in the cache.
        num_computed: vectors computed by the backbone in this call.
        seconds: wall time of the backbone pass.
    """

    vectors: np.ndarray
    ok: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    num_cached: int = 0
    num_computed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.num_computed / self.seconds if self.seconds > 0 else 0.0

    def skipped_files(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """``(name, reason)`` of the images that failed, given the names of all images in order."""
        return [(names[i], reason) for i, reason in sorted(self.errors.items())]

    def summary(self) -> str:
        """``"500 computed (78.6 images/s), 0 from cache"``; no rate when nothing was computed."""
        rate = f" ({self.images_per_second:.1f} images/s)" if self.num_computed else ""
        return f"{self.num_computed} computed{rate}, {self.num_cached} from cache"


def extract_features(
    model,
    paths: Sequence[Path],
    cache: FeatureCache | None,
    *,
    batch_size: int = 32,
    flush_every: int = 512,
    verbose: int = 1,
) -> ExtractionResult:
    """Pooled features for every image: from the cache where present, one backbone pass for the rest.

    Vectors are written to the cache every ``flush_every`` images, so an interrupted extraction
    keeps its finished work and the next call resumes from there.

    Args:
        model: the backbone from :func:`transferkit.weights.load_backbone`.
        paths: image files.
        cache: where to look up and store vectors; ``None`` computes everything.
        batch_size: images per backbone call.
        flush_every: images between cache writes.
        verbose: 1 shows a Keras progress bar.
    """
    import keras

    from transferkit.data import image_dataset, load_image

    image_size = int(model.input_shape[1])
    feature_dim = int(model.output_shape[-1])
    n = len(paths)
    vectors = np.zeros((n, feature_dim), dtype=np.float32)
    ok = np.ones(n, dtype=bool)
    errors: dict[int, str] = {}

    hashes: list[str | None] = [None] * n
    missing: list[int] = list(range(n))
    if cache is not None:  # without a cache (predict, evaluate) there is nothing to look up
        for i, path in enumerate(paths):
            try:
                hashes[i] = hash_file(path)
            except OSError as exc:
                ok[i] = False
                errors[i] = f"cannot read file: {exc.strerror or exc}"
        readable = [i for i in range(n) if hashes[i] is not None]
        found = cache.get([hashes[i] for i in readable])
        missing = []
        for i, vector in zip(readable, found, strict=True):
            if vector is None:
                missing.append(i)
            else:
                vectors[i] = vector
    num_cached = n - len(missing) - len(errors)

    start = time.perf_counter()
    if missing:
        predict = _compiled_predict(model)
        dataset = image_dataset([paths[i] for i in missing], image_size, batch_size)
        progress = keras.utils.Progbar(len(missing), unit_name="image", verbose=verbose)
        pending_keys: list[str] = []
        pending_vectors: list[np.ndarray] = []
        done = 0
        for images, flags in dataset:
            batch_vectors = predict(images).numpy()
            flags = flags.numpy()
            for j, (vector, good) in enumerate(zip(batch_vectors, flags, strict=True)):
                i = missing[done + j]
                if good:
                    vectors[i] = vector
                    pending_keys.append(hashes[i])
                    pending_vectors.append(vector)
                else:
                    ok[i] = False
                    errors[i] = _decode_error(load_image, paths[i], image_size)
            done += len(flags)
            progress.update(done)
            if cache is not None and len(pending_keys) >= flush_every:
                cache.put(pending_keys, np.stack(pending_vectors))
                pending_keys, pending_vectors = [], []
        if cache is not None and pending_keys:
            cache.put(pending_keys, np.stack(pending_vectors))
    seconds = time.perf_counter() - start
    num_computed = len(missing) - sum(1 for i in missing if not ok[i])
    return ExtractionResult(vectors, ok, errors, num_cached, num_computed, seconds)


def _compiled_predict(model):
    """One traced inference function (``model.predict`` per batch would re-trace and is slower)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def predict(images):
        return model(images, training=False)

    return predict


def _decode_error(load_image, path: Path, image_size: int) -> str:
    """The reason an image failed inside the tf.data pipeline, recovered by decoding it again."""
    try:
        load_image(path, image_size)
    except Exception as exc:  # noqa: BLE001 - the reason is reported, the file skipped
        return f"cannot decode image: {exc}"
    return "cannot decode image"
