"""TensorFlow Datasets as inputs: ``tfds:NAME[:SPLIT]`` wherever a command takes an image folder.

Design: a TFDS image classification split is written out **once** as an ordinary folder of class
folders, holding the dataset's own encoded image bytes (JPEG or PNG, never re-encoded), and from
then on it *is* an image folder. So everything built on folders works unchanged and needs no TFDS
branch: the content-hash feature cache (a TFDS image and the same file elsewhere share a vector),
the stable hash split, ``splits.csv``, reports with thumbnails of mistakes, Grad-CAM, ``predict``
on the files, ``report --feature-map`` (the run records the folder). The alternative, a ``tf.data``
pipeline straight from TFDS, would need a second path through the cache (keyed by content, so it
would hash every image on every run anyway), the splits and every report; the folder costs one
copy of the compressed images on disk (tf_flowers: about 220 MB; MNIST: 70,000 small PNG files).

Where: ``$TRANSFERKIT_DATA_DIR`` (default: the user data folder, e.g. ``~/.local/share/transferkit``)
``/tfds/NAME[/CONFIG]/VERSION/SPLITS/images/``, files named by TFDS's stable example id
(``tf_flowers-train.tfrecord-00000-of-00002__12.jpg``), classes named by the ``ClassLabel`` feature
and kept in TFDS's label order (label 0 is TFDS's label 0). The folder is written beside its final
place and renamed into it when complete, with ``manifest.json`` beside ``images/``; a folder
with its manifest and every file is reused, anything else is written again. Two processes writing
at once each write their own copy and the first rename wins.

Splits:

- ``tfds:NAME``: TFDS's own ``train``/``validation``/``test`` splits become ``train/``,
  ``validation/`` and ``test/`` folders, i.e. transferkit's pre-split folders (``tfds:mnist``
  trains on MNIST's 60,000 training images and reports on its 10,000 test images; early
  stopping takes a stable share of train when there is no validation split). A dataset with only
  ``train`` (``tfds:tf_flowers``) gets transferkit's seeded, stratified hash split. Other splits
  (``extra``, ``unlabeled``) are not used.
- ``tfds:NAME:SPLIT``: exactly that split, in TFDS's split syntax (``test``, ``train[:10%]``,
  ``train+test``), as one pool that transferkit splits by hash; e.g. ``transferkit evaluate RUN
  tfds:mnist:test``.
- ``NAME`` may carry a config and a version as TFDS spells them: ``tfds:cifar10:3.0.2:test``.

The prepared TFDS data itself is found where TFDS looks (``$TFDS_DATA_DIR``, default
``~/tensorflow_datasets``). When it is missing, TFDS downloads and prepares it (needs a network);
offline, the error names the dataset and how to prepare it elsewhere. Once written, the folder is
reused without TFDS's copy.

Example:
    >>> prepared = prepare_tfds("tfds:tf_flowers")  # doctest: +SKIP
    >>> prepared.root, prepared.class_names  # doctest: +SKIP
    (PosixPath('~/.local/share/transferkit/tfds/tf_flowers/3.0.1/train/images'), ('dandelion', 'daisy', ...))
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from transferkit.data.images import IMAGE_EXTENSIONS
from transferkit.data.names import class_folder_names
from transferkit.errors import DataError, InputError

log = logging.getLogger("transferkit")

PREFIX = "tfds:"
MANIFEST = "manifest.json"
#: The image folder inside a prepared split's folder (the manifest sits beside it, not among the classes).
IMAGES = "images"
_FORMAT = 1
# TFDS's conventional split names -> the folder transferkit's scanner reads as that split.
_ROLE_SPLITS = ("train", "validation", "test")
_VERSION = re.compile(r"^\d+\.(\d+|\*)\.(\d+|\*)$")
_SPLIT_NAME = re.compile(r"[A-Za-z_][\w-]*")
#: Seconds the download hosts get to answer before the machine counts as offline. TFDS itself retries a
#: failed connection 10 times with growing pauses: 3.5 minutes before it gives up.
NETWORK_PROBE_SECONDS = 3.0
#: Where TFDS keeps most datasets' files; probed when a dataset does not list its download URLs.
_DEFAULT_DOWNLOAD_URL = "https://storage.googleapis.com/"


def is_tfds_name(value) -> bool:
    """Whether an image-folder argument names a TensorFlow Datasets dataset (``tfds:...``)."""
    return isinstance(value, str) and value.startswith(PREFIX)


@dataclass(frozen=True)
class TfdsName:
    """A parsed ``tfds:NAME[:VERSION][:SPLIT]``: ``name`` may hold a config (``NAME/CONFIG``)."""

    name: str
    version: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return PREFIX + ":".join(part for part in (self.name, self.version, self.split) if part)


def parse_tfds_name(text: str) -> TfdsName:
    """Split ``tfds:NAME[:VERSION][:SPLIT]`` into its parts; no TensorFlow needed.

    Raises:
        InputError: not of that form.

    Example:
        >>> parse_tfds_name("tfds:mnist:test")
        TfdsName(name='mnist', version=None, split='test')
        >>> parse_tfds_name("tfds:cifar10:3.0.2:train[:10%]").version
        '3.0.2'
    """
    if not is_tfds_name(text):
        raise InputError(f"'{text}' is not a TensorFlow Datasets name; expected tfds:NAME[:SPLIT], e.g. tfds:mnist.")
    name, sep, rest = text[len(PREFIX):].partition(":")
    first, sep_after, after = rest.partition(":")
    version = None
    if _VERSION.match(first):
        version, sep, rest = first, sep_after, after
    split = rest.strip() or None
    # A colon outside brackets (train[:10%] has one inside) or a trailing colon is not a split.
    bad_split = ":" in re.sub(r"\[[^\]]*\]", "", split or "") or (sep and not split)
    if not re.fullmatch(r"[a-z0-9_]+(/[\w.-]+)?", name) or bad_split:
        raise InputError(
            f"Cannot read the TensorFlow Datasets name '{text}': expected tfds:NAME[:SPLIT], e.g. tfds:tf_flowers "
            f"or tfds:mnist:test (NAME as in the TFDS catalog, lower-case, optionally NAME/CONFIG).")
    return TfdsName(name, version, split)


@dataclass(frozen=True)
class PreparedTfds:
    """A TFDS split written out as an image folder.

    Attributes:
        root: The image folder (class folders, or ``train/``, ``validation/``, ``test/`` holding them).
        class_names: Classes that have images, in TFDS's label order (folder-safe names).
        counts: ``folder split ("" when unsplit) -> class name -> images``.
        reused: False when this call wrote the folder.
    """

    root: Path
    class_names: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    reused: bool


def default_data_dir() -> Path:
    """``$TRANSFERKIT_DATA_DIR``, else the platform's user data folder (``~/.local/share/transferkit``)."""
    if os.environ.get("TRANSFERKIT_DATA_DIR"):
        return Path(os.environ["TRANSFERKIT_DATA_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("transferkit"))


def prepare_tfds(text: str, *, data_dir: str | os.PathLike | None = None, tfds_data_dir: str | None = None,
                 download: bool = True) -> PreparedTfds:
    """The image folder of ``tfds:NAME[:SPLIT]``: written on first use, then reused.

    Args:
        text: ``tfds:NAME[:VERSION][:SPLIT]`` (see the module docstring for the splits).
        data_dir: Where transferkit keeps such folders; default :func:`default_data_dir`.
        tfds_data_dir: TFDS's own data folder; default TFDS's (``$TFDS_DATA_DIR``).
        download: Let TFDS download and prepare a dataset it does not have yet.

    Returns:
        A :class:`PreparedTfds`.

    Raises:
        InputError: a malformed name or split.
        DataError: unknown dataset, not an image classification set, or not prepared and not downloadable.
    """
    source = parse_tfds_name(text)
    from transferkit import runtime

    runtime.start_tensorflow()
    import tensorflow_datasets as tfds

    builder = _builder(tfds, source, tfds_data_dir)
    image_key, label_key = _feature_keys(builder, source)
    base = Path(data_dir or default_data_dir()) / "tfds" / builder.info.full_name
    target, manifest = _written_before(base, source)  # then TFDS's own copy is not needed any more
    if manifest is None:
        if not builder.is_prepared():
            _download(builder, source, download)
        plan = _plan(builder, source)
        target = base / _plan_key(plan)
        manifest = _read_complete(target)
    if manifest is None:
        manifest = _materialise(tfds, builder, source, plan, image_key, label_key, target)
        reused = False
    else:
        reused = True
        log.info("%s: reusing the images written to %s.", source, target)
    with_images = {name for counts in manifest["counts"].values() for name, n in counts.items() if n}
    classes = tuple(name for name in manifest["folder_names"] if name in with_images)
    return PreparedTfds(target / IMAGES, classes, manifest["counts"], reused)


# ----------------------------------------------------------------------------- the TFDS side


def _builder(tfds, source: TfdsName, tfds_data_dir: str | None):
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    # Read TFDS_DATA_DIR now: TFDS reads it once, when it is first imported.
    tfds_data_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
    kwargs = {"data_dir": tfds_data_dir} if tfds_data_dir else {}
    if source.version:
        kwargs["version"] = source.version
    try:
        return tfds.builder(source.name, **kwargs)
    except DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(source.name.split("/")[0], list(dict.fromkeys(known)), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise DataError(f"Unknown TensorFlow Datasets name '{source.name}' in '{source}'.{hint} The catalog lists "
                        f"the names (tfds.list_builders() in Python); image classification sets such as "
                        f"tf_flowers, mnist, cifar10 work.") from None
    except (ValueError, AssertionError) as exc:  # unknown config or version
        message = re.split(r'builder_kwargs "[^"]*": ', str(exc))[-1]  # drop TFDS's "Failed to construct ..."
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        message = " ".join(lines[:-1] if len(lines) > 1 and lines[-1].endswith(":") or lines[-1:] == lines
                           and lines[0].endswith(":") and "Here are" in lines[0] else lines)
        raise DataError(f"TensorFlow Datasets cannot load '{source}': {message.strip()[:600]}") from None


def _feature_keys(builder, source: TfdsName) -> tuple[str, str]:
    """``(image feature, label feature)``: the supervised keys, else the one Image and ClassLabel."""
    import tensorflow_datasets as tfds

    features = dict(builder.info.features.items())
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) and k in features for k in keys):
        image_key, label_key = keys
    else:
        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
        image_key = images[0] if len(images) == 1 else "image"
        label_key = labels[0] if len(labels) == 1 else "label"
    if not (isinstance(features.get(image_key), tfds.features.Image)
            and isinstance(features.get(label_key), tfds.features.ClassLabel)):
        found = ", ".join(f"{k}: {type(f).__name__}" for k, f in features.items())
        raise DataError(f"'{source}' is not an image classification dataset: transferkit needs one Image feature and "
                        f"one ClassLabel feature, found {found}.")
    return image_key, label_key


def _download(builder, source: TfdsName, download: bool) -> None:
    root = Path(builder.data_dir).parents[len(builder.info.full_name.split("/")) - 1]
    how = (f"On a machine with a network run 'tfds build {source.name}' (or this same command there), copy its "
           f"'{builder.info.full_name}' folder into a TFDS data folder here and point TFDS_DATA_DIR at it.")
    if not download:
        raise DataError(f"TensorFlow Datasets '{source.name}' is not prepared in '{root}'. {how}")
    unreachable = _unreachable(_download_urls(builder))
    if unreachable:
        raise DataError(f"TensorFlow Datasets '{source.name}' is not prepared in '{root}' and could not be "
                        f"downloaded (no network: {unreachable}). {how}")
    log.info("%s: not prepared in %s; TensorFlow Datasets downloads and prepares it now (needs a network). %s",
             source, root, how)
    try:
        builder.download_and_prepare()
    except Exception as exc:  # noqa: BLE001 - network, checksum, disk: every failure gets the same advice
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"TensorFlow Datasets '{source.name}' is not prepared in '{root}' and could not be "
                        f"downloaded ({type(exc).__name__}: {first[:300]}). {how}") from exc


