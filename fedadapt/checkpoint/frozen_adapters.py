"""Trained bottleneck adapter folders loaded frozen into a live model: what stacking, AdapterFusion
and hot-swapping build on.

Every folder is checked before anything is built from it: its manifest, its sizes against the
backbone, what it would build against the limits (on the meta device) and every tensor of its
weight file against the adapter built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedadapt.adapters.bottleneck import DEFAULT_ADAPTER, add_bottleneck
from fedadapt.adapters.slots import find_slots
from fedadapt.checkpoint.folder import MANIFEST, OWN_WEIGHTS, read_manifest
from fedadapt.checkpoint.limits import DEFAULT_LIMITS, AdapterLimits, BackboneDims, check_fits_backbone
from fedadapt.checkpoint.plan import check_planned_build
from fedadapt.checkpoint.weights import read_weight_file
from fedadapt.delta.state import State, TensorSpec, dtype_name
from fedadapt.errors import AdapterFolderError
from fedadapt.methods.bottleneck import BOTTLENECK_METHODS
from fedadapt.methods.registry import method_config_from_dict

if TYPE_CHECKING:
    from fedadapt.model.backbone import SequenceClassifier


def load_frozen_adapter(model: SequenceClassifier, name: str, folder: str | Path) -> str:
    """Insert the bottleneck adapter saved in ``folder`` as adapter ``name``, frozen; return its schema id.

    ``folder`` is read from wherever it points (relative to the current directory), like any folder.
    """
    manifest = read_manifest(folder)
    insert_frozen_adapter(model, name, Path(folder), manifest)
    schema_id: str = manifest["schema_id"]
    return schema_id


def insert_frozen_adapter(
    model: SequenceClassifier,
    name: str,
    folder: Path,
    manifest: dict[str, Any],
    limits: AdapterLimits | None = None,
) -> State:
    """Insert the bottleneck adapter of ``folder`` (whose checked ``manifest`` is given) as ``name``, frozen.

    Returns the folder's head tensors (hot-swapping serves them). The sizes are checked against the
    backbone, and what the folder builds against ``limits`` and its schema on the meta device
    (``fedadapt.checkpoint.plan``), before the adapter is built; every tensor of the weight file is checked
    against the adapter built (``read_weight_file``) before it is copied; on any failure the adapter is
    taken out again. On a meta ``model`` (a planned build of a stack or fusion) only the shapes are made.
    """
    method = manifest["method"]["name"]
    if method not in BOTTLENECK_METHODS:
        raise AdapterFolderError(f"{folder} holds a {method!r} adapter; only {BOTTLENECK_METHODS} can be composed")
    recorded = manifest["backbone"]["fingerprint"]
    if recorded != model.backbone_fingerprint:
        raise AdapterFolderError(
            f"{folder} was trained on another backbone (fingerprint {recorded[:12]}…, "
            f"this one {model.backbone_fingerprint[:12]}…)"
        )
    config = method_config_from_dict(manifest["method"])
    num_labels = manifest["backbone"]["num_labels"]
    limits = limits or DEFAULT_LIMITS
    check_fits_backbone(config, num_labels, BackboneDims.of(model.config), folder / MANIFEST, limits)
    planned = is_planned(model)
    if not planned:  # a stack's or fusion's own plan counts this adapter among all it builds
        check_planned_build(manifest, model.config, folder / MANIFEST, limits)
    add_bottleneck(model.backbone, name, config)  # type: ignore[arg-type]
    try:
        inserted = {n: p.requires_grad_(False) for n, p in model.named_parameters() if f".adapters.{name}." in n}
        if planned:
            return {}
        saved_as = {n: n.replace(f".adapters.{name}.", f".adapters.{DEFAULT_ADAPTER}.") for n in inserted}
        head = model.classifier.weight
        expected = (
            *(
                TensorSpec(saved_as[n], tuple(p.shape), dtype_name(p.dtype), "shared", "adapter")
                for n, p in inserted.items()
            ),
            TensorSpec("classifier.weight", (num_labels, head.shape[1]), dtype_name(head.dtype), "shared", "head"),
            TensorSpec("classifier.bias", (num_labels,), dtype_name(head.dtype), "shared", "head"),
        )
        saved = read_weight_file(folder / OWN_WEIGHTS, expected)
        with torch.no_grad():
            for target_name, target in inserted.items():
                target.copy_(saved[saved_as[target_name]])  # shapes are equal: read_weight_file checked them
    except BaseException:
        _remove_adapter(model, name)
        raise
    return {n: t for n, t in saved.items() if n.startswith("classifier.")}


def is_planned(model: SequenceClassifier) -> bool:
    """Whether ``model`` is a meta-device plan (``fedadapt.checkpoint.plan``): shapes only, no weights to read."""
    return model.classifier.weight.is_meta


def _remove_adapter(model: SequenceClassifier, name: str) -> None:
    for slot in find_slots(model.backbone):
        if name in slot.adapters:
            del slot.adapters[name]
            slot.parallel.pop(name, None)
