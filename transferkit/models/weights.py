"""Where a backbone's ImageNet weights come from: Keras' cache, the bundled starter file, a
download through Keras, or a file given by path.

Resolution happens before any other work, so a missing file fails a job at its start, with the
file name Keras looks for, the folder it looks in, and how to supply it.  This module imports
Keras only inside the functions that build models.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transferkit import files
from transferkit.errors import InputError, WeightsError
from transferkit.models.backbones import BackboneSpec, keras_weights_file

#: Folder inside the package holding the small starter weights that ship with transferkit.
BUNDLED_WEIGHTS_DIR = Path(__file__).parents[1] / "assets" / "weights"

#: Seconds to wait for a weights download to start before calling the machine offline.
DOWNLOAD_TIMEOUT = 20


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights for one backbone come from.

    Attributes:
        kind: ``"imagenet"`` (Keras cache, bundled copy or fresh download), ``"file"`` (a path
            the user gave) or ``"random"`` (no pretraining).
        path: the weights file, or ``None`` for random initialisation.
        source: a short human description, e.g. ``"Keras cache: ~/.keras/models/x.h5"``.
    """

    kind: str
    path: Path | None
    source: str

    @property
    def keras_arg(self) -> str | None:
        """The value to pass as ``weights=`` to a ``keras.applications`` constructor."""
        return None if self.path is None else str(self.path)


def keras_home() -> Path:
    """Keras' base folder, found exactly as ``keras.src.backend.config`` finds it.

    Mirrored rather than imported because importing Keras costs seconds and starts TensorFlow.
    """
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]).expanduser()
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def keras_models_dir() -> Path:
    """The folder ``keras.utils.get_file(..., cache_subdir="models")`` reads and writes.

    Like Keras, falls back to ``/tmp/.keras`` when the Keras home is not writable.
    """
    base = keras_home()
    if base.exists() and not os.access(base, os.W_OK):
        base = Path(tempfile.gettempdir()) / ".keras"
    return base / "models"


def find_offline(spec: BackboneSpec, image_size: int | None = None) -> Path | None:
    """The local ImageNet weights file for a backbone, or ``None`` if a download would be needed.

    Looks in Keras' cache first (the real Keras path), then in the files bundled with transferkit.

    Example:
        >>> from transferkit.models.backbones import get_backbone
        >>> find_offline(get_backbone("mobilenet_v2_035")).name
        'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5'
    """
    info = keras_weights_file(spec, image_size)
    if info is None:
        return None
    file_name = info[0]
    for folder in (keras_models_dir(), BUNDLED_WEIGHTS_DIR):
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(
    spec: BackboneSpec, weights: str = "imagenet", image_size: int | None = None, *, download: bool = True
) -> ResolvedWeights:
    """Find the weights for a backbone before any work starts.

    Args:
        spec: the backbone.
        weights: ``"imagenet"``, ``"none"`` (random initialisation) or a path to a weights file.
        image_size: input size; MobileNet v1/v2 use a different ImageNet file per size.
        download: try Keras' download when the file is not cached (``False`` = offline only).

    Returns:
        ResolvedWeights naming the file to load.

    Raises:
        WeightsError: ImageNet weights are neither cached, bundled nor downloadable.
        InputError: a weights path that does not exist.

    Example:
        >>> from transferkit.models.backbones import get_backbone
        >>> resolve_weights(get_backbone("mobilenet_v2_035"), "none").kind
        'random'
    """
    choice = str(weights).strip()
    if choice.lower() in ("none", "random"):
        return ResolvedWeights("random", None, "random initialisation (no pretraining)")
    if choice.lower() != "imagenet":
        path = Path(choice).expanduser()
        if not path.is_file():
            raise InputError(
                f"Weights file '{choice}' does not exist. Pass --weights imagenet, --weights none, "
                "or the path of a Keras weights file (.h5 or .weights.h5)."
            )
        return ResolvedWeights("file", path.resolve(), f"file: {path}")

    info = keras_weights_file(spec, image_size)
    if not spec.pretrained or info is None:
        raise WeightsError(
            f"Backbone '{spec.name}' has no ImageNet weights. Use --weights none (random "
            "initialisation) or --weights PATH."
        )
    file_name, origin, file_hash = info
    local = find_offline(spec, image_size)
    if local is not None:
        where = "bundled starter weights" if local.parent == BUNDLED_WEIGHTS_DIR else "Keras cache"
        return ResolvedWeights("imagenet", local, f"{where}: {local}")

    reason = "downloads are switched off"
    if download:
        try:
            return ResolvedWeights("imagenet", _download(file_name, origin, file_hash), f"downloaded: {origin}")
        except Exception as exc:  # noqa: BLE001 - any failure means "not available here"; reported below
            reason = f"download failed: {_short(exc)}"
    raise WeightsError(missing_weights_message(spec, file_name, origin, reason))


