"""The output folders transferkit writes (every command's ``-o``): checked, claimed (marked and
locked) for one process, released, and cleared of a previous run's files.

What transferkit never does to an output folder: write inside an input image folder, write
into a non-empty folder without ``--overwrite``, ``--overwrite`` a folder it did not mark, or
delete anything there but the files it names itself (:func:`clear_previous_run`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from transferkit import files
from transferkit.errors import InputError
from transferkit.serving.runs import (
    BACKUP_DIR,
    BACKUP_PATTERNS,
    BOOKKEEPING_FILES,
    CHECKPOINT_DIR,
    CHECKPOINT_FILES,
    EARLIER_OUTPUTS,
    HEAD_FILE,
    LOCK_FILE,
    MARKER_FILE,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; folders are not locked there
    fcntl = None

log = logging.getLogger("transferkit")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "-o/--output-dir", *,
                     inputs: Iterable[str | os.PathLike | None] = (), resume: bool = False) -> Path:
    """Every refusal of :func:`prepare_output_dir`, creating and claiming nothing: callers run it
    before their other checks (the cache folder), so a refused job leaves nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"Output folder '{path}' ({option}) is a file. Choose a folder path.")
    check_outside_inputs(path, option, inputs)
    if path.is_dir() and any(entry.name not in BOOKKEEPING_FILES for entry in path.iterdir()):
        if not (overwrite or resume):
            raise InputError(
                f"Output folder '{path}' ({option}) already exists and is not empty. "
                "Choose a new folder, or pass --overwrite to replace the run in it."
            )
        if not (is_output_dir(path) or resume):
            raise InputError(
                f"Output folder '{path}' ({option}) is not empty and was not written by transferkit (it has no "
                f"{MARKER_FILE} file), so --overwrite will not replace anything in it. Choose a new or empty "
                "folder."
            )
    existing = path
    while not existing.is_dir() and existing.parent != existing:
        existing = existing.parent  # the folder will be created there: prove that is possible
    check_writable_dir(existing, option)
    return path


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "-o/--output-dir", *,
                       inputs: Iterable[str | os.PathLike | None] = (), command: str = "",
                       resume: bool = False) -> Path:
    """Check an output folder before a long job starts, then claim it: refuse to mix runs, to write
    into an input image folder, or to replace what transferkit did not write; fail early if
    unwritable; lock it for this process (:func:`lock_output_dir`) and mark it as ours.

    The claim lasts until :func:`release_output_dir` (or use :func:`claimed_output_dir`).

    Args:
        inputs: the image folders the job reads; the output may not be one of them or inside one.
        command: the command writing the folder, recorded in its marker file.
        resume: the folder is an interrupted run to continue (its ``config.yaml`` was checked by
            :func:`transferkit.serving.runs.resumable_config`); runs from before the marker file are accepted.

    Raises:
        InputError: the folder is not empty (and ``overwrite`` is off), is not a transferkit folder
            (and ``overwrite`` is on), is a file, is inside an input, is read-only, or is in use.
    """
    path = check_output_dir(path, overwrite, option, inputs=inputs, resume=resume)
    check_writable_dir(path, option)
    lock_output_dir(path, option)
    if not (path / MARKER_FILE).is_file():
        mark_output_dir(path, command)
    return path


@contextlib.contextmanager
def claimed_output_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "-o/--output-dir", *,
                       inputs: Iterable[str | os.PathLike | None] = (), command: str = "") -> Iterator[Path]:
    """:func:`prepare_output_dir` for the length of a ``with`` block: the lock is released when the
    work ends, however it ends (another process may then write the folder)."""
    path = prepare_output_dir(path, overwrite, option, inputs=inputs, command=command)
    try:
        yield path
    finally:
        release_output_dir(path)


