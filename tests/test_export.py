"""ONNX export, merged mode: parity with PyTorch, the bundle a phone ships, bad input, atomic writes, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import train_steps
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.cli import app
from fedadapt.errors import AdapterFolderError, ConfigError
from fedadapt.folder import PEFT_WEIGHTS, load_adapter, read_manifest, save_adapter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed
    sys.path.insert(0, str(PROJECT_ROOT))

import export.parity  # noqa: E402
from export.config import ExportConfig  # noqa: E402
from export.errors import ExportParityError  # noqa: E402
from export.exporter import export_adapter  # noqa: E402
from export.merged import export_merged  # noqa: E402

LABELS = ("lost_card", "top_up", "declined")
MERGED_METHODS = ["lora", "ffa-lora", "ia3", "bitfit", "full", "pfeiffer", "houlsby", "parallel", "stack", "fusion"]
TRAIN_TEXTS = ["my card has not arrived yet", "top up", "why is my transfer declined"]

Build = Callable[[str], Path]


def _train_batch(model: AdapterModel) -> dict[str, torch.Tensor]:
    encoded = dict(model.backbone.tokenizer(TRAIN_TEXTS, padding=True, return_tensors="pt"))
    encoded["labels"] = torch.tensor([0, 1, 2])
    return encoded


@pytest.fixture(scope="module")
def adapter_folder(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """method → a saved adapter folder, trained a few steps (prompt: untrained), built once per module.

    Stack puts a new adapter on the trained Pfeiffer one; fusion fuses the trained Pfeiffer and Houlsby ones.
    """
    root = tmp_path_factory.mktemp("adapters")
    built: dict[str, Path] = {}

    def composed_of(method: str) -> dict[str, tuple[str, ...]]:
        if method == "stack":
            return {"below": (str(build("pfeiffer")),)}
        return {"adapters": (str(build("pfeiffer")), str(build("houlsby")))} if method == "fusion" else {}

    def build(method: str) -> Path:
        if method not in built:
            loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=len(LABELS)))
            model = AdapterModel(loaded, make_method_config(method, **composed_of(method)), labels=LABELS)
            if method != "prompt":
                train_steps(model, _train_batch(model), steps=3, lr=5e-2)
            built[method] = save_adapter(model, root / method)
        return built[method]

    return build


@pytest.fixture(scope="module")
def exported(adapter_folder: Build, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """method → its merged export folder, exported once per module."""
    root = tmp_path_factory.mktemp("exports")
    done: dict[str, Path] = {}

    def build(method: str) -> Path:
        if method not in done:
            export_adapter(ExportConfig(adapter=adapter_folder(method), out=root / method))
            done[method] = root / method
        return done[method]

    return build


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _onnx_logits(session: ort.InferenceSession, encoded: dict[str, np.ndarray]) -> np.ndarray:
    feeds = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return np.asarray(session.run(["logits"], feeds)[0])


def _torch_logits(model: AdapterModel, encoded: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits.numpy()  # type: ignore[no-any-return]


def _leftovers(parent: Path, name: str) -> list[str]:
    """Staging or retired folders of an export to ``parent / name``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("method", MERGED_METHODS)
def test_merged_export_passes_parity(exported: Build, method: str) -> None:
    report = _read_json(exported(method) / "report.json")
    parity = report["parity"]
    assert parity["passed"] is True
    assert parity["max_abs_diff"] <= 1e-4
    assert parity["argmax_agreement"] == 1.0
    assert parity["texts"] == len(ExportConfig(adapter=Path("a"), out=Path("b")).texts)
    assert [b["shape"][0] for b in parity["batches"]] == [parity["texts"], 1]
    assert report["method"] == method and report["mode"] == "merged" and report["opset"] == 17
    assert report["export_seconds"] > 0 and report["files"]["model.onnx"] > 0


def test_onnx_logits_depend_on_the_trained_lora(exported: Build, adapter_folder: Build) -> None:
    folder = exported("lora")
    encoded = dict(AutoTokenizer.from_pretrained(folder)(TRAIN_TEXTS, padding=True, return_tensors="np"))
    onnx_logits = _onnx_logits(_session(folder), encoded)
    # The same model with LoRA's B zeroed: only the adapter differs (the trained head stays).
    without_lora = load_adapter(adapter_folder("lora")).eval()
    state = without_lora.state()
    without_lora.load_state({n: torch.zeros_like(t) if ".lora_B." in n else t for n, t in state.items()})
    assert np.abs(onnx_logits - _torch_logits(without_lora, encoded)).max() > 1e-3
    with_lora = load_adapter(adapter_folder("lora")).eval()
    assert np.abs(onnx_logits - _torch_logits(with_lora, encoded)).max() <= 1e-4


