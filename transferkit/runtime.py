"""Starting TensorFlow: one place for what happens when the heavy runtime first loads.

TF 2.21 writes its start-up lines (oneDNN, CUDA probes) through absl before absl's logging is
initialised, and absl then ignores ``TF_CPP_MIN_LOG_LEVEL`` (abseil-cpp PR #1957, open), so no
setting hides them.  Setting file descriptor 2 aside during the import is the only way; what was
written is shown if the import fails, and always when ``show_startup_logs`` is on (``--debug``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

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
