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
from transferkit.models.registry import BackboneSpec

#: Folder inside the package holding the small starter weights that ship with transferkit.
BUNDLED_WEIGHTS_DIR = Path(__file__).parents[1] / "assets" / "weights"

#: Seconds to wait for a weights download to start before calling the machine offline.
DOWNLOAD_TIMEOUT = 20


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

# The file_hash Keras passes to get_file for each no-top file (md5, or sha256 for ConvNeXt).
# MobileNet v1/v2 files are absent: Keras checks no hash for them.
_NO_TOP_HASHES = {
    "weights_mobilenet_v3_small_minimalistic_224_1.0_float_no_top_v2.h5":
        "cde8136e733e811080d9fcd8a252f7e4",
    "weights_mobilenet_v3_small_224_0.75_float_no_top_v2.h5": "ebdb5cc8e0b497cd13a7c275d475c819",
    "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5": "d3e8ec802a04aa4fc771ee12a9a9b836",
    "weights_mobilenet_v3_large_minimalistic_224_1.0_float_no_top_v2.h5":
        "ec5221f64a2f6d1ef965a614bdae7973",
    "weights_mobilenet_v3_large_224_0.75_float_no_top_v2.h5": "40af19a13ebea4e2ee0c676887f69a2e",
    "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5": "07fb09a5933dd0c8eaafa16978110389",
    "efficientnetb0_notop.h5": "50bc09e76180e00e4465e1a485ddc09d",
    "efficientnetb1_notop.h5": "74c4e6b3e1f6a1eea24c589628592432",
    "efficientnetb2_notop.h5": "111f8e2ac8aa800a7a99e3239f7bfb39",
    "efficientnetb3_notop.h5": "af6d107764bb5b1abb91932881670226",
    "efficientnetb4_notop.h5": "ebc24e6d6c33eaebbd558eafbeedf1ba",
    "efficientnetb5_notop.h5": "38879255a25d3c92d5e44e04ae6cec6f",
    "efficientnetb6_notop.h5": "9ecce42647a20130c1f39a5d4cb75743",
    "efficientnetb7_notop.h5": "cbcfe4450ddf6f3ad90b1b398090fe4a",
    "efficientnetv2-b0_notop.h5": "893217f2bb855e2983157299931e43ff",
    "efficientnetv2-b1_notop.h5": "0e80663031ca32d657f9caa404b6ec37",
    "efficientnetv2-b2_notop.h5": "1dfe2e7a5d45b6632553a8961ea609eb",
    "efficientnetv2-b3_notop.h5": "f6abf7b5849ac99a89b50dd3fd532856",
    "efficientnetv2-s_notop.h5": "af0682fb74e8c54910f2d4393339c070",
    "efficientnetv2-m_notop.h5": "1b8dc055df72dde80d614482840fe342",
    "efficientnetv2-l_notop.h5": "b0b66b5c863aef5b46e8608fe1711615",
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5": "ee4c566cf9a93f14d82f913c2dc6dd0c",
    "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "fac2f116257151a9d068a22e544a4917",
    "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "c0ed64b8031c3730f411d2eb4eea35b5",
    "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5": "ed17cf2e0169df9d443503ef94b23b33",
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5": "6d6bbae143d832006294945121d1f1fc",
    "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5": "253f8cb515780f3b799900260a226db6",
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5": "bcbd6486424b2319ff4ef7d526e38f63",
    "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5":
        "d19885ff4a710c122648d3b5c3b684e4",
    "xception_weights_tf_dim_ordering_tf_kernels_notop.h5": "b0042744bf5b25fce3cb969f33bebb97",
    "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5": "30ee3e1110167f948a6b9946edeeb738",
    "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5": "b8c4d4c20dd625c148057b9ff1c1176b",
    "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5": "c13680b51ded0fb44dff2d8f86ac8bb1",
    "nasnet_mobile_no_top.h5": "1ed92395b5b598bdda52abe5c0dbfd63",
    "nasnet_large_no_top.h5": "d81d89dc07e6e56530c4e77faddd61b5",
    "convnext_tiny_notop.h5": "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
    "convnext_small_notop.h5": "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
    "convnext_base_notop.h5": "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
    "convnext_large_notop.h5": "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd",
    "convnext_xlarge_notop.h5": "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05",
}


