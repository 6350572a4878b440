"""What an adapter folder's method config builds on a backbone, worked out on PyTorch's meta device first.

A manifest's recorded schema is a claim; what is allocated is what its method config builds on the
backbone: LoRA of rank r on every module it targets (embeddings too), prefix tuning's tokens × layers
× 2 × hidden, a stack's frozen adapters. So the classifier is built from the backbone's config alone
on the meta device (shapes without values or memory; initialisation is a no-op there), the method is
applied to it exactly as ``AdapterModel`` applies it, and before anything real is built:

- every value the method allocates or trains (adapter, frozen parts such as FFA-LoRA's A or stacked
  and fused adapters, the head and PEFT's copy of it) must be within ``AdapterLimits.max_params``;
- its trainable tensors (names, shapes, parts and roles, in order) must be those the schema records.

One way for every method, including methods registered later, instead of a formula per method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedadapt.checkpoint.limits import AdapterLimits
from fedadapt.errors import AdapterFolderError, SchemaMismatch
from fedadapt.methods import method_config_from_dict
from fedadapt.model.adapter_model import AdapterModel, StateSplit
from fedadapt.model.backbone import BackboneConfig, meta_backbone
from fedadapt.model.pooling import PoolingConfig

_Entry = tuple[str, tuple[int, ...], str, str]  # name, shape, part, role


def recorded_backbone(manifest: dict[str, Any], name_or_path: str | None = None) -> BackboneConfig:
    """The backbone config a checked manifest records (on backbone ``name_or_path`` if given)."""
    recorded = manifest["backbone"]
    return BackboneConfig(
        name_or_path=name_or_path or recorded["name_or_path"],
        num_labels=recorded["num_labels"],
        pooling=PoolingConfig(**recorded["pooling"]),
        head_dropout=recorded["head_dropout"],
        seed=recorded["seed"],
    )


def check_planned_build(
    manifest: dict[str, Any], model_config: Any, where: Path, limits: AdapterLimits, name_or_path: str | None = None
) -> None:
    """Refuse the checked ``manifest`` (read from ``where``) if what it builds is too large or not its schema.

    ``model_config`` is the transformers config of the backbone it is to be built on. AdapterFolderError
    above ``limits.max_params``; SchemaMismatch if the trainable tensors are not the recorded ones.
    """
    planned = plan(manifest, model_config, name_or_path)
    values = allocated_values(planned)
    if values > limits.max_params:
        raise AdapterFolderError(
            f"{where}: method {manifest['method']['name']!r} builds {values} values on this backbone (adapter, "
            f"frozen parts and head), more than the {limits.max_params} allowed (max_params)"
        )
    built = [(s.name, s.shape, s.part, s.role) for s in planned.schema.tensors]
    recorded = [(t["name"], tuple(t["shape"]), t["part"], t["role"]) for t in manifest["schema"]["tensors"]]
    if built != recorded:
        pairs = enumerate(zip(built, recorded, strict=False))
        first = next((i for i, (mine, theirs) in pairs if mine != theirs), min(len(built), len(recorded)))
        raise SchemaMismatch(
            f"{where}: its method config builds {len(built)} trainable tensors but schema.tensors records "
            f"{len(recorded)}; the first difference is tensor {first}: built {_show(built, first)}, recorded "
            f"{_show(recorded, first)}. The folder was altered or written by an incompatible fedadapt or PEFT"
        )


def plan(manifest: dict[str, Any], model_config: Any, name_or_path: str | None = None) -> AdapterModel:
    """The adapter model a checked manifest builds, on the meta device (nothing allocated, nothing read)."""
    config = recorded_backbone(manifest, name_or_path)
    with torch.device("meta"):  # what the method creates lands on meta too, not on the CPU first
        loaded = meta_backbone(config, model_config, manifest["backbone"]["fingerprint"])
        return AdapterModel(
            loaded,
            method_config_from_dict(manifest["method"]),
            StateSplit(personal=tuple(manifest["split"]["personal"])),
            tuple(manifest["labels"]),
        )


def allocated_values(model: AdapterModel) -> int:
    """Values of every parameter that is trained or is not the backbone's own: what the method costs."""
    backbone = {id(p) for p in model.backbone.frozen.params.values()}
    return sum(p.numel() for p in model.module.parameters() if p.requires_grad or id(p) not in backbone)


def _show(entries: Sequence[_Entry], index: int) -> str:
    if index >= len(entries):
        return "nothing"
    name, shape, part, role = entries[index]
    return f"{name[:200]!r} of shape {shape} ({part} {role})"
