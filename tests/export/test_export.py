"""ONNX export, merged and swappable: parity with PyTorch, the bundle a phone ships, bad input, atomic writes, CLI."""

from __future__ import annotations

import hashlib
import json
import platform
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
from helpers import config_operators, onnx_operators, train_steps
from safetensors.torch import load_file, save_file
from tiny_vocab import VOCAB
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast
from typer.testing import CliRunner

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.checkpoint.folder import PEFT_WEIGHTS, load_adapter, read_manifest, save_adapter
from fedadapt.cli import app
from fedadapt.errors import AdapterFolderError, ConfigError, SchemaMismatch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed
    sys.path.insert(0, str(PROJECT_ROOT))

import export.parity  # noqa: E402
import export.quantize  # noqa: E402
import export.variants  # noqa: E402
from export.bundle import file_entries, read_bundle_manifest  # noqa: E402
from export.bundle_verify import check_files  # noqa: E402
from export.config import ExportConfig  # noqa: E402
from export.errors import BundleError, ExportError, ExportParityError  # noqa: E402
from export.exporter import export_adapter  # noqa: E402
from export.merged import export_merged  # noqa: E402
from export.ort_adapters import AdapterRunner, read_adapter_file  # noqa: E402
from export.parity import onnx_runner  # noqa: E402
from export.phone_demo import PhoneClassifier  # noqa: E402

LABELS = ("lost_card", "top_up", "declined")
MERGED_METHODS = [
    *("lora", "ffa-lora", "ia3", "bitfit", "head", "full", "pfeiffer", "houlsby", "parallel", "stack", "fusion"),
]
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
        (["--quantize", "int4"], "quantize must be one of ('int8',)"),
        (["--adapter-name", "alice"], "--adapter-name names an adapter inside a swappable bundle"),
        (["--mode", "swappable", "--adapter-name", "../alice"], "is not a valid adapter name"),
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


# ------------------------------------------------------------------------------------- swappable

SWAPPABLE_METHODS = ["lora", "ffa-lora", "ia3", "bitfit", "head", "pfeiffer", "houlsby", "parallel", "prompt", "prefix"]
BOB_LABELS = ("carte", "recharge", "refus")  # another user may name the classes differently
PHONE_TEXTS = [*TRAIN_TEXTS, "where is my money " * 30]  # the last one is truncated to 64 positions


@pytest.fixture(scope="module")
def swappable(adapter_folder: Build, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """method → its swappable export folder (one adapter, named after the method), exported once per module."""
    root = tmp_path_factory.mktemp("swappable")
    done: dict[str, Path] = {}

    def build(method: str) -> Path:
        if method not in done:
            export_adapter(ExportConfig(adapter=adapter_folder(method), out=root / method, mode="swappable"))
            done[method] = root / method
        return done[method]

    return build


def _lora_folder(tiny_bert: Path, folder: Path, labels: tuple[str, ...], train: bool = True, **fields: Any) -> Path:
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=len(labels)))
    model = AdapterModel(loaded, make_method_config("lora", **fields), labels=labels)
    if train:
        batch = _train_batch(model)
        batch["labels"] = torch.tensor([2, 0, 1])  # other data than the first user's
        train_steps(model, batch, steps=4, lr=8e-2)
    return save_adapter(model, folder)