def _download_urls(builder) -> list[str]:
    """The URLs TFDS will download for a dataset, from its checksums file (else TFDS's own storage)."""
    try:
        urls = [url for url in (builder.url_infos or {}) if isinstance(url, str)]
    except Exception:  # noqa: BLE001 - a dataset without (or with a broken) checksums file
        urls = []
    return urls or [_DEFAULT_DOWNLOAD_URL]


def _unreachable(urls: list[str], timeout: float = NETWORK_PROBE_SECONDS) -> str | None:
    """Why the hosts of ``urls`` cannot be reached within ``timeout`` seconds, or None when they can.

    One TCP connection per host (through the proxy the environment names, as TFDS's requests would),
    all at once in daemon threads, so a name lookup that hangs cannot hold the command either.
    """
    proxies = urllib.request.getproxies()
    targets: dict[tuple[str, int], str] = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parts.hostname:
            port = parts.port or (443 if parts.scheme in ("https", "ftps") else 21 if parts.scheme == "ftp" else 80)
            targets.setdefault((parts.hostname, port), parts.hostname)
    failures: dict[tuple[str, int], str] = {}

    def probe(target: tuple[str, int]) -> None:
        try:
            socket.create_connection(target, timeout=timeout).close()
        except OSError as exc:
            failures[target] = str(exc) or type(exc).__name__
        else:
            failures.pop(target, None)

    threads = []
    for target in list(targets)[:4]:
        failures[target] = f"no answer within {timeout:g} s"  # until the probe says otherwise
        thread = threading.Thread(target=probe, args=(target,), daemon=True, name=f"tfds-probe-{target[0]}")
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout + 0.5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    failed = dict(failures)  # a copy: a probe that answers late may still change the dict
    if not failed:
        return None
    (host, port), reason = next(iter(failed.items()))
    return f"cannot reach {host}:{port}: {reason}"


