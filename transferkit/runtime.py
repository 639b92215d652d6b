"""Starting TensorFlow: one place for what happens when the heavy runtime first loads.

TF 2.21 writes its start-up lines (oneDNN, CUDA probes) through absl before absl's logging is
initialised, and absl then ignores ``TF_CPP_MIN_LOG_LEVEL`` (abseil-cpp PR #1957, open), so no
setting hides them.  Setting file descriptor 2 aside during the import is the only way; what was
written is shown if the import fails, and always when ``show_startup_logs`` is on (``--debug``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading

#: Show TensorFlow's start-up lines (the CLI's --debug sets it).
show_startup_logs = False

#: ``--batch-size auto`` starts here (the default batch size) and halves on out-of-memory.
AUTO_BATCH_START = 32


def start_tensorflow() -> None:
    """Import TensorFlow and discover its devices, quietly; a no-op once TensorFlow is loaded."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if show_startup_logs:
        import tensorflow as tf

        tf.config.list_physical_devices()
        return
    with native_stderr_quiet():
        import tensorflow as tf

        tf.config.list_physical_devices()


@contextlib.contextmanager
def interrupt_checkpoints():
    """Ctrl-C inside the block takes effect at the next ``check()``, in plain Python code.

    Python's default handler raises KeyboardInterrupt wherever the main thread is, including in
    a TensorFlow object's ``__del__``, where it is printed and swallowed: the run then goes on as
    if nothing was pressed. A second Ctrl-C acts at once.

    Example:
        >>> with interrupt_checkpoints() as check:
        ...     for batch in range(3):
        ...         check()
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    received = []

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGINT, previous)

    def check():
        if received:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


@contextlib.contextmanager
def native_stderr_quiet():
    """Hide what native (C++) code writes to file descriptor 2 in the block, unless it fails.

    TensorFlow's and TFLite's INFO lines bypass Python and ``TF_CPP_MIN_LOG_LEVEL``; on an
    exception they are written out, so nothing that explains a failure is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def with_batch_backoff(step, batch_size: int | str, what: str, start: int = AUTO_BATCH_START):
    """Run ``step(batch)``; with ``--batch-size auto`` retry at half the batch on out-of-memory.

    With a fixed batch size, out-of-memory is an error that says what to do.

    Args:
        step: the work, given the batch size to use; it must be safe to call again after an
            out-of-memory failure (the training phases restore their starting weights).
        batch_size: an integer (used as is, no retry) or ``"auto"`` (start at ``start``).
        what: the work's name for the messages.

    Returns:
        ``(step's result, the batch size that worked)``.
    """
    import gc

    import tensorflow as tf

    from transferkit.errors import InputError

    size = start if batch_size == "auto" else int(batch_size)
    while True:
        try:
            return step(size), size
        except (tf.errors.ResourceExhaustedError, tf.errors.InternalError, MemoryError) as exc:
            if not _is_out_of_memory(exc):
                raise
            if batch_size != "auto":
                raise InputError(f"Out of memory during {what} with --batch-size {size}. Pass a smaller "
                                "--batch-size, or --batch-size auto to halve it until it fits.") from exc
            if size == 1:
                raise InputError(f"--batch-size auto: {what} runs out of memory even with 1 image per batch. "
                                "Use a smaller --image-size or backbone, or a machine with more memory.") from exc
            gc.collect()
            size //= 2
            logging.getLogger("transferkit").warning(
                "--batch-size auto: out of memory during %s; retrying with %d images per batch.", what, size)


def _is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory, as TensorFlow reports it (XLA's kernels raise InternalError for it)."""
    import tensorflow as tf

    if isinstance(exc, (tf.errors.ResourceExhaustedError, MemoryError)):
        return True
    message = str(exc)
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def require_package(module: str, flag: str, extra: str) -> None:
    """Fail before any work when ``flag`` needs an optional package that cannot be imported.

    Raises:
        InputError: naming the flag, the package and the pip command that installs it.
    """
    import importlib.util

    from transferkit.errors import InputError

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        found = False
    if not found:
        raise InputError(f"{flag} needs the optional package '{module}', which is not installed in this Python "
                         f"({sys.executable}). Install it with: pip install 'transferkit[{extra}]' (or: pip install "
                         f"{module}), or run without {flag}.")


def check_optional_flags(config) -> None:
    """The flags of a training config that need an optional package or a Keras head, checked
    before any work (TensorFlow is not loaded here).

    Raises:
        InputError: ``--tensorboard`` without the ``tensorboard`` package, or with a scikit-learn
            head (fitted in one call: no epochs to log).
    """
    from transferkit.errors import InputError

    if config.tensorboard:
        if config.head != "softmax":
            raise InputError(f"--tensorboard logs Keras training epochs, but --head {config.head} is fitted by "
                             "scikit-learn in one call (nothing to log). Use --head softmax, or drop --tensorboard.")
        require_package("tensorboard", "--tensorboard", "tensorboard")


#: Measured on this project's CI machine (no GPU): MobileNetV2 fine-tuning at 6.5 images/s with
#: XLA against 79 without.
XLA_ON_CPU_NOTE = ("XLA-compiled training is much slower on a CPU (MobileNetV2 fine-tuning measured 12x slower: "
                   "6.5 against 79 images/s), which is why Keras leaves XLA off on machines without a GPU or TPU")


def xla_device() -> str:
    """Where an XLA-compiled step would run: ``GPU``, ``TPU`` or ``CPU`` (TensorFlow must be loaded)."""
    import tensorflow as tf

    kinds = {device.device_type for device in tf.config.list_physical_devices()}
    return next((kind for kind in ("TPU", "GPU") if kind in kinds), "CPU")

