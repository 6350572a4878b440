"""The frozen-backbone guard, weight fingerprints, and backbone folders that cannot load."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.errors import BackboneError, FrozenBackboneError
from fedadapt.model.freeze import freeze_module, guard_frozen

WEIGHT = "encoder.layer.0.attention.self.query.weight"


def _cfg(folder: Path) -> BackboneConfig:
    return BackboneConfig(name_or_path=str(folder), num_labels=3)


def _build(folder: Path, method: str = "lora") -> AdapterModel:
    return AdapterModel(load_backbone(_cfg(folder)), make_method_config(method))


def _copy_with_weights(src: Path, dst: Path, edit: object) -> Path:
    """Copy a backbone folder and rewrite its model.safetensors through ``edit(state_dict)``."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = load_file(str(weights))
    edit(state)  # type: ignore[operator]
    save_file(state, str(weights), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------- guard


def test_check_frozen_names_a_thawed_weight(tiny_bert: Path) -> None:
    model = _build(tiny_bert)
    name = next(n for n in model.frozen.params if n.endswith(WEIGHT))
    model.frozen.check_frozen()
    model.frozen.params[name].requires_grad_(True)
    with pytest.raises(FrozenBackboneError, match=re.escape(name)):
        model.frozen.check_frozen()
    with pytest.raises(FrozenBackboneError, match="require grad"), guard_frozen(model.frozen):
        pass


def test_guard_fires_on_in_place_change(tiny_bert: Path) -> None:
    model = _build(tiny_bert)
    name = next(n for n in model.frozen.params if n.endswith(WEIGHT))
    with pytest.raises(FrozenBackboneError, match=re.escape(name)), guard_frozen(model.frozen), torch.no_grad():
        model.frozen.params[name].add_(1e-3)


def test_guard_catches_a_change_of_one_element(tiny_bert: Path) -> None:
    model = _build(tiny_bert, "ia3")
    name = sorted(model.frozen.params)[-1]
    with pytest.raises(FrozenBackboneError, match="changed"), guard_frozen(model.frozen), torch.no_grad():
        flat = model.frozen.params[name].view(-1)
        flat[0] = torch.nextafter(flat[0], flat[0] + 1)


def test_guard_passes_an_unchanged_block(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model = _build(tiny_bert)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    with guard_frozen(model.frozen):
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        model.eval()
    model.frozen.check_unchanged()


def test_guard_ignores_released_bitfit_biases(tiny_bert: Path) -> None:
    model = _build(tiny_bert, "bitfit")
    bias = next(p for n, p in model.module.named_parameters() if n.endswith("query.bias"))
    with guard_frozen(model.frozen), torch.no_grad():
        bias.add_(1.0)


def test_freeze_module_freezes_everything() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    frozen = freeze_module(module)
    assert set(frozen.params) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert not any(p.requires_grad for p in module.parameters())
    frozen.check_frozen()
    frozen.check_unchanged()


# ------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_deterministic(tiny_bert: Path) -> None:
    first = load_backbone(_cfg(tiny_bert))
    second = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=5, seed=3))
    assert re.fullmatch(r"[0-9a-f]{64}", first.fingerprint)
    # The head (labels, seed) is not part of the backbone's identity.
    assert first.fingerprint == second.fingerprint == first.frozen.fingerprint


def test_fingerprint_differs_for_different_weights(tiny_bert: Path, tmp_path: Path) -> None:
    def nudge(state: dict[str, torch.Tensor]) -> None:
        state[WEIGHT] = state[WEIGHT].clone()
        state[WEIGHT][0, 0] += 1e-3

    changed = _copy_with_weights(tiny_bert, tmp_path / "changed", nudge)
    assert load_backbone(_cfg(changed)).fingerprint != load_backbone(_cfg(tiny_bert)).fingerprint


def test_fingerprint_does_not_depend_on_the_folder_path(tiny_bert: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bert, tmp_path / "copy")
    assert load_backbone(_cfg(copy)).fingerprint == load_backbone(_cfg(tiny_bert)).fingerprint


def test_fingerprint_is_unchanged_by_methods(tiny_bert: Path) -> None:
    """The schema carries the backbone fingerprint taken at freeze time, whatever the method."""
    reference = load_backbone(_cfg(tiny_bert)).fingerprint
    for method in ("lora", "bitfit", "prompt"):
        assert _build(tiny_bert, method).schema.backbone_fingerprint == reference


# ---------------------------------------------------------------------------------- broken folders


def test_missing_weight_raises_backbone_error(tiny_bert: Path, tmp_path: Path) -> None:
    def drop(state: dict[str, torch.Tensor]) -> None:
        del state[WEIGHT]

    broken = _copy_with_weights(tiny_bert, tmp_path / "missing", drop)
    with pytest.raises(BackboneError, match=re.escape(WEIGHT)):
        load_backbone(_cfg(broken))


def test_missing_unused_pooler_is_fine(tiny_bert: Path, tmp_path: Path) -> None:
    """A mean-pooled backbone drops BERT's NSP pooler, so its weights need not be in the folder."""

    def drop_pooler(state: dict[str, torch.Tensor]) -> None:
        for name in [n for n in state if n.startswith("pooler.")]:
            del state[name]

    folder = _copy_with_weights(tiny_bert, tmp_path / "nopooler", drop_pooler)
    assert load_backbone(_cfg(folder)).fingerprint == load_backbone(_cfg(tiny_bert)).fingerprint


def test_folder_without_config_raises_backbone_error(tiny_bert: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_bert, tmp_path / "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(BackboneError, match=r"config\.json"):
        load_backbone(_cfg(folder))


def test_empty_folder_raises_backbone_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneError):
        load_backbone(_cfg(tmp_path))


def test_nonexistent_folder_raises_backbone_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="could not load backbone"):
        load_backbone(_cfg(tmp_path / "does-not-exist"))