def _plan(builder, source: TfdsName) -> dict[str, str]:
    """``folder ("" for none) -> TFDS split expression`` to write."""
    available = list(builder.info.splits)
    if source.split:
        names = set(_SPLIT_NAME.findall(re.sub(r"\[[^\]]*\]", "", source.split)))
        unknown = sorted(names - set(available)) if available else []
        if unknown or not names:
            raise InputError(f"'{source}': TensorFlow Datasets '{source.name}' has no split "
                             f"{', '.join(repr(u) for u in unknown) or repr(source.split)}; its splits: "
                             f"{', '.join(available)}. Example: tfds:{source.name}:{(available or ['train'])[0]}.")
        return {"": source.split}
    if "train" not in available:
        raise InputError(f"'{source}' has no 'train' split (its splits: {', '.join(available) or 'unknown'}); name "
                         f"the one to use: tfds:{source.name}:SPLIT.")
    roles = [s for s in _ROLE_SPLITS if s in available]
    unused = [s for s in available if s not in roles]
    if unused:
        log.info("%s: uses the splits %s; not used: %s (name one with tfds:%s:SPLIT).", source, ", ".join(roles),
                 ", ".join(unused), source.name)
    return {"": "train"} if roles == ["train"] else {s: s for s in roles}


def _plan_key(plan: dict[str, str]) -> str:
    """The folder name of a plan: ``train``, ``test``, ``splits-train-test``, ``train_10pct_-1a2b3c4d``."""
    if list(plan) != [""]:
        return "splits-" + "-".join(plan)
    expr = plan[""]
    slug = re.sub(r"[^A-Za-z0-9_.+-]", "_", expr.replace("%", "pct"))
    return slug if slug == expr else f"{slug}-{hashlib.sha1(expr.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- the folder side


