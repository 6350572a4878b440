"""Adversarial review of issue 17's defences: each test reproduces one finding and fails until it is fixed.

Adapter folders: a manifest whose recorded schema is small but whose method config builds a large adapter
is built before ``max_params`` refuses it; a backbone name ``~someone/...`` raises RuntimeError. Phone bundles:
a graph whose logits are strings, or that returns fewer rows than texts, and a tokenizer.json whose regex
makes tokenizers panic, end the phone demo in a traceback instead of ``error:`` and exit 2. Scenarios:
``data = "~someone/x"`` raises RuntimeError.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
import peft
import pytest
import torch
from onnx import TensorProto, helper
from tokenizers import Tokenizer, models, pre_tokenizers

from export.errors import BundleError
from export.phone_demo import PhoneClassifier, main
from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.checkpoint.folder import MANIFEST, load_adapter, save_adapter
from fedadapt.checkpoint.limits import AdapterLimits
from fedadapt.delta.state import AdapterSchema
from fedadapt.errors import AdapterFolderError, ConfigError, FedAdaptError
from fedadapt.fleet.scenario_file import load_scenario

NO_SUCH_USER = "~no_such_user_fedadapt_review"

# ------------------------------------------------------------------------------------ adapter folders


def _folder(tiny_bert: Path, out: Path, method: str, **fields: Any) -> Path:
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=3))
    return save_adapter(AdapterModel(loaded, make_method_config(method, **fields)), out)


def _rewrite(folder: Path, change: Any) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _small_schema_big_method(method: dict[str, Any]) -> Any:
    """Set ``method`` (and schema.method) but record no tensors: the schema_id is rehashed, a consistent lie."""

    def change(manifest: dict[str, Any]) -> None:
        manifest["method"].update(method)
        manifest["schema"]["method"].update(method)
        manifest["schema"]["tensors"] = []
        manifest["schema_id"] = AdapterSchema.from_dict(manifest["schema"]).schema_id

    return change


# LoRA of rank = hidden size on every linear and the embeddings builds 26,976 values; prefix tuning of
# max_position_embeddings tokens builds 64 x (2 layers x 2 x 32) = 8,192. Both pass every per-field cap
# (r <= hidden size, tokens <= positions), and the recorded schema (empty) passes max_params.
BIG_METHODS = [
    ("lora", {"r": 32, "target_modules": ["query", "key", "value", "dense", "word_embeddings"]}),
    ("prefix", {"num_virtual_tokens": 64}),
]


@pytest.mark.parametrize(("method", "fields"), BIG_METHODS, ids=[m for m, _ in BIG_METHODS])
def test_max_params_bounds_what_the_method_builds_not_only_the_recorded_schema(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, fields: dict[str, Any]
) -> None:
    """fedadapt/checkpoint/folder.py load_adapter: the schema_id comparison that catches the lie runs after building.

    On a 7B backbone (hidden 4096) LoRA r=4096 on every linear is ~10^10 values (40 GB) from a 1 KB
    manifest, while max_params (2^30) is meant to stop anything above 4 GB before it is allocated.
    """
    folder = _folder(tiny_bert, tmp_path / "folder", method)
    _rewrite(folder, _small_schema_big_method(fields))

    wrap = peft.get_peft_model

    def built(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        # A plan on the meta device allocates nothing; only building on real weights is too early.
        if any(not p.is_meta for p in model.parameters()):
            raise AssertionError("the adapter was built before max_params was checked against what it builds")
        return wrap(model, *args, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", built)
    with pytest.raises(AdapterFolderError, match="allowed"):
        load_adapter(folder, limits=AdapterLimits(max_params=4096))


def test_a_backbone_name_of_an_unknown_users_home_is_a_named_error(tiny_bert: Path, tmp_path: Path) -> None:
    """fedadapt/model/backbone.py resolve_backbone_path: Path.expanduser() raises RuntimeError for ~unknown_user."""
    folder = _folder(tiny_bert, tmp_path / "folder", "lora")
    _rewrite(folder, lambda m: m["backbone"].update(name_or_path=f"{NO_SUCH_USER}/model"))
    with pytest.raises(FedAdaptError, match="name_or_path|backbone"):
        load_adapter(folder)


# ------------------------------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("key", ["data", "backbone"])
def test_a_scenario_path_of_an_unknown_users_home_is_a_config_error(tmp_path: Path, key: str) -> None:
    """fedadapt/fleet/scenario.py _relative_to: Path(value).expanduser() raises RuntimeError before any check."""
    file = tmp_path / "scenario.toml"
    file.write_text(f'{key} = "{NO_SUCH_USER}/x"\n')
    with pytest.raises(ConfigError):
        load_scenario(file)


# --------------------------------------------------------------------------------------- phone bundles


def _graph(logits_type: int = TensorProto.FLOAT, values: Any = (0.1, 0.9)) -> bytes:
    """A merged graph taking input_ids and attention_mask whose logits are one constant (1, 2) row."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "T"]) for n in ("input_ids", "attention_mask")]
    output = helper.make_tensor_value_info("logits", logits_type, ["B", 2])
    constant = helper.make_tensor("c", logits_type, [1, 2], list(values))
    node = helper.make_node("Constant", [], ["logits"], value=constant)
    model = helper.make_model(
        helper.make_graph([node], "g", inputs, [output]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _tokenizer(pre_tokenizer: dict[str, Any] | None = None) -> bytes:
    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "top": 2, "up": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    data = json.loads(tokenizer.to_str())
    if pre_tokenizer is not None:
        data["pre_tokenizer"] = pre_tokenizer
    return json.dumps(data).encode()


def _merged_bundle(folder: Path, graph: bytes, tokenizer: bytes | None = None) -> Path:
    """A hand-made merged bundle whose manifest records every file's true size and sha256."""
    files = {"model.onnx": graph, "tokenizer.json": tokenizer or _tokenizer(), "labels.json": b'["a", "b"]'}
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = {
        "format": "fedadapt.export.v1",
        "mode": "merged",
        "graph": "model.onnx",
        "files": {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()},
        "max_sequence_length": 16,
        "tokenizer": {"pad_token": "[PAD]", "pad_token_id": 0},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_hand_made_bundle_is_good(tmp_path: Path) -> None:
    """The baseline the attacks below change one thing of: it classifies and exits 0."""
    assert main([str(_merged_bundle(tmp_path / "b", _graph())), "--text", "top up"]) == 0


def test_string_logits_end_in_error_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export/phone_demo.py classify: np.exp/max on a string tensor raises TypeError, which main does not catch."""
    bundle = _merged_bundle(tmp_path / "b", _graph(TensorProto.STRING, [b"a", b"b"]))
    assert main([str(bundle), "--text", "top up"]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_logits_with_fewer_rows_than_texts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export/phone_demo.py classify checks the logits' width, not their rows.

    --json prints one prediction for two texts and exits 0; without --json the strict zip in main raises
    ValueError outside its try (a traceback, exit 1).
    """
    bundle = _merged_bundle(tmp_path / "b", _graph())
    with pytest.raises(BundleError):
        PhoneClassifier(bundle).classify(["top up", "up"])
    assert main([str(bundle), "--text", "top up", "--text", "up"]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_a_tokenizer_regex_that_panics_ends_in_error_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tokenizers panics (pyo3 PanicException, a BaseException) when Oniguruma's retry limit is hit.

    A catastrophic-backtracking Split pattern in tokenizer.json passes every bundle check; encoding a
    40-character text then raises PanicException through classify and main.
    """
    split = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False}
    bundle = _merged_bundle(tmp_path / "b", _graph(), _tokenizer(split))
    assert main([str(bundle), "--text", "a" * 40 + "!"]) == 2
    assert "error:" in capsys.readouterr().err
