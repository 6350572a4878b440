"""Size facts about an adapter on a backbone: parameters and bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fedadapt.checkpoint.folder import save_adapter, weight_files
from fedadapt.delta.serialize import serialize_state
from fedadapt.methods import MethodConfig, config_to_dict
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.backbone import BackboneConfig, load_backbone


def adapter_info(method: MethodConfig, backbone: BackboneConfig) -> dict[str, Any]:
    """Parameter counts and byte sizes of ``method`` on ``backbone`` (loads the backbone)."""
    model = AdapterModel(load_backbone(backbone), method)
    total, trainable = model.num_parameters()
    backbone_params = sum(p.numel() for p in model.backbone.frozen.params.values())
    shared_bytes = len(serialize_state(model.state("shared"), model.schema, "shared"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter")
        adapter_bytes = sum(
            (folder / name).stat().st_size for name in weight_files(model) if name.endswith(".safetensors")
        )
    return {
        "method": method.name,
        "method_config": config_to_dict(method),
        "backbone": backbone.name_or_path,
        "backbone_fingerprint": model.backbone.fingerprint,
        "pooling": model.backbone.pooling.mode,
        "num_labels": backbone.num_labels,
        "total_params": total,
        "backbone_params": backbone_params,
        "trainable_params": trainable,
        "trainable_fraction": trainable / total,
        "shared_params": model.schema.num_params("shared"),
        "shared_bytes": shared_bytes,
        "adapter_bytes": adapter_bytes,
        "schema_id": model.schema_id,
    }