def _read_complete(target: Path) -> dict | None:
    """The manifest of a complete folder, else None (a damaged folder is moved aside and removed)."""
    if not target.exists():
        return None
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") == _FORMAT and _count_images(target / IMAGES) == manifest["num_images"]:
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.warning("%s is incomplete or was changed; writing it again.", target)
    _remove(target)
    return None


def _written_before(base: Path, source: TfdsName) -> tuple[Path | None, dict | None]:
    """A complete folder written earlier for this same request, found without TFDS's metadata."""
    candidates = [base / _plan_key({"": source.split})] if source.split else \
        sorted(p for p in base.glob("*") if p.is_dir() and not p.name.startswith("."))
    for folder in candidates:
        try:
            written_for = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError, AttributeError):
            continue
        if (source.split or written_for == str(source)) and (manifest := _read_complete(folder)) is not None:
            return folder, manifest
    return None, None


def _count_images(root: Path) -> int:
    return sum(1 for _, _, names in os.walk(root) for name in names
               if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def _remove(folder: Path) -> None:
    """Rename a folder out of the way (so its name is free at once), then delete it."""
    aside = folder.with_name(f".{folder.name}.removing-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_partials(target: Path) -> None:
    """Delete what killed writers left (``.NAME.partial-PID-*`` of processes that are gone)."""
    if not target.parent.is_dir():
        return
    for entry in target.parent.glob(f".{target.name}.partial-*"):
        try:
            pid = int(entry.name.rsplit(".partial-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            ext = "." + (img.format or "").lower().replace("jpeg", "jpg")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"TensorFlow Datasets gave image bytes Pillow cannot read ({exc}).") from exc
    return ext if ext in IMAGE_EXTENSIONS else ".png"


def _materialise(tfds, builder, source: TfdsName, plan: dict[str, str], image_key: str, label_key: str,
                 target: Path) -> dict:
    from transferkit import files

    names = builder.info.features[label_key].names
    folders = class_folder_names(names)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    started = time.monotonic()
    log.info("%s: writing its images (%s) to %s, once; later runs reuse them.", source,
             ", ".join(plan.values()), target)
    counts: dict[str, dict[str, int]] = {}
    try:
        for folder, expr in plan.items():
            counts[folder] = dict.fromkeys(folders, 0)
            ds = builder.as_dataset(split=expr, shuffle_files=False,
                                    decoders={image_key: tfds.decode.SkipDecoding()},
                                    read_config=tfds.ReadConfig(add_tfds_id=True))
            for index, example in enumerate(tfds.as_numpy(ds)):
                data, label = example[image_key], int(example[label_key])
                raw_id = example.get("tfds_id")
                stem = raw_id.decode() if raw_id is not None else f"{expr}-{index:08d}"
                stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
                class_dir = partial / IMAGES / folder / folders[label]
                class_dir.mkdir(parents=True, exist_ok=True)
                (class_dir / (stem + _extension(data))).write_bytes(data)  # published with the folder below
                counts[folder][folders[label]] += 1
        total = sum(n for c in counts.values() for n in c.values())
        if total == 0:
            raise DataError(f"'{source}' has no images in {', '.join(plan.values())}.")
        files.write_json(partial / MANIFEST, {
            "format": _FORMAT, "source": str(source), "dataset": builder.info.full_name,
            "splits": plan, "image_feature": image_key, "label_feature": label_key,
            "class_names": list(names), "folder_names": folders, "counts": counts, "num_images": total,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        _publish(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("%s: wrote %d images in %.1f s.", source, total, time.monotonic() - started)
    return json.loads((target / MANIFEST).read_text(encoding="utf-8"))


def _publish(partial: Path, target: Path) -> None:
    """Rename the finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(partial, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)
