"""The adapter folder: one format written by training and checkpoints, read by the exporter.

Layout::

    fedadapt_adapter.json        method config, backbone id + fingerprint, pooling, labels,
                                 state split, schema and schema id
    adapter_config.json          PEFT methods: PEFT's own files, so that
    adapter_model.safetensors      PeftModel.from_pretrained(classifier, folder) loads them
    adapter.safetensors          fedadapt's methods: the full trainable state by schema name

A folder is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written adapter behind. A folder read may come from anyone: its manifest is
checked field by field and against ``AdapterLimits``, and what it builds is worked out on the meta
device, before anything is built; its weights are checked against the model built before they are
copied in (docs/adapter-folders.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import peft
from safetensors.torch import save_file

from fedadapt import jsonsafe
from fedadapt.checkpoint.limits import (
    DEFAULT_LIMITS,
    AdapterLimits,
    BackboneDims,
    check_fits_backbone,
    read_backbone_config,
)
from fedadapt.checkpoint.manifest import FOLDER_FORMAT, MANIFEST, OWN_WEIGHTS, PEFT_WEIGHTS, check_manifest
from fedadapt.checkpoint.plan import check_planned_build, recorded_backbone
from fedadapt.checkpoint.weights import is_file_named, read_weight_file, specs_of
from fedadapt.errors import AdapterFolderError, SchemaMismatch
from fedadapt.methods import config_to_dict, method_config_from_dict
from fedadapt.model.adapter_model import AdapterModel, StateSplit
from fedadapt.model.backbone import load_backbone


def weight_files(model: AdapterModel) -> tuple[str, ...]:
    """Names of the files that hold the adapter's weights in its folder."""
    return PEFT_WEIGHTS if model.method.saves_peft_format else (OWN_WEIGHTS,)


def save_adapter(model: AdapterModel, out_dir: str | Path) -> Path:
    """Write ``model``'s adapter folder to ``out_dir`` atomically and return its path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdapterFolderError(f"{out} is a file; give a folder path for the adapter")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise AdapterFolderError(f"{out} exists and is not an adapter folder; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if model.method.saves_peft_format:
            # The backbone is frozen, so embeddings never change: skip PEFT's hub lookup for that.
            cast(peft.PeftModel, model.module).save_pretrained(str(staging), save_embedding_layers=False)
        else:
            save_file(model.state(), str(staging / OWN_WEIGHTS), metadata={"schema_id": model.schema_id})
        _write_json(staging / MANIFEST, _manifest(model))
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_manifest(folder: str | Path, limits: AdapterLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The folder's manifest, every field checked (``fedadapt.checkpoint.manifest``) before anything is built from it.

    AdapterFolderError if it is missing, of another format, malformed or asks for more than ``limits``
    allow; JsonInputError if it is not JSON, too large or too deeply nested.
    """
    path = Path(folder) / MANIFEST
    if not is_file_named(path):
        raise AdapterFolderError(f"{folder} is not a fedadapt adapter folder: {MANIFEST} is missing")
    data = jsonsafe.load_file(path, max_bytes=limits.max_manifest_bytes)
    return check_manifest(data, path, limits)


def load_adapter(
    folder: str | Path, backbone: str | None = None, limits: AdapterLimits = DEFAULT_LIMITS
) -> AdapterModel:
    """Load an adapter folder onto its backbone (or onto ``backbone``, which must match it).

    Nothing is built before the manifest has passed its checks, its sizes have been compared with the
    backbone's dimensions (read from its config alone) and what its method builds has been worked out
    on the meta device and compared with ``limits`` and the recorded schema (``fedadapt.checkpoint.plan``);
    the weights are checked against the model built (``fedadapt.checkpoint.weights``) before they are copied in.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, limits)
    recorded = manifest["backbone"]
    config = recorded_backbone(manifest, backbone)
    method = method_config_from_dict(manifest["method"])
    model_config = read_backbone_config(config.name_or_path)
    check_fits_backbone(method, config.num_labels, BackboneDims.of(model_config), folder / MANIFEST, limits)
    check_planned_build(manifest, model_config, folder / MANIFEST, limits, config.name_or_path)
    loaded = load_backbone(config)
    if loaded.fingerprint != recorded["fingerprint"]:
        raise AdapterFolderError(
            f"{folder} was trained on backbone {recorded['name_or_path']!r} (fingerprint "
            f"{recorded['fingerprint'][:12]}…), but the backbone loaded has fingerprint {loaded.fingerprint[:12]}…; "
            "load it onto the same backbone weights"
        )
    split = StateSplit(personal=tuple(manifest["split"]["personal"]))
    model = AdapterModel(loaded, method, split, tuple(manifest["labels"]))
    if model.schema_id != manifest["schema_id"]:
        raise SchemaMismatch(
            f"{folder} has schema {manifest['schema_id']}, but its method config builds schema {model.schema_id}; "
            "the folder was written by an incompatible fedadapt or PEFT version"
        )
    _load_weights(model, folder)
    return model


def _load_weights(model: AdapterModel, folder: Path) -> None:
    missing = [f for f in weight_files(model) if not is_file_named(folder / f)]
    if missing:
        raise AdapterFolderError(f"{folder} lacks weight files {missing}")
    if not model.method.saves_peft_format:
        model.load_state(read_weight_file(folder / OWN_WEIGHTS, model.schema.specs()))
        return
    # PEFT names the tensors of its files its own way; the model built says which it needs.
    expected = specs_of(peft.get_peft_model_state_dict(model.module))
    peft.set_peft_model_state_dict(model.module, read_weight_file(folder / PEFT_WEIGHTS[1], expected))


def _manifest(model: AdapterModel) -> dict[str, Any]:
    config = model.backbone.config
    return {
        "format": FOLDER_FORMAT,
        "method": config_to_dict(model.method),
        "backbone": {
            "name_or_path": config.name_or_path,
            "fingerprint": model.backbone.fingerprint,
            "num_labels": config.num_labels,
            "pooling": {"mode": model.backbone.pooling.mode, "normalize": model.backbone.pooling.normalize},
            "head_dropout": config.head_dropout,
            "seed": config.seed,
        },
        "labels": list(model.labels),
        "split": {"personal": list(model.split.personal)},
        "schema_id": model.schema_id,
        "schema": model.schema.to_dict(),
        "weights": list(weight_files(model)),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _replace_dir(staging: Path, out: Path) -> None:
    """Swap ``staging`` in as ``out``; the old folder is removed only after the swap."""
    if not out.exists():
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, retired / out.name)
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