@pytest.mark.parametrize(("batch", "tokens"), [(3, 11), (1, 5)])
def test_graph_has_dynamic_batch_and_sequence(exported: Build, adapter_folder: Build, batch: int, tokens: int) -> None:
    folder = exported("lora")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["where is my money", "my card has not arrived yet why", "top up"][:batch]
    encoded = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="np"))
    assert encoded["input_ids"].shape == (batch, tokens)
    logits = _onnx_logits(_session(folder), encoded)
    assert logits.shape == (batch, len(LABELS))
    reference = load_adapter(adapter_folder("lora")).eval()
    np.testing.assert_allclose(logits, _torch_logits(reference, encoded), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ bundle


def test_manifest_describes_the_bundle(exported: Build, adapter_folder: Build) -> None:
    folder = exported("lora")
    manifest = _read_json(folder / "manifest.json")
    assert set(manifest["files"]) | {"manifest.json"} == {p.name for p in folder.iterdir()}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    adapter = read_manifest(adapter_folder("lora"))
    assert manifest["backbone"] == {
        "name_or_path": adapter["backbone"]["name_or_path"],
        "fingerprint": adapter["backbone"]["fingerprint"],
    }
    assert manifest["adapter"] == {"method": "lora", "schema_id": adapter["schema_id"]}
    assert (manifest["mode"], manifest["opset"], manifest["fedadapt_version"]) == ("merged", 17, "0.1.0")
    assert manifest["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    assert manifest["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", len(LABELS)]}]


def test_bundle_holds_tokenizer_and_labels(exported: Build, tiny_bert: Path) -> None:
    folder = exported("lora")
    assert (folder / "tokenizer.json").is_file()
    assert _read_json(folder / "labels.json") == list(LABELS)
    bundled, original = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tiny_bert)
    assert bundled(TRAIN_TEXTS)["input_ids"] == original(TRAIN_TEXTS)["input_ids"]


def test_export_leaves_the_live_model_unchanged(adapter_folder: Build, tmp_path: Path) -> None:
    model = load_adapter(adapter_folder("lora")).eval()
    before = {n: t.clone() for n, t in model.module.state_dict().items()}
    export_merged(model, tmp_path / "model.onnx", opset=17)
    after = model.module.state_dict()
    assert list(after) == list(before)  # still unmerged: the LoRA tensors are all there
    assert [n for n in before if not torch.equal(before[n], after[n])] == []


# ------------------------------------------------------------------------------------- bad input


def _truncated(folder: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(folder, tmp_path / "truncated"))
    weights = copy / PEFT_WEIGHTS[1]
    weights.write_bytes(weights.read_bytes()[:100])
    return copy


def _without_manifest(folder: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(folder, tmp_path / "no-manifest"))
    (copy / "fedadapt_adapter.json").unlink()
    return copy


@pytest.mark.parametrize(
    ("make_adapter", "error", "message"),
    [
        (lambda folder, tmp: tmp / "nowhere", ConfigError, "adapter folder .* does not exist"),
        (_without_manifest, AdapterFolderError, "not a fedadapt adapter folder: fedadapt_adapter.json is missing"),
        (_truncated, AdapterFolderError, "is corrupt or truncated and cannot be loaded .*save the adapter again"),
    ],
    ids=["missing", "no-manifest", "truncated-weights"],
)
def test_unreadable_adapter_folder_is_refused(
    adapter_folder: Build, tmp_path: Path, make_adapter: Callable[[Path, Path], Path], error: type, message: str
) -> None:
    adapter = make_adapter(adapter_folder("lora"), tmp_path)
    with pytest.raises(error, match=message):
        export_adapter(ExportConfig(adapter=adapter, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


@pytest.fixture(scope="module")
def other_backbone(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with one weight changed: same architecture, another fingerprint."""
    folder = Path(shutil.copytree(tiny_bert, tmp_path_factory.mktemp("other") / "bert"))
    weights = load_file(str(folder / "model.safetensors"))
    name = next(n for n in weights if n.endswith("query.weight"))
    weights[name] = weights[name] + 0.1
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_backbone_that_does_not_match_the_adapter(adapter_folder: Build, other_backbone: Path, tmp_path: Path) -> None:
    config = ExportConfig(adapter=adapter_folder("lora"), out=tmp_path / "out", backbone=str(other_backbone))
    with pytest.raises(AdapterFolderError, match="was trained on backbone .* load it onto the same backbone"):
        export_adapter(config)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_prompt_tuning_has_nothing_to_merge(adapter_folder: Build, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to merge: prompt tuning adds virtual tokens.*--mode swappable"):
        export_adapter(ExportConfig(adapter=adapter_folder("prompt"), out=tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_swappable_mode_is_not_available_yet(adapter_folder: Build, tmp_path: Path) -> None:
    config = ExportConfig(adapter=adapter_folder("lora"), out=tmp_path / "out", mode="swappable")
    with pytest.raises(ConfigError, match=r"swappable export is not available in this version.*\['merged'\]"):
        export_adapter(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"opset": 16}, "opset must be an integer from 17 to 20, got 16"),
        ({"mode": "quantized"}, "mode must be one of"),
        ({"texts": ()}, "texts for the parity check must be one or more non-empty strings"),
    ],
)
def test_bad_config_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExportConfig(adapter=Path("adapter"), out=Path("out"), **fields)


def test_non_empty_out_needs_force(adapter_folder: Build, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty; pass --force"):
        export_adapter(ExportConfig(adapter=adapter_folder("lora"), out=out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _earlier_export(out: Path) -> Path:
    """A folder that looks like an earlier export: --force may replace it."""
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "fedadapt.export.v1"}))
    (out / "model.onnx").write_bytes(b"old graph")
    return out


def test_force_replaces_only_earlier_exports(adapter_folder: Build, tmp_path: Path) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not an earlier export"):
        export_adapter(ExportConfig(adapter=adapter_folder("lora"), out=out, force=True))
    assert (out / "thesis.tex").read_text() == "years of work"


def test_out_must_not_be_the_adapter_folder(adapter_folder: Build) -> None:
    adapter = adapter_folder("lora")
    with pytest.raises(ConfigError, match="is or contains the adapter folder"):
        export_adapter(ExportConfig(adapter=adapter, out=adapter, force=True))
    with pytest.raises(ConfigError, match="is or contains the adapter folder"):
        export_adapter(ExportConfig(adapter=adapter, out=adapter.parent, force=True))
    assert (adapter / "fedadapt_adapter.json").is_file()


# --------------------------------------------------------------------------------- atomic writes


@pytest.fixture
def broken_parity(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's side of the parity check answers 0.5 higher logits: every batch mismatches."""
    real = export.parity.torch_logits
    monkeypatch.setattr(export.parity, "torch_logits", lambda model, feeds: real(model, feeds) + 0.5)


@pytest.mark.usefixtures("broken_parity")
def test_failed_parity_leaves_no_folder_behind(adapter_folder: Build, tmp_path: Path) -> None:
    with pytest.raises(ExportParityError, match=r"padded batch of 6 .*max diff = 0\.5") as caught:
        export_adapter(ExportConfig(adapter=adapter_folder("lora"), out=tmp_path / "out"))
    assert len(caught.value.mismatches) == 2  # the padded batch and the batch of 1
    assert "batch of 1" in caught.value.mismatches[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.usefixtures("broken_parity")
def test_failed_forced_export_keeps_the_old_folder(adapter_folder: Build, tmp_path: Path) -> None:
    out = _earlier_export(tmp_path / "out")
    with pytest.raises(ExportParityError):
        export_adapter(ExportConfig(adapter=adapter_folder("lora"), out=out, force=True))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert _leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_export_replaces_with_force_and_prints_the_report(adapter_folder: Build, tmp_path: Path) -> None:
    out = _earlier_export(tmp_path / "phone")
    (out / "stale.txt").write_text("old")
    texts = tmp_path / "texts.txt"
    texts.write_text("where is my card\n\ntop up my account please\nwhy was my transfer declined\n")
    args = ["export", "--adapter", str(adapter_folder("ia3")), "--out", str(out), "--force", "--texts", str(texts)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["parity"]["passed"] and report["parity"]["texts"] == 3
    assert {"model.onnx", "tokenizer.json", "labels.json", "manifest.json", "report.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "stale.txt").exists() and _leftovers(tmp_path, "phone") == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--opset", "16"], "opset must be an integer from 17 to 20, got 16"),
        (["--mode", "swappable"], "swappable export is not available in this version"),
    ],
)
def test_cli_bad_input_exits_2(adapter_folder: Build, tmp_path: Path, extra: list[str], message: str) -> None:
    args = ["export", "--adapter", str(adapter_folder("lora")), "--out", str(tmp_path / "out"), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_importing_fedadapt_does_not_import_onnx() -> None:
    code = "import fedadapt, fedadapt.cli, sys; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
