"""Every module of fedadapt/ imports on its own, first, in an interpreter that has loaded none of fedadapt.

A circle between our modules shows only when a module is imported first: `import fedadapt.adapters
.bottleneck` failed with "cannot import name ... from partially initialized module" while `import
fedadapt.methods` worked. A fresh `python -c "import X"` per module costs about 80 CPU-seconds here
(torch and transformers load again each time), so one child interpreter loads the heavy
third-party packages once — top-level only, never a fedadapt module — and forks a child per module
that imports it: same check for our own import order, about 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Heavy packages the library's modules import; preloading them changes nothing about fedadapt's own order.
_PRELOADED = ("numpy", "torch", "transformers", "peft", "safetensors", "cryptography")

_FORKING_IMPORTER = r"""
import importlib, json, os, sys, traceback

for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
assert not [m for m in sys.modules if m == "fedadapt" or m.startswith("fedadapt.")], "a preload loaded fedadapt"
failures = {}
for module in json.loads(sys.argv[2]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            status = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-3000:].encode())
            status = 1
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures[module] = report or f"the child exited with status {status}"
print(json.dumps(failures))
"""


def library_modules() -> list[str]:
    """Every module and package of fedadapt/, by dotted name."""
    names = []
    for path in sorted((PROJECT_ROOT / "fedadapt").rglob("*.py")):
        parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_every_library_module_imports_first_in_a_fresh_interpreter() -> None:
    modules = library_modules()
    assert "fedadapt.adapters.bottleneck" in modules and "fedadapt.privacy.secagg.crypto" in modules
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_IMPORTER, json.dumps(_PRELOADED), json.dumps(modules)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {module} failed:\n{report}" for module, report in failures.items())
