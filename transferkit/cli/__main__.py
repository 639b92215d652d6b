"""``python -m transferkit.cli``: the ``transferkit`` command."""

from transferkit.cli import main

main()  # pragma: no cover
