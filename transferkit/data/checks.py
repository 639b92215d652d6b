"""Dataset-level checks run before training: ``--strict``, splits missing a class, duplicate images.

The scanner (:mod:`transferkit.data.scan`) already refuses what makes a folder unusable (no class folders,
a class without readable images, a single class). What is checked here still lets a run go ahead but
makes its result misleading, so each finding is a message saying what is wrong and what to do; the
caller logs it. Example::

    folder = scan_folder("photos")
    check_strict(folder.skipped)                 # with --strict: any skipped file fails the run
    hashes = FileHashes(cache_dir).hashes([folder.abs_path(p) for p in folder.paths])
    for message in dataset_warnings(folder, hashes):
        log.warning(message)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from transferkit.data.names import name_twins
from transferkit.data.scan import SPLITS, ImageFolder
from transferkit.data.splits import MIN_SPLIT_CLASS_IMAGES
from transferkit.errors import DataError, short_repr

#: How many examples a message lists before "and N more".
MAX_LISTED = 5


def check_strict(skipped: Sequence[tuple[str, str]], option: str = "--strict") -> None:
    """Fail when any file was skipped: ``--strict`` turns every skip into an error.

    Call it once with the files skipped by the scan (before any TensorFlow work) and again with those
    that failed to decode during extraction.

    Args:
        skipped: ``(path, reason)`` pairs, e.g. ``folder.skipped`` or ``result.skipped_files(paths)``.
        option: The option named in the message.

    Raises:
        DataError: Listing every skipped file with its reason.

    Example:
        >>> check_strict([])
        >>> check_strict([("cat/1.jpg", "empty file")])
        Traceback (most recent call last):
        ...
        transferkit.errors.DataError: 1 file could not be used and option --strict is on: ...
    """
    if not skipped:
        return
    noun = "file" if len(skipped) == 1 else "files"
    listing = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
    raise DataError(
        f"{len(skipped)} {noun} could not be used and option {option} is on:\n{listing}\n"
        f"Fix or remove these files, or run without {option} to skip them.")


def dataset_warnings(folder: ImageFolder, hashes: Sequence[str | OSError | None] | None = None) -> list[str]:
    """Problems of a scanned folder that do not stop a run but make its numbers misleading.

    * a split (val or test) that has images but none of some class: that class's accuracy there cannot
      be measured (with a hash split: the class has fewer than 3 images, so all of them train, whatever
      the seed);
    * the same image (same bytes) in two splits: the test score is optimistic;
    * the same image in two classes: contradictory labels;
    * class names that differ only by case (``A`` and ``a``): one folder on macOS and Windows.

    Args:
        folder: From :func:`transferkit.data.scan.scan_folder`.
        hashes: Content hash of each of ``folder.paths`` (``FileHashes.hashes`` gives them and remembers
            them for the extraction that follows); ``None`` skips the duplicate checks. Entries that are
            not strings (a file that could not be read) are left out.

    Returns:
        Messages, each saying what to do; empty when all is well.

    Example:
        >>> for message in dataset_warnings(folder, hashes):  # doctest: +SKIP
        ...     log.warning(message)
    """
    messages = _missing_classes(folder) + _case_twins(folder)
    if hashes is not None:
        if len(hashes) != len(folder.paths):
            raise ValueError(f"got {len(hashes)} hashes for {len(folder.paths)} paths")
        messages += _duplicates(folder, hashes)
    return messages


def _case_twins(folder: ImageFolder) -> list[str]:
    return [f"Classes {short_repr(a)} and {short_repr(b)} differ only by case: they are two classes here, but one "
            "folder on macOS and Windows, where this dataset cannot be copied whole. If they are one class, merge "
            "their folders." for a, b in name_twins(folder.class_names)]


def _missing_classes(folder: ImageFolder) -> list[str]:
    counts = folder.counts()
    totals = {name: sum(counts[split][name] for split in SPLITS) for name in folder.class_names}
    messages = []
    for split in ("val", "test"):
        if not any(counts[split].values()):
            continue  # the split is not used at all (e.g. no test/ folder): nothing to compare
        missing = [name for name in folder.class_names if counts[split][name] == 0 and totals[name] > 0]
        if not missing:
            continue
        names = ", ".join(repr(name) for name in missing)
        if folder.split_source == "manifest":
            fix = f"Give some rows of {names} the split '{split}' in the manifest"
        elif folder.split_source == "folders":
            where = sorted({p.split("/", 1)[0] for p, s in zip(folder.paths, folder.splits, strict=True)
                            if s == split})
            fix = f"Add images of {names} to {' and '.join(f'{w}/' for w in where)}"
        else:
            fix = (f"A class of fewer than {MIN_SPLIT_CLASS_IMAGES} images is only trained on, whatever the seed; "
                   f"give each class at least {MIN_SPLIT_CLASS_IMAGES} images (better 20 or more) so that every "
                   "split gets some")
        messages.append(f"The {split} split has no images of class(es) {names}, so their {split} accuracy "
                        f"cannot be measured. {fix}.")
    return messages


def _duplicates(folder: ImageFolder, hashes: Sequence) -> list[str]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(hashes):
        if isinstance(digest, str):
            groups[digest].append(i)
    across_splits, across_classes = [], []
    for members in groups.values():
        if len(members) < 2:
            continue
        shown = " = ".join(f"'{folder.paths[i]}'" for i in members)
        if len({folder.labels[i] for i in members}) > 1:
            across_classes.append(shown)
        if len({folder.splits[i] for i in members}) > 1:
            across_splits.append(shown)
    messages = []
    if across_splits:
        messages.append(
            f"{_count(across_splits)} in more than one split (same bytes), so the test and validation "
            f"scores are optimistic: {_listing(across_splits)}. Delete the copies, keeping each image once "
            f"(or in one split only).")
    if across_classes:
        messages.append(
            f"{_count(across_classes)} in more than one class (same bytes), so their labels contradict each "
            f"other: {_listing(across_classes)}. Keep each image only in the folder of its class.")
    return messages


def _count(groups: list[str]) -> str:
    return "1 image is" if len(groups) == 1 else f"{len(groups)} images are"


def _listing(groups: list[str]) -> str:
    more = f" and {len(groups) - MAX_LISTED} more" if len(groups) > MAX_LISTED else ""
    return "; ".join(groups[:MAX_LISTED]) + more
