"""Class names a run can keep: checked when a dataset is scanned, not when ``predict`` reads them."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence

from transferkit import files
from transferkit.errors import DataError, short_repr

# Unicode categories a class name cannot hold: control characters (Cc: line breaks, tabs, escapes) and the
# line and paragraph separators, since labels.txt holds one name a line and readers split on all of them.
_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})


def check_class_names(names: Sequence[str], root: str | os.PathLike = ".") -> None:
    """Refuse class folder names that a run could not keep: found at scan time, not when ``predict`` reads them.

    * Bytes that are not UTF-8 (a Latin-1 folder name; lone surrogates in Python): a class name is saved and
      drawn as text (labels.txt, metrics.json, plots). Image file names may hold any bytes.
    * A control character (a line break, tab, escape) or a line separator: ``labels.txt`` holds one class
      name a line, so the name would not read back as one class.
    * Two names that differ only by Unicode normalisation (``café`` typed as one character and as ``e``
      plus an accent): they look the same everywhere they are shown, and are one folder on file systems
      that normalise (macOS). Names that differ only by case (``A`` and ``a`` in a letters set) are
      allowed: Linux keeps them apart; :func:`transferkit.data.checks.dataset_warnings` warns about them.

    Raises:
        DataError: naming the folder(s) and how to fix them.

    Example:
        >>> check_class_names(["cat", "dog"])
        >>> check_class_names(["caf\u00e9", "cafe\u0301"])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        transferkit.errors.DataError: Class folders 'café' and 'café' in '.' differ only by ...
    """
    for name in names:
        if any(unicodedata.category(c) == "Cs" for c in name):  # bytes that are not UTF-8 (see transferkit.files)
            raise DataError(
                f"Class folder '{files.display_name(name)}' in '{root}' has a name that is not valid UTF-8 (bytes of "
                f"another encoding, shown as \\xNN; e.g. Latin-1 from an old archive). Class names are saved and shown "
                f"as text (labels.txt, metrics.json, the report), so rename the folder in UTF-8, e.g. with "
                f"'convmv -f latin1 -t utf8 -r --notest {files.display_name(str(root))}'. Image file names may stay "
                f"as they are.")
        bad = sorted({c for c in name if unicodedata.category(c) in _LINE_BREAKING})
        if bad:
            codes = ", ".join(f"U+{ord(c):04X}" for c in bad)
            raise DataError(
                f"Class folder {short_repr(name)} in '{root}' has a control character in its name ({codes}, e.g. a "
                f"line break or tab). Class names are saved one a line in labels.txt, so this one could not be "
                f"read back. Rename the folder without it.")
    for other, name in name_twins(names, fold_case=False):
        raise DataError(
            f"Class folders {short_repr(other)} and {short_repr(name)} in '{root}' differ only by Unicode "
            f"normalisation (as code points: {ascii(other[:60])} and {ascii(name[:60])}): they look the same "
            f"wherever they are shown, and are one folder on macOS. Merge them into one folder, or rename one.")


def name_twins(names: Sequence[str], fold_case: bool = True) -> list[tuple[str, str]]:
    """Pairs of different names that are equal after Unicode normalisation (NFC), and with ``fold_case``
    after ``lower()`` too: not ``casefold()``, as file systems fold case one character at a time ('ß' is
    not 'SS' there).

    Example:
        >>> name_twins(["A", "a", "b"])
        [('A', 'a')]
    """
    first: dict[str, str] = {}
    twins = []
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if fold_case:
            key = unicodedata.normalize("NFC", key.lower())
        other = first.setdefault(key, name)
        if other != name:
            twins.append((other, name))
    return twins


def class_folder_names(names) -> list[str]:
    """Folder-safe class names that :func:`check_class_names` accepts.

    Separators, NULs, control characters and line separators become ``_``, a leading dot ``_`` (hidden
    otherwise); names are NFC.

    Raises:
        DataError: two labels give one folder name, or names equal but for case.

    Example:
        >>> class_folder_names(["cat", "n/a", ".dot"])
        ['cat', 'n_a', '_dot']
    """
    safe = [re.sub(r"[/\\\0]", "_", str(n)) for n in names]
    safe = ["".join("_" if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in n) for n in safe]
    safe = [unicodedata.normalize("NFC", n).strip() or "_" for n in safe]
    safe = ["_" + n[1:] if n.startswith(".") else n for n in safe]
    first: dict[str, int] = {}
    for label, name in enumerate(safe):
        other = first.setdefault(name.lower(), label)
        if other != label:
            raise DataError(f"Class names {short_repr(names[other])} and {short_repr(names[label])} give the same "
                            f"folder name once made folder-safe ({short_repr(safe[label])}, case aside); "
                            "transferkit cannot keep these classes apart.")
    return safe
