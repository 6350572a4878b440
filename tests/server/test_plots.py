"""The run plots: both PNGs are written whole, readable and not blank, with or without a full-model run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed
    sys.path.insert(0, str(PROJECT_ROOT))

from server.plots import write_plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FULL_MODEL_BYTES = 90_000_000


def _metrics(method: str = "lora", rounds: int = 3, bytes_up: int = 150_000) -> dict[str, Any]:
    per_upload = FULL_MODEL_BYTES if method == "full" else bytes_up
    return {
        "scenario": {"name": "tiny", "method": method, "compression": "fp16"},
        "rounds": [
            {
                "round": r,
                "accuracy": 0.4 + 0.1 * r,
                "client_accuracy": 0.5 + 0.1 * r,
                "bytes_up": 4 * per_upload,
                "bytes_down": 8 * per_upload,
                "uploads": 4,
                "clients": 4,
                "seconds": 1.5,
            }
            for r in range(1, rounds + 1)
        ],
        "summary": {"full_model_bytes": FULL_MODEL_BYTES, "bytes_up_per_client_round": float(per_upload)},
    }


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert 10_000 < len(data) < 2_000_000
    image = imread(path)
    height, width, channels = image.shape
    assert height >= 300 and width >= 500 and channels in (3, 4)
    assert image[..., :3].var() > 0  # something was drawn


def test_writes_both_pngs_with_computed_full_model_line(tmp_path: Path) -> None:
    paths = write_plots(tmp_path, _metrics())
    assert paths == [tmp_path / "accuracy.png", tmp_path / "bytes.png"]
    for path in paths:
        _check_png(path)


def test_full_model_run_draws_a_different_bytes_plot(tmp_path: Path) -> None:
    computed, measured = tmp_path / "computed", tmp_path / "measured"
    write_plots(computed, _metrics())
    full = _metrics("full")
    full["rounds"][-1]["bytes_up"] *= 2  # measured bytes differ from the computed line
    write_plots(measured, _metrics(), full_model=full)
    for name in ("accuracy.png", "bytes.png"):
        _check_png(measured / name)
        assert (computed / name).read_bytes() != (measured / name).read_bytes()


def test_no_rounds_is_an_error(tmp_path: Path) -> None:
    metrics = _metrics(rounds=0)
    with pytest.raises(ValueError, match="no rounds yet: nothing to plot"):
        write_plots(tmp_path, metrics)
    assert list(tmp_path.iterdir()) == []


def test_rounds_without_accuracy_are_skipped(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["rounds"][0]["accuracy"] = None
    metrics["rounds"][1]["client_accuracy"] = None
    full = _metrics("full")
    for record in full["rounds"]:
        record["accuracy"] = None  # a series with no points at all
    for path in write_plots(tmp_path, metrics, full_model=full):
        _check_png(path)


def test_input_is_not_modified_and_no_temp_files_are_left(tmp_path: Path) -> None:
    metrics = _metrics()
    before = copy.deepcopy(metrics)
    write_plots(tmp_path, metrics)
    write_plots(tmp_path, metrics)  # overwriting existing plots
    assert metrics == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "bytes.png"]


def test_plotting_loads_no_model_stack(tmp_path: Path) -> None:
    """Writing the PNGs is matplotlib and a file rename: torch, transformers and peft stay unloaded (seconds saved)."""
    code = (
        "import json, sys; from pathlib import Path; from server.plots import write_plots; "
        "write_plots(Path(sys.argv[1]), json.loads(sys.argv[2])); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), json.dumps(_metrics())],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "bytes.png"]
