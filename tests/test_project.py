"""The README's set-up commands stay true: .ci/run runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [line.strip() for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
            for line in block.splitlines() if line.strip().startswith("python3 -m venv")]


def test_readme_has_the_two_setup_commands():
    commands = readme_commands()
    assert any("transferkit demo" in c for c in commands)
    assert any("pytest" in c for c in commands)


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_bundled_files_keep_their_licences():
    assets = ROOT / "transferkit" / "assets"
    assert "Apache" in (assets / "weights" / "NOTICE.md").read_text()
    assert "Apache License" in (assets / "demo" / "LICENSE").read_text()
    assert "arXiv:2011.08927" in (assets / "demo" / "README.md").read_text()