def keras_weights_file(spec: BackboneSpec, image_size: int | None = None) -> tuple[str, str, str | None] | None:
    """The ``(file_name, origin_url, file_hash)`` Keras fetches for ``weights="imagenet"``.

    Mirrors each ``keras.applications`` constructor called with ``include_top=False`` at
    ``image_size`` (None = native), so the file can be found in ``$KERAS_HOME/models/`` or
    fetched with ``keras.utils.get_file(file_name, origin_url, cache_subdir="models",
    file_hash=file_hash)``. MobileNet v1/v2 pick the file by input size and fall back to 224
    for other sizes, as Keras does; ``file_hash`` is None where Keras checks none.

    Returns:
        The triple, or None for backbones without Keras ImageNet weights (test, plug-ins).

    Example:
        >>> from transferkit.models.registry import get_backbone
        >>> keras_weights_file(get_backbone("mobilenet"), 160)[0]
        'mobilenet_1_0_160_tf_no_top.h5'
    """
    prefix = "keras.applications."
    if not spec.pretrained or not spec.constructor.startswith(prefix):
        return None
    rows = spec.input_size if image_size is None else int(image_size)
    family, ctor = spec.family, spec.constructor[len(prefix):]
    alpha = spec.kwargs.get("alpha", 1.0)
    url_dir = _KERAS_URL + family + "/"  # the folder is the family name, except where set below
    if family == "mobilenet":
        rows = rows if rows in (128, 160, 192, 224) else 224
        alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0"}.get(alpha, "2_5")
        file_name = f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"
    elif family == "mobilenet_v2":
        rows = rows if rows in (96, 128, 160, 192, 224) else 224
        file_name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    elif family == "mobilenet_v3":  # always the 224 file; Keras only warns for other sizes
        minimal = "_minimalistic" if spec.kwargs.get("minimalistic") else ""
        model_type = ctor[len("MobileNetV3"):].lower()
        file_name = f"weights_mobilenet_v3_{model_type}{minimal}_224_{alpha}_float_no_top_v2.h5"
    elif family == "efficientnet":  # file = the model's default name; this one base URL lacks "tensorflow/"
        file_name = f"{ctor.lower()}_notop.h5"
        url_dir = "https://storage.googleapis.com/keras-applications/"
    elif family == "efficientnet_v2":
        file_name = f"efficientnetv2-{ctor[len('EfficientNetV2'):].lower()}_notop.h5"
    elif family == "convnext":
        file_name = f"convnext_{ctor[len('ConvNeXt'):].lower()}_notop.h5"
    elif family in ("resnet", "resnet_v2"):
        file_name = f"{ctor.lower()}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        url_dir = _KERAS_URL + "resnet/"
    elif family in ("vgg", "densenet", "inception_v3", "inception_resnet_v2", "xception"):
        base = ctor.lower() if family in ("vgg", "densenet") else family  # vgg16, densenet121, xception
        file_name = f"{base}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        url_dir = _KERAS_URL + ("densenet" if family == "densenet" else base) + "/"
    elif family == "nasnet":  # cached as nasnet_mobile_no_top.h5, served as NASNet-mobile-no-top.h5
        size_name = ctor[len("NASNet"):].lower()
        file_name = f"nasnet_{size_name}_no_top.h5"
        return file_name, f"{url_dir}NASNet-{size_name}-no-top.h5", _NO_TOP_HASHES[file_name]
    else:
        return None
    return file_name, url_dir + file_name, _NO_TOP_HASHES.get(file_name)


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
        >>> from transferkit.models.registry import get_backbone
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
        >>> from transferkit.models.registry import get_backbone
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
        The flat Keras model from :func:`transferkit.models.build.build_backbone` (raw RGB 0-255
        in, pooled features out; ``mirror``: flip-averaged, see :func:`build_backbone`).
    """
    from transferkit.models.build import build_backbone

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
