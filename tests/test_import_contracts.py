"""The import contracts in pyproject.toml ([tool.importlinter]) hold, so the test command enforces them in CI.

They say: the library imports none of the apps on top of it and no flwr; the exporter imports no
flwr; production code imports Flower's public API only (two named exceptions). A second test breaks
a copy of the project on purpose and checks that lint-imports says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedadapt", "clients", "server", "export", "simulations", "deploy")
_LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the project at ``root`` (its pyproject.toml, its packages first on the path)."""
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is not installed: pip install -e '.[dev]' (it checks the import contracts)")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", _LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_import_contracts_hold() -> None:
    result = lint_imports(PROJECT_ROOT)
    assert result.returncode == 0, f"lint-imports found broken import contracts:\n{result.stdout}\n{result.stderr}"
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)
    assert kept and int(kept.group(1)) >= 4, result.stdout  # none of the four was dropped from pyproject.toml


def test_a_forbidden_import_breaks_its_contract(tmp_path: Path) -> None:
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "fedadapt" / "bounds.py").open("a") as out:
        out.write("\nfrom clients import client_app  # an app below the library\n")
    with (tmp_path / "export" / "config.py").open("a") as out:
        out.write("\nimport flwr.app  # Flower in the exporter\n")
    with (tmp_path / "server" / "replies.py").open("a") as out:
        out.write("\nfrom flwr.supercore import constant  # a Flower internal\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = " ".join(result.stdout.split())  # lint-imports wraps long lines
    assert "0 kept, 4 broken" in report
    assert "fedadapt.bounds -> clients.client_app" in report
    assert "export.config -> flwr.app" in report
    assert "server.replies -> flwr.supercore" in report