def mark_output_dir(path: str | os.PathLike, command: str) -> None:
    """Write the :data:`MARKER_FILE` that makes a folder one transferkit may ``--overwrite``."""
    files.write_json(Path(path) / MARKER_FILE, {"tool": "transferkit", "command": command,
                                                "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def is_output_dir(path: str | os.PathLike) -> bool:
    """Whether transferkit wrote this folder: it holds the :data:`MARKER_FILE`, or is recognisably
    the output of an earlier version (:data:`EARLIER_OUTPUTS`)."""
    path = Path(path)
    if (path / MARKER_FILE).is_file():
        return True
    return any(all((path / name).exists() for name in names) for names in EARLIER_OUTPUTS.values())


def check_outside_inputs(path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output (folder or file) that is an input image folder or inside one, symlinks
    resolved: the next scan would read it back as images (a run folder becomes extra classes).

    ``tfds:`` names and None are skipped.
    """
    target = Path(path).resolve()
    for image_dir in inputs:
        if image_dir is None or str(image_dir).startswith("tfds:"):
            continue
        root = Path(image_dir).resolve()
        if target == root or root in target.parents:
            raise InputError(
                f"{option} '{path}' is {'the' if target == root else 'inside the'} image folder '{image_dir}'. "
                "transferkit never writes into an image folder (the next scan would read what it wrote as "
                "images or classes); choose a path outside it."
            )


def check_cache_dir(cache_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The feature cache folder: outside every input image folder, and writable."""
    check_outside_inputs(cache_dir, "--cache-dir", inputs)
    return check_writable_dir(cache_dir, "--cache-dir")


#: Locks this process holds, by the lock file's (st_dev, st_ino): a second claim from the same
#: process reuses its lock, and a folder deleted and made again (a new lock file) is locked anew.
#: The value is the open descriptor and the resolved folder it was taken for.
_LOCKS: dict[tuple[int, int], tuple[int, Path]] = {}
#: A lock file holding more than this is not one transferkit wrote (it holds a pid, nothing else).
_PID_BYTES = 20


def lock_output_dir(path: str | os.PathLike, option: str = "-o/--output-dir") -> None:
    """Hold an exclusive ``flock`` on the folder's :data:`LOCK_FILE` until :func:`release_output_dir`
    or the end of the process (the system drops it when the process dies, even by SIGKILL, so a
    killed run can be resumed at once).

    Raises:
        InputError: another process holds it, or the lock file is not a plain file of its own (a
            symlink, a hard link, a folder): transferkit writes the pid into it, so it may not be
            anybody else's file.
    """
    path = Path(path)
    if fcntl is None:
        return
    lock = path / LOCK_FILE
    # O_NOFOLLOW: never open what a symlink of that name points to; O_NONBLOCK: a FIFO cannot hang us.
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        try:
            fd, created = os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd, created = os.open(lock, flags), False
    except OSError as exc:
        raise _foreign_lock(lock, option, "a symbolic link" if lock.is_symlink() else exc.strerror or str(exc)) \
            from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise _foreign_lock(lock, option, "not a regular file" if not stat.S_ISREG(info.st_mode)
                            else f"a file with {info.st_nlink} hard links")
    key = (info.st_dev, info.st_ino)
    if key in _LOCKS:  # this process holds it already (the descriptor keeps the inode from being reused)
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise InputError(
            f"Output folder '{path}' ({option}) is being written by another transferkit process"
            f"{f' (pid {holder})' if holder.isdigit() else ''}. Wait for it to finish (then --resume or "
            "--overwrite), or choose another folder."
        ) from None
    except OSError as exc:  # a file system without locks (some network mounts): go on unlocked
        os.close(fd)
        log.warning("Cannot lock output folder '%s' (%s); make sure no other process writes to it.", path,
                    exc.strerror or exc)
        return
    previous = os.pread(fd, _PID_BYTES + 1, 0)
    if created or (len(previous) <= _PID_BYTES and previous.strip().isdigit()):  # only ever our own pid
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)  # for the message above, nothing else
    _LOCKS[key] = (fd, path.resolve())


def _foreign_lock(lock: Path, option: str, why: str) -> InputError:
    return InputError(f"Cannot lock output folder '{lock.parent}' ({option}): its {LOCK_FILE} is not a lock file "
                      f"transferkit can use ({why}); transferkit writes into that file, so it must be a plain file "
                      "of its own. Remove it if it is yours to remove, or choose another folder.")


def release_output_dir(path: str | os.PathLike) -> None:
    """Release the lock :func:`lock_output_dir` took (no-op when this process holds none)."""
    path = Path(path)
    resolved = path.resolve()
    try:
        info = os.stat(path / LOCK_FILE, follow_symlinks=False)
        current = (info.st_dev, info.st_ino)
    except OSError:  # the folder or its lock file is gone: release what was taken for this path
        current = None
    for key, (fd, folder) in list(_LOCKS.items()):
        if key == current or folder == resolved:
            del _LOCKS[key]
            os.close(fd)


def clear_previous_run(run_dir: str | os.PathLike) -> None:
    """Before a new (not resumed) run in an ``--overwrite`` folder: remove the files of the previous
    run that this one would otherwise read as its own. Its checkpoints would be resumed by the
    fine-tune phase, and a ``head.skops`` would make a softmax run load as a scikit-learn one.
    Every other file is rewritten by the new run.

    Only files transferkit names are removed (never a whole folder), and only from a folder it
    marked: a file another tool (or the user) put in ``checkpoints/`` stays.
    """
    run_dir = Path(run_dir)
    if not is_output_dir(run_dir):
        raise InputError(f"'{run_dir}' is not a transferkit output folder (no {MARKER_FILE}); nothing was removed.")
    checkpoints = run_dir / CHECKPOINT_DIR
    # feature_map.json: a report redrawn without features (a resumed report) would show the old run's map.
    doomed = [run_dir / HEAD_FILE, run_dir / Path(HEAD_FILE).with_suffix(".json").name, run_dir / "feature_map.json"]
    doomed += [checkpoints / name for name in CHECKPOINT_FILES]
    _remove_files(doomed)
    clear_backup(checkpoints)
    _remove_if_empty(checkpoints)


def clear_backup(checkpoint_dir: str | os.PathLike) -> None:
    """Remove the fine-tune backup: its files only (:data:`transferkit.serving.runs.BACKUP_PATTERNS`),
    then its folder if that left it empty. Done when a run's model and metrics are complete, and
    before a new run in an ``--overwrite`` folder."""
    backup = Path(checkpoint_dir) / BACKUP_DIR
    _remove_files([p for pattern in BACKUP_PATTERNS for p in backup.glob(pattern)])
    _remove_if_empty(backup)


def _remove_files(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_file() or path.is_symlink():  # a link is removed, never what it points to
            path.unlink(missing_ok=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only when empty: whatever else is there was not ours to remove
    except OSError:
        pass


def check_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """Create a folder if needed and prove a file can be written in it, before any long work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(
            f"Cannot write to folder '{path}' ({option}): {exc.strerror or exc}. Choose a writable folder."
        ) from exc
    return path
