"""The ``transferkit`` command line: parses options, calls the library, prints.

Only this package prints. TensorFlow is imported inside the commands that need it, so ``--help``
and ``transferkit backbones`` answer at once. One module per command group:

- ``app``: the ``main`` group, console and logging set-up, errors mapped to exit codes;
- ``options``: the options and types several commands share (bounds from ``transferkit.config``);
- ``catalog``: ``backbones``, ``weights``;
- ``features``: ``extract``, ``features export``, ``features plot``;
- ``cache``: ``cache info|verify|prune|merge``;
- ``training``: ``train``, ``compare``, ``lr-find``, ``demo``;
- ``serving``: ``evaluate``, ``predict``, ``report``, ``export``, ``explain``, ``ensemble``.
"""

from transferkit.cli import cache, catalog, features, serving, training  # noqa: F401 - register the commands
from transferkit.cli.app import main

__all__ = ["main"]