def missing_weights_message(spec: BackboneSpec, file_name: str, origin: str, reason: str) -> str:
    """The message for ImageNet weights that are not on this machine: what, where, how to fix."""
    return (
        f"ImageNet weights for backbone '{spec.name}' are not on this machine ({reason}).\n"
        f"  Keras looks for: {file_name}\n"
        f"  in: {keras_models_dir()}  (set KERAS_HOME to use another Keras folder)\n"
        "To fix, do one of:\n"
        f"  - on a machine with a network, download {origin}\n"
        f"    then run: transferkit weights import {file_name} --backbone {spec.name}\n"
        "  - pass the file directly: --weights PATH\n"
        "  - train from random initialisation: --weights none (expect poor accuracy)\n"
        "Run 'transferkit backbones' to see which backbones have weights offline."
    )


def _download(file_name: str, origin: str, file_hash: str | None) -> Path:
    """Download through Keras' own ``get_file`` into its cache, with a start-up timeout."""
    from transferkit.runtime import start_tensorflow

    start_tensorflow()
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # urlretrieve has no timeout argument
    try:
        # cache_dir given explicitly: Keras reads KERAS_HOME once at import, this reads it now.
        path = keras.utils.get_file(
            file_name, origin, cache_dir=str(keras_models_dir().parent), cache_subdir="models", file_hash=file_hash
        )
    finally:
        socket.setdefaulttimeout(previous)
    return Path(path)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def load_backbone(spec: BackboneSpec, resolved: ResolvedWeights, image_size: int | None = None, *,
                  mirror: bool = False):
    """Build the backbone with its weights; a file that does not fit raises WeightsError.

    Returns:
        The flat Keras model from :func:`transferkit.models.backbones.build_backbone` (raw RGB 0-255
        in, pooled features out; ``mirror``: flip-averaged, see :func:`build_backbone`).
    """
    from transferkit.models.backbones import build_backbone

    try:
        return build_backbone(spec, weights=resolved.keras_arg, image_size=image_size, mirror=mirror)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py/Keras raise many types for a bad file
        if resolved.path is None:
            raise
        raise WeightsError(
            f"Weights file '{resolved.path}' could not be loaded into backbone '{spec.name}' "
            f"({_short(exc)}). Expected Keras weights for {spec.name} without the classification "
            "top (include_top=False). Check the file and the --backbone name, or delete the file "
            "from the cache so it is downloaded again."
        ) from exc


def weights_fingerprint(model) -> str:
    """A hash of a model's weight values: the identity of whatever weights were loaded.

    Hashing the loaded tensors (not the file) covers every source alike: two files with the same
    values agree, random initialisation is identified by its seed's values, and a changed file
    can never be mistaken for the old one.
    """
    digest = hashlib.sha256()
    # Values and shapes in layer order, not variable names: Keras numbers unnamed layers per
    # session, so names would change between two builds of the same backbone in one process.
    for variable in model.weights:
        value = variable.numpy()
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


def import_weights(file: str | os.PathLike, spec: BackboneSpec, image_size: int | None = None) -> Path:
    """Verify a downloaded weights file by loading it, then place it in Keras' cache.

    Args:
        file: the weights file (for example downloaded on another machine).
        spec: the backbone it belongs to.
        image_size: the input size the file is for (MobileNet v1/v2 have one file per size).

    Returns:
        The path in Keras' cache, where ``weights="imagenet"`` finds it from now on.

    Raises:
        WeightsError: the file does not load into the backbone.
    """
    source = Path(file).expanduser()
    if not source.is_file():
        raise InputError(f"Weights file '{file}' does not exist.")
    info = keras_weights_file(spec, image_size)
    if info is None:
        raise WeightsError(f"Backbone '{spec.name}' has no ImageNet weights file to import.")
    load_backbone(spec, ResolvedWeights("file", source, f"file: {source}"), image_size)
    target_dir = keras_models_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / info[0]
    with files.atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target
