"""Every docstring example (``>>>``) in transferkit runs and shows what it says.

An example that needs files, weights or a trained run is marked ``# doctest: +SKIP`` where it is
written; everything else is checked here, module by module.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import transferkit

MODULES = sorted(info.name for info in pkgutil.walk_packages(transferkit.__path__, "transferkit.")
                 if not info.name.endswith("__main__"))


@pytest.mark.parametrize("name", ["transferkit", *MODULES])
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    failures = []
    for test in tests:
        result = runner.run(test, out=failures.append)
        assert result.failed == 0, "".join(failures)