@pytest.fixture(scope="module")
def bob(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second trained LoRA (same layout as adapter_folder('lora'), other weights and label names)."""
    return _lora_folder(tiny_bert, tmp_path_factory.mktemp("bob") / "bob", BOB_LABELS)


@pytest.fixture(scope="module")
def two_users(adapter_folder: Build, bob: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A swappable bundle made for 'alice' (the trained LoRA), which 'bob' then joined."""
    bundle = tmp_path_factory.mktemp("two-users") / "bundle"
    export_adapter(ExportConfig(adapter=adapter_folder("lora"), out=bundle, mode="swappable", adapter_name="alice"))
    export_adapter(ExportConfig(adapter=bob, out=bundle, mode="swappable"))
    return bundle


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporary files included) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _encode(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np"))


@pytest.mark.parametrize("method", SWAPPABLE_METHODS)
def test_swappable_export_passes_parity(swappable: Build, method: str) -> None:
    folder = swappable(method)
    report = _read_json(folder / "report.json")
    assert report["mode"] == "swappable" and report["method"] == method and report["adapter"] == method
    for parity in (report["parity"], report["adapters"][method]["parity"]):
        assert parity["passed"] is True and parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    assert report["adapters"][method]["file"] == f"adapters/{method}.onnx_adapter"
    assert {"backbone.onnx", f"adapters/{method}.onnx_adapter"} <= set(report["files"])
    assert not (folder / "model.onnx").exists()


@pytest.mark.parametrize("method", SWAPPABLE_METHODS)
def test_swappable_logits_need_the_adapter(swappable: Build, adapter_folder: Build, method: str) -> None:
    """With its adapter the graph is the PyTorch model; without one it is not (per-user inputs are zeros)."""
    phone = PhoneClassifier(swappable(method))
    encoded = _encode(phone.bundle, TRAIN_TEXTS)
    reference = _torch_logits(load_adapter(adapter_folder(method)).eval(), encoded)
    phone.use(method)
    np.testing.assert_allclose(phone.logits(TRAIN_TEXTS), reference, atol=1e-4, rtol=0)
    feeds = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    without = np.asarray(phone.session.run(["logits"], feeds)[0])  # no adapter: the zero defaults
    assert np.abs(without - reference).max() > 1e-3


@pytest.mark.parametrize("mode", ["merged", "swappable"])
def test_top_layer_lora_exports_in_both_modes(tiny_bert: Path, tmp_path: Path, mode: str) -> None:
    """LoRA in the top layer only (drop_layers = 1 of 2): its graph computes what the PyTorch model does."""
    adapter = _lora_folder(tiny_bert, tmp_path / "top-lora", LABELS, drop_layers=1)
    export_adapter(ExportConfig(adapter=adapter, out=tmp_path / "bundle", mode=mode))
    report = _read_json(tmp_path / "bundle" / "report.json")
    assert report["method"] == "lora" and report["mode"] == mode
    assert report["parity"]["passed"] is True and report["parity"]["max_abs_diff"] <= 1e-4
    reference = _torch_logits(load_adapter(adapter).eval(), _encode(tmp_path / "bundle", TRAIN_TEXTS))
    if mode == "merged":
        logits = _onnx_logits(_session(tmp_path / "bundle"), _encode(tmp_path / "bundle", TRAIN_TEXTS))
    else:
        phone = PhoneClassifier(tmp_path / "bundle")
        phone.use("top-lora")
        logits = phone.logits(TRAIN_TEXTS)
        per_user = {i["name"] for i in _read_json(tmp_path / "bundle" / "manifest.json")["adapter_inputs"]}
        assert per_user and all(".layer.1." in n for n in per_user if "lora_" in n)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_take_positions_from_the_text(swappable: Build, adapter_folder: Build, method: str) -> None:
    """20 virtual tokens before the text leave 64 - 20 positions of the tiny BERT for it."""
    folder = swappable(method)
    assert _read_json(folder / "manifest.json")["max_sequence_length"] == 44
    texts = [PHONE_TEXTS[-1], "top up"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = dict(tokenizer(texts, padding=True, truncation=True, max_length=44, return_tensors="np"))
    assert encoded["input_ids"].shape == (2, 44)
    phone = PhoneClassifier(folder)
    phone.use(method)
    reference = _torch_logits(load_adapter(adapter_folder(method)).eval(), encoded)
    np.testing.assert_allclose(phone.logits(texts), reference, atol=1e-4, rtol=0)


def test_swappable_manifest_describes_the_bundle(swappable: Build, adapter_folder: Build) -> None:
    folder = swappable("lora")
    manifest = _read_json(folder / "manifest.json")
    assert manifest["files"] == file_entries(folder)
    adapter = read_manifest(adapter_folder("lora"))
    schema = adapter["schema"]["tensors"]
    assert [i["name"] for i in manifest["adapter_inputs"]] == [t["name"] for t in schema]
    assert [(i["shape"], i["dtype"]) for i in manifest["adapter_inputs"]] == [(t["shape"], t["dtype"]) for t in schema]
    assert any(".lora_B." in t["name"] for t in schema) and any(t["role"] == "head" for t in schema)
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", len(LABELS)]}]
    assert (manifest["mode"], manifest["graph"], manifest["num_labels"]) == ("swappable", "backbone.onnx", 3)
    assert manifest["adapters"] == {
        "lora": {
            "file": "adapters/lora.onnx_adapter",
            "method": "lora",
            "schema_id": adapter["schema_id"],
            "labels": list(LABELS),
        }
    }
    assert "Exactly one adapter must be active per run" in manifest["usage"]
    assert manifest["layout"]["backbone_fingerprint"] == adapter["backbone"]["fingerprint"]
    assert manifest["tokenizer"] == {"pad_token": "[PAD]", "pad_token_id": 0}


def test_adapter_file_holds_every_per_user_tensor(swappable: Build, adapter_folder: Build) -> None:
    tensors = read_adapter_file(swappable("lora") / "adapters" / "lora.onnx_adapter")
    state = load_adapter(adapter_folder("lora")).state()
    assert sorted(tensors) == sorted(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(tensors[name], tensor.numpy())


def test_two_users_share_one_session(two_users: Path, adapter_folder: Build, bob: Path) -> None:
    phone = PhoneClassifier(two_users)
    session = phone.session
    assert phone.adapter_names == ["alice", "bob"]
    encoded = _encode(two_users, PHONE_TEXTS)
    logits = {}
    for user, folder in (("alice", adapter_folder("lora")), ("bob", bob), ("alice", adapter_folder("lora"))):
        phone.use(user)
        assert phone.session is session and phone.active == user
        logits[user] = phone.logits(PHONE_TEXTS)
        np.testing.assert_allclose(logits[user], _torch_logits(load_adapter(folder).eval(), encoded), atol=1e-4, rtol=0)
    assert np.abs(logits["alice"] - logits["bob"]).max() > 1e-2
    assert phone.classify(PHONE_TEXTS[:1])[0][0] in LABELS
    phone.use("bob")
    assert phone.classify(PHONE_TEXTS[:1])[0][0] in BOB_LABELS


def test_joining_rewrites_manifest_and_report(two_users: Path, bob: Path) -> None:
    manifest, report = _read_json(two_users / "manifest.json"), _read_json(two_users / "report.json")
    assert sorted(manifest["adapters"]) == sorted(report["adapters"]) == ["alice", "bob"]
    assert manifest["adapters"]["bob"]["labels"] == list(BOB_LABELS)
    assert manifest["files"] == file_entries(two_users)
    assert report["adapter"] == "bob" and report["parity"] == report["adapters"]["bob"]["parity"]
    assert all(entry["parity"]["passed"] for entry in report["adapters"].values())
    assert _read_json(two_users / "labels.json") == list(LABELS)  # the first user's; others' are in the manifest
    assert _leftovers(two_users / "adapters", "bob.onnx_adapter") == []


@pytest.fixture(scope="module")
def misfits(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained LoRA adapters that cannot join a bundle built for LoRA r=8 with 3 labels."""
    root = tmp_path_factory.mktemp("misfits")
    return {
        "rank": _lora_folder(tiny_bert, root / "rank", LABELS, train=False, r=4),
        "labels": _lora_folder(tiny_bert, root / "labels", (*LABELS, "refund"), train=False),
    }


@pytest.mark.parametrize(
    ("misfit", "message"),
    [
        ("rank", r"(?s)method r: bundle 8, adapter 4.*tensor shapes or dtypes, bundle vs adapter \(8\).*another --out"),
        ("labels", r"(?s)number of labels: bundle 3, adapter 4.*classifier.*float32\[3, 32\] vs float32\[4, 32\]"),
    ],
)
def test_incompatible_adapter_cannot_join(
    two_users: Path, misfits: dict[str, Path], tmp_path: Path, misfit: str, message: str
) -> None:
    bundle = _copy(two_users, tmp_path)
    before = _snapshot(bundle)
    with pytest.raises(SchemaMismatch, match=message):
        export_adapter(ExportConfig(adapter=misfits[misfit], out=bundle, mode="swappable", force=True))
    assert _snapshot(bundle) == before


def test_taken_adapter_name_needs_force(two_users: Path, bob: Path, tmp_path: Path) -> None:
    bundle = _copy(two_users, tmp_path)
    before = _snapshot(bundle)
    with pytest.raises(ConfigError, match="already has an adapter named 'bob'; pass --adapter-name .* or --force"):
        export_adapter(ExportConfig(adapter=bob, out=bundle, mode="swappable"))
    assert _snapshot(bundle) == before
    report = export_adapter(ExportConfig(adapter=bob, out=bundle, mode="swappable", force=True))
    assert report.parity.passed and sorted(report.adapters) == ["alice", "bob"]
    assert _snapshot(bundle)["adapters/bob.onnx_adapter"] == before["adapters/bob.onnx_adapter"]


@pytest.mark.usefixtures("broken_parity")
def test_failed_parity_when_joining_leaves_the_bundle_as_it_was(two_users: Path, bob: Path, tmp_path: Path) -> None:
    bundle = _copy(two_users, tmp_path)
    before = _snapshot(bundle)
    with pytest.raises(ExportParityError, match="max diff = 0.5"):
        export_adapter(ExportConfig(adapter=bob, out=bundle, mode="swappable", adapter_name="carol"))
    assert _snapshot(bundle) == before


def test_changed_bundle_cannot_be_joined(two_users: Path, bob: Path, tmp_path: Path) -> None:
    bundle = _copy(two_users, tmp_path)
    (bundle / "adapters" / "alice.onnx_adapter").write_bytes(b"tampered")
    with pytest.raises(ExportError, match="was changed after export .*alice.onnx_adapter differs"):
        export_adapter(ExportConfig(adapter=bob, out=bundle, mode="swappable", adapter_name="carol"))
    assert not (bundle / "adapters" / "carol.onnx_adapter").exists()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("full", "full cannot be exported with --mode swappable: full fine-tuning makes every weight per user"),
        ("stack", "stack cannot be exported with --mode swappable: a stack composes several adapters"),
        ("fusion", "fusion cannot be exported with --mode swappable: fusion composes several adapters"),
    ],
)
def test_unswappable_methods_are_refused(adapter_folder: Build, tmp_path: Path, method: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"{message}.*use --mode merged"):
        export_adapter(ExportConfig(adapter=adapter_folder(method), out=tmp_path / "out", mode="swappable"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_phone_classifier_refuses_misuse(two_users: Path, exported: Build) -> None:
    phone = PhoneClassifier(two_users)
    with pytest.raises(RuntimeError, match=r"activate an adapter first with use\(name\), one of \['alice', 'bob'\]"):
        phone.classify(["top up"])
    with pytest.raises(TypeError, match="activates exactly one adapter"):
        phone.use(["alice", "bob"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no adapter 'carol'"):
        phone.use("carol")
    with pytest.raises(ValueError, match="is a merged bundle"):
        PhoneClassifier(exported("lora")).use("alice")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"adapter_name": "alice"}, "--adapter-name names an adapter inside a swappable bundle; add --mode swappable"),
        ({"adapter_name": "a/b", "mode": "swappable"}, "--adapter-name 'a/b' is not a valid adapter name"),
        ({"adapter": Path("my adapter"), "mode": "swappable"}, "the adapter folder's name .* 'my adapter' is not"),
    ],
)
def test_bad_adapter_name_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExportConfig(**{"adapter": Path("adapter"), "out": Path("out"), **fields})


def _run_phone_demo(bundle: Path, *args: str) -> dict[str, Any]:
    command = [sys.executable, str(PROJECT_ROOT / "export" / "phone_demo.py"), str(bundle), "--json", "--check-imports"]
    for text in PHONE_TEXTS:
        command += ["--text", text]
    result = subprocess.run([*command, *args], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _torch_labels(folder: Path, bundle: Path) -> list[str]:
    model = load_adapter(folder).eval()
    return [model.labels[i] for i in _torch_logits(model, _encode(bundle, PHONE_TEXTS)).argmax(-1)]


def test_phone_demo_matches_pytorch_without_torch(
    two_users: Path, exported: Build, adapter_folder: Build, bob: Path
) -> None:
    swapped = _run_phone_demo(two_users, "--adapter", "bob", "--adapter", "alice")
    assert swapped["forbidden_modules"] == [] and swapped["mode"] == "swappable"
    assert [r["adapter"] for r in swapped["results"]] == ["bob", "alice"]
    for result, folder in zip(swapped["results"], (bob, adapter_folder("lora")), strict=True):
        assert [p["label"] for p in result["predictions"]] == _torch_labels(folder, two_users)
        assert all(0 < p["probability"] <= 1 for p in result["predictions"])
    merged = _run_phone_demo(exported("lora"))
    assert merged["forbidden_modules"] == [] and [r["adapter"] for r in merged["results"]] == [None]
    labels = [p["label"] for p in merged["results"][0]["predictions"]]
    assert labels == _torch_labels(adapter_folder("lora"), exported("lora"))


def test_cli_adds_a_user_to_a_swappable_bundle(two_users: Path, bob: Path, tmp_path: Path) -> None:
    bundle = _copy(two_users, tmp_path)
    args = ["export", "--adapter", str(bob), "--out", str(bundle), "--mode", "swappable", "--adapter-name", "carol"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["adapter"] == "carol" and sorted(report["adapters"]) == ["alice", "bob", "carol"]
    assert (bundle / "adapters" / "carol.onnx_adapter").read_bytes() == (
        bundle / "adapters" / "bob.onnx_adapter"
    ).read_bytes()
    refused = runner.invoke(app, [*args[:-2], "--adapter-name", "bob"])
    assert refused.exit_code == 2 and "already has an adapter named 'bob'" in refused.stderr


# ------------------------------------------------------------------------------- int8 and .ort

EVAL_ROWS = [(text, label) for text, label in zip(TRAIN_TEXTS, LABELS, strict=True)] * 10


def _write_wide_bert(folder: Path) -> Path:
    """A BERT wide enough (hidden 128) for its weights, not the graph's structure, to dominate the file size."""
    torch.manual_seed(4321)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    config.max_position_embeddings = 64
    BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """int8 + .ort exports on a wide tiny BERT: merged (with --eval-data), and swappable for alice, joined by bob."""
    root = tmp_path_factory.mktemp("int8")
    bert = _write_wide_bert(root / "bert")
    loaded = load_backbone(BackboneConfig(name_or_path=str(bert), num_labels=len(LABELS)))
    model = AdapterModel(loaded, make_method_config("lora"), labels=LABELS)
    train_steps(model, _train_batch(model), steps=4, lr=5e-2)  # other labels than bob's
    alice = save_adapter(model, root / "alice")
    bob = _lora_folder(bert, root / "bob", BOB_LABELS)
    data = root / "eval.csv"
    data.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in EVAL_ROWS))
    common = {"quantize": "int8", "ort": True}
    export_adapter(ExportConfig(adapter=alice, out=root / "merged", eval_data=data, **common))
    export_adapter(ExportConfig(adapter=alice, out=root / "swappable", mode="swappable", **common))
    export_adapter(ExportConfig(adapter=bob, out=root / "swappable", mode="swappable", **common))
    return {"root": root, "alice": alice, "bob": bob, "data": data, **{m: root / m for m in ("merged", "swappable")}}


GRAPHS = {"merged": "model", "swappable": "backbone"}


@pytest.mark.parametrize("mode", ["merged", "swappable"])
def test_int8_export_is_smaller_and_reports_agreement(quantized: dict[str, Path], mode: str) -> None:
    folder, stem = quantized[mode], GRAPHS[mode]
    report, manifest = _read_json(folder / "report.json"), _read_json(folder / "manifest.json")
    int8 = report["int8"]
    assert int8["graph"] == f"{stem}.int8.onnx" and report["parity"]["passed"]  # fp32 still held to 1e-4
    assert int8["bytes"] == (folder / int8["graph"]).stat().st_size < (folder / f"{stem}.onnx").stat().st_size / 2
    assert int8["vs_pytorch"]["argmax_agreement"] >= 0.5 and 0 < int8["vs_pytorch"]["max_abs_diff"] < 1
    assert int8["quantization"]["weight_type"] == "QInt8" and int8["quantization"]["per_user_tensors"] == "float32"
    assert int8["quantization"]["reduce_range"] is False  # what ships: phones are ARM
    here = export.quantize.parity_quantization()  # this host: x86 without VNNI measures a reduce_range copy
    assert {k: int8["vs_pytorch"][k] for k in here} == here and here["host"] == platform.machine()
    assert int8["shipped_graph_on_this_host"]["graph"] == f"{stem}.int8.onnx"
    assert manifest["graphs"] == {
        f"{stem}.onnx": {"precision": "fp32", "format": "onnx"},
        f"{stem}.int8.onnx": {"precision": "int8", "format": "onnx", "source": f"{stem}.onnx"},
        f"{stem}.ort": {"precision": "fp32", "format": "ort", "source": f"{stem}.onnx"},
        f"{stem}.int8.ort": {"precision": "int8", "format": "ort", "source": f"{stem}.int8.onnx"},
    }
    assert manifest["graph"] == f"{stem}.onnx" and set(manifest["graphs"]) <= set(manifest["files"])
    assert manifest["files"] == file_entries(folder)


@pytest.mark.parametrize(
    ("machine", "saturates", "copy"),
    [("x86_64", True, True), ("AMD64", True, True), ("x86_64", False, False), ("arm64", True, False)],
    ids=["x86-avx2", "windows-avx2", "x86-vnni", "arm64-not-probed"],
)
def test_int8_parity_on_a_saturating_x86_host_uses_a_reduce_range_copy_and_ships_the_full_range_graph(
    quantized: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    machine: str,
    saturates: bool,
    copy: bool,
) -> None:
    calls: list[bool] = []

    def recorded(*args: Any, reduce_range: bool = False) -> float:
        calls.append(reduce_range)
        return export.quantize.quantize_graph(*args, reduce_range=reduce_range)

    monkeypatch.setattr(export.quantize, "host_machine", lambda: machine)
    monkeypatch.setattr(export.quantize, "int8_products_saturate", lambda: saturates)
    monkeypatch.setattr(export.variants, "quantize_graph", recorded)
    out = tmp_path / "out"
    export_adapter(ExportConfig(adapter=quantized["alice"], out=out, quantize="int8"))
    int8 = _read_json(out / "report.json")["int8"]
    vs_pytorch, shipped = int8["vs_pytorch"], int8["shipped_graph_on_this_host"]
    assert calls == ([False, True] if copy else [False]) and vs_pytorch["reduce_range"] is copy
    assert vs_pytorch["host_saturates_u8s8"] is copy and vs_pytorch["host"] == shipped["host"] == machine
    assert machine in vs_pytorch["reason"] and shipped["graph"] == "model.int8.onnx" and 0 < shipped["max_abs_diff"] < 1
    if copy:  # the figure is the copy's: another graph, so other logits
        assert "reduce_range=True" in vs_pytorch["measured_on"] and "not in the bundle" in vs_pytorch["measured_on"]
        assert vs_pytorch["max_abs_diff"] != shipped["max_abs_diff"]
    else:
        assert vs_pytorch["measured_on"] == "model.int8.onnx"
        figures = ("max_abs_diff", "argmax_agreement")
        assert {k: vs_pytorch[k] for k in figures} == {k: shipped[k] for k in figures}
    # reduce_range never reaches the shipped graph: it is the same bytes whatever the host (the fixture's too).
    assert (out / "model.int8.onnx").read_bytes() == (quantized["merged"] / "model.int8.onnx").read_bytes()
    assert _read_json(out / "manifest.json")["files"] == file_entries(out)  # no scratch copy left behind


def test_the_saturation_probe_tells_exact_from_saturated_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    depth = export.quantize.SATURATION_PROBE_DEPTH
    saturated = (depth // 2) * 32767  # u8xs8 products added in int16 pairs, each pair clipped (vpmaddubsw)
    assert 0 < export.quantize._probe_sum() <= export.quantize.SATURATION_PROBE_EXACT  # clipping can only lower it
    monkeypatch.setattr(export.quantize, "_probe_sum", lambda: saturated)
    assert export.quantize.int8_products_saturate() is True
    monkeypatch.setattr(export.quantize, "_probe_sum", lambda: export.quantize.SATURATION_PROBE_EXACT)
    assert export.quantize.int8_products_saturate() is False


def _runner(folder: Path, graph: str, user: str | None = None) -> Callable[[list[str]], np.ndarray]:
    """Logits of ``folder / graph`` (an .onnx or .ort file) with ``user``'s adapter active, if any."""
    path = folder / graph
    run_graph = onnx_runner(path) if user is None else AdapterRunner(path, folder / "adapters" / f"{user}.onnx_adapter")
    return lambda texts: run_graph(_encode(folder, texts))


def test_swappable_int8_keeps_every_adapter_input_fp32(quantized: dict[str, Path]) -> None:
    folder = quantized["swappable"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(folder / g), options) for g in ("backbone.onnx", "backbone.int8.onnx")]
    fp32, int8 = ({i.name: (i.shape, i.type) for i in s.get_overridable_initializers()} for s in sessions)
    assert int8 == fp32 and len(fp32) == len(read_adapter_file(folder / "adapters" / "alice.onnx_adapter"))
    assert all(kind == "tensor(float)" for _, kind in int8.values())
    logits = {
        (user, g): _runner(folder, g, user)(PHONE_TEXTS)
        for user in ("alice", "bob")
        for g in ("backbone.onnx", "backbone.int8.onnx")
    }
    assert np.abs(logits["alice", "backbone.int8.onnx"] - logits["bob", "backbone.int8.onnx"]).max() > 1e-2
    for user in ("alice", "bob"):  # a head baked in as its zero default would give the bias alone
        np.testing.assert_allclose(logits[user, "backbone.int8.onnx"], logits[user, "backbone.onnx"], atol=0.1)


def test_eval_data_reports_fp32_and_int8_accuracy(quantized: dict[str, Path]) -> None:
    evaluation = _read_json(quantized["merged"] / "report.json")["eval"]
    assert evaluation["examples"] == len(EVAL_ROWS) // 5  # the seeded 20 % hold-out of a single file
    assert set(evaluation["accuracy"]) == {"model.onnx", "model.int8.onnx"}
    assert 0 <= evaluation["fp32_accuracy"] <= 1 and 0 <= evaluation["int8_accuracy"] <= 1
    change = 100 * (evaluation["int8_accuracy"] - evaluation["fp32_accuracy"])
    assert evaluation["int8_change_points"] == pytest.approx(change, abs=0.01)


@pytest.mark.parametrize(("mode", "user"), [("merged", None), ("swappable", "alice"), ("swappable", "bob")])
def test_ort_files_load_and_agree_with_their_onnx(quantized: dict[str, Path], mode: str, user: str | None) -> None:
    folder, stem = quantized[mode], GRAPHS[mode]
    texts = list(ExportConfig(adapter=Path("a"), out=Path("b")).texts)
    for precision in ("", ".int8"):
        onnx_logits = _runner(folder, f"{stem}{precision}.onnx", user)(texts)
        ort_logits = _runner(folder, f"{stem}{precision}.ort", user)(texts)
        assert (ort_logits.argmax(-1) == onnx_logits.argmax(-1)).all()
    ort_report = _read_json(folder / "report.json")["ort"]
    assert ort_report[f"{stem}.ort"]["max_abs_diff_vs_onnx"] <= 1e-4


@pytest.mark.parametrize("mode", ["merged", "swappable"])
def test_ort_bundles_list_the_operators_of_their_ort_graphs(quantized: dict[str, Path], mode: str) -> None:
    folder, stem = quantized[mode], GRAPHS[mode]
    manifest, report = _read_json(folder / "manifest.json"), _read_json(folder / "report.json")
    config = folder / "required_operators.config"
    assert (
        manifest["required_operators"] == "required_operators.config"
        and "required_operators.config" in manifest["files"]
    )
    section = report["required_operators"]  # swappable: carried over when bob joined
    assert section["graphs"] == [f"{stem}.ort", f"{stem}.int8.ort"] and section["file"] == "required_operators.config"
    operators = config_operators(config)  # ONNX Runtime's build parser reads it
    assert section["operators"] == sum(len(ops) for ops in operators.values())
    fp32, int8 = onnx_operators(folder / f"{stem}.onnx"), onnx_operators(folder / f"{stem}.int8.onnx")
    # Optimizing only removes or fuses ai.onnx operators (into com.microsoft ones): it names none the graphs lack,
    assert operators["ai.onnx"] <= fp32 | int8 and operators["com.microsoft"]
    # and it covers both graphs: the int8 graph's quantizer and the fp32 graph's head (int8 has no Gemm).
    assert {"Gather", "LayerNormalization", "Softmax", "DynamicQuantizeLinear", "Gemm"} <= operators["ai.onnx"]
    assert "DynamicQuantizeLinear" not in fp32 and "Gemm" not in int8
    assert str(folder.parent) not in config.read_text()  # its comments name bundle files, not the export's scratch


def test_a_tampered_operators_list_fails_verification(quantized: dict[str, Path], tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(quantized["swappable"], tmp_path / "bundle"))
    config = bundle / "required_operators.config"
    config.write_text(config.read_text().replace("Softmax", "SoftmaX"))  # same size, other sha256
    with pytest.raises(BundleError, match=r"required_operators.config differs from the manifest \(sha256\)"):
        check_files(bundle, read_bundle_manifest(bundle))
    with pytest.raises(BundleError, match="required_operators.config differs"):  # adding a user checks every file
        export_adapter(ExportConfig(adapter=quantized["bob"], out=bundle, mode="swappable", adapter_name="carol"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (7, "required_operators must be a JSON str"),
        ("../required_operators.config", "required_operators: '../required_operators.config' is not a plain"),
        ("other.config", "required_operators 'other.config' is not listed in files"),
    ],
)
def test_a_hostile_operators_field_is_refused_by_name(
    quantized: dict[str, Path], tmp_path: Path, value: Any, message: str
) -> None:
    bundle = Path(shutil.copytree(quantized["merged"], tmp_path / "bundle"))
    manifest = _read_json(bundle / "manifest.json")
    manifest["required_operators"] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        read_bundle_manifest(bundle)


@pytest.mark.parametrize(
    ("precision", "fmt", "graph"),
    [("int8", None, "backbone.int8.onnx"), ("int8", "ort", "backbone.int8.ort"), (None, "ort", "backbone.ort")],
)
def test_the_phone_runs_the_graph_variant_it_asks_for(
    quantized: dict[str, Path], precision: str | None, fmt: str | None, graph: str
) -> None:
    folder = quantized["swappable"]
    phone = PhoneClassifier(folder, precision, fmt)
    assert phone.graph_name == graph
    phone.use("bob")
    expected = _runner(folder, graph, "bob")(PHONE_TEXTS)  # the same file, loaded by path
    np.testing.assert_allclose(phone.logits(PHONE_TEXTS), expected, atol=1e-6)
    command = [
        sys.executable,
        str(PROJECT_ROOT / "export" / "phone_demo.py"),
        str(folder),
        "--json",
        "--text",
        "top up",
    ]
    command += [*(["--precision", precision] if precision else []), *(["--format", fmt] if fmt else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["graph"] == graph, done.stderr[-2000:]


def test_a_graph_variant_the_bundle_lacks_is_refused_with_what_it_has(exported: Build) -> None:
    with pytest.raises(BundleError, match="no int8 graph in ort format \\(it has: fp32 onnx\\); export it with"):
        PhoneClassifier(exported("lora"), "int8", "ort")
    assert PhoneClassifier(exported("lora"), "fp32", "onnx").graph_name == "model.onnx"


def test_joining_needs_the_graphs_it_asks_for(two_users: Path, bob: Path, tmp_path: Path) -> None:
    bundle = _copy(two_users, tmp_path)
    before = _snapshot(bundle)
    for fields, message in (({"quantize": "int8"}, "has no int8 graph"), ({"ort": True}, "has no .ort graph")):
        with pytest.raises(ConfigError, match=message):
            export_adapter(ExportConfig(adapter=bob, out=bundle, mode="swappable", adapter_name="carol", **fields))
    assert _snapshot(bundle) == before


def test_cli_prints_int8_accuracy(quantized: dict[str, Path], tmp_path: Path) -> None:
    args = ["export", "--adapter", str(quantized["alice"]), "--out", str(tmp_path / "out"), "--quantize", "int8"]
    result = runner.invoke(app, [*args, "--eval-data", str(quantized["data"])])
    assert result.exit_code == 0, result.output
    assert "int8_accuracy_change" in result.stdout and "accuracy model.int8.onnx" in result.stdout
    assert (tmp_path / "out" / "model.int8.onnx").is_file() and not (tmp_path / "out" / "model.ort").exists()
    assert not (tmp_path / "out" / "required_operators.config").exists()  # written with --ort only
    assert "required_operators" not in _read_json(tmp_path / "out" / "manifest.json")
