"""Starting TensorFlow: one place for what happens when the heavy runtime first loads.

TF 2.21 writes its start-up lines (oneDNN, CUDA probes) through absl before absl's logging is
initialised, and absl then ignores ``TF_CPP_MIN_LOG_LEVEL`` (abseil-cpp PR #1957, open), so no
setting hides them.  Setting file descriptor 2 aside during the import is the only way; what was
written is shown if the import fails, and always when ``show_startup_logs`` is on (``--debug``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading

#: Show TensorFlow's start-up lines (the CLI's --debug sets it).
show_startup_logs = False


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
