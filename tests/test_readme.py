"""The README's Python example runs as printed, and its shell-completion line prints a script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_public_api_is_importable_from_the_package_without_tensorflow():
    code = ("import sys, transferkit as tk; names = [getattr(tk, n) for n in ('TrainConfig', 'CompareConfig')]; "
            "assert 'tensorflow' not in sys.modules; print(sorted(tk.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import transferkit

    for name in transferkit.__all__:
        assert getattr(transferkit, name) is not None
        assert f"'{name}'" in out
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    for name in transferkit.__all__:
        if not name.startswith("__"):
            assert f"`{name}" in section, f"{name} is exported but not in the README's Python API section"


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)  # it writes runs/ below the current folder
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "pipeline accuracy:" in out and "(500, 32) 500 from the cache" in out


def test_shell_completion_and_version_work_as_documented():
    assert "_TRANSFERKIT_COMPLETE=bash_source transferkit" in README
    exe = Path(sys.executable).parent / "transferkit"
    script = subprocess.run([str(exe)], env={"_TRANSFERKIT_COMPLETE": "bash_source", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, check=True).stdout
    assert "complete -o nosort -F _transferkit_completion transferkit" in script
    import transferkit

    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"transferkit, version {transferkit.__version__}"
