"""The import contracts in pyproject.toml ([tool.importlinter]) hold, so the test command enforces them in CI.

They say: the library imports none of the apps on top of it and no flwr; each stage of the library
imports only the stages below it (data-flow order, three named exceptions); the adapter modules import
neither the methods nor the folder code; the exporter imports no flwr; production code imports Flower's
public API only (two named exceptions). A second test breaks a copy of the project on purpose and
checks that lint-imports says so for every contract.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
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
    assert kept and int(kept.group(1)) == len(_contracts()), result.stdout


def _contracts() -> list[dict[str, object]]:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as file:
        contracts: list[dict[str, object]] = tomllib.load(file)["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 6, "an import contract was dropped from pyproject.toml"
    return contracts


def test_a_forbidden_import_breaks_its_contract(tmp_path: Path) -> None:
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "fedadapt" / "config_values.py").open("a") as out:
        out.write("\nfrom clients import client_app  # an app below the library\n")
    with (tmp_path / "export" / "config.py").open("a") as out:
        out.write("\nimport flwr.app  # Flower in the exporter\n")
    with (tmp_path / "server" / "replies.py").open("a") as out:
        out.write("\nfrom flwr.supercore import constant  # a Flower internal\n")
    with (tmp_path / "fedadapt" / "data" / "dataset.py").open("a") as out:
        out.write("\nfrom fedadapt.train import loop  # a stage importing a later one\n")
    with (tmp_path / "fedadapt" / "adapters" / "slots.py").open("a") as out:
        out.write("\nfrom fedadapt.methods import registry  # an adapter module importing the methods\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = " ".join(result.stdout.split())  # lint-imports wraps long lines
    assert f"0 kept, {len(_contracts())} broken" in report
    assert "fedadapt.config_values -> clients.client_app" in report
    assert "export.config -> flwr.app" in report
    assert "server.replies -> flwr.supercore" in report
    assert "fedadapt.data.dataset -> fedadapt.train.loop" in report
    assert "fedadapt.adapters.slots -> fedadapt.methods.registry" in report
