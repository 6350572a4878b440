"""Composition over one backbone: stacking adapters and AdapterFusion, as adapter methods.

Both start from trained bottleneck adapter folders, load them frozen under their own
names, and train something new on top: a task adapter above the stack, or (AdapterFusion
stage 2, Pfeiffer et al., EACL 2021) only a per-layer fusion attention over their outputs.
Folders are where the adapters come from, not what they are: the schema records their
schema ids and a hash of their frozen weights instead of their paths, so devices with
different paths agree and devices with differently trained adapters do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedadapt.errors import AdapterFolderError, ConfigError

if TYPE_CHECKING:
    # AppliedMethod: here for annotations, in apply() at run time. The registry in fedadapt.methods
    # imports this module's configs, so importing the methods package at the top made a fresh
    # `import fedadapt.adapters.<this module>` fail on a partially initialized module.
    from fedadapt.adapter_limits import AdapterLimits
    from fedadapt.backbone import SequenceClassifier
    from fedadapt.methods.base import AppliedMethod
    from fedadapt.state import State

BOTTLENECK_METHODS = ("houlsby", "pfeiffer", "parallel")
FUSION = "fusion"


def load_frozen_adapter(model: SequenceClassifier, name: str, folder: str | Path) -> str:
    """Insert the bottleneck adapter saved in ``folder`` as adapter ``name``, frozen; return its schema id.

    ``folder`` is read from wherever it points (relative to the current directory), like any folder.
    """
    from fedadapt.folder import read_manifest

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
    (``fedadapt.adapter_plan``), before the adapter is built; every tensor of the weight file is checked
    against the adapter built (``read_weight_file``) before it is copied; on any failure the adapter is
    taken out again. On a meta ``model`` (a planned build of a stack or fusion) only the shapes are made.
    """
    import torch

    from fedadapt.adapter_limits import DEFAULT_LIMITS, BackboneDims, check_fits_backbone
    from fedadapt.adapter_plan import check_planned_build
    from fedadapt.adapter_weights import read_weight_file
    from fedadapt.adapters.bottleneck import DEFAULT_ADAPTER, add_bottleneck
    from fedadapt.folder import MANIFEST, OWN_WEIGHTS
    from fedadapt.methods import method_config_from_dict
    from fedadapt.state import TensorSpec, dtype_name

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
    planned = _planned(model)
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


def _planned(model: SequenceClassifier) -> bool:
    """Whether ``model`` is a meta-device plan (``fedadapt.adapter_plan``): shapes only, no weights to read or hash."""
    return model.classifier.weight.is_meta


def _remove_adapter(model: SequenceClassifier, name: str) -> None:
    from fedadapt.adapters.slots import find_slots

    for slot in find_slots(model.backbone):
        if name in slot.adapters:
            del slot.adapters[name]
            slot.parallel.pop(name, None)


@dataclass(frozen=True)
class StackConfig:
    """Frozen adapters from ``below`` (applied first, in order), then a new trainable ``top`` adapter."""

    name: ClassVar[str] = "stack"
    size_field: ClassVar[str | None] = "r"
    saves_peft_format: ClassVar[bool] = False
    location_fields: ClassVar[tuple[str, ...]] = ("below",)
    below: tuple[str, ...] = ()
    top: str = "pfeiffer"
    r: int | None = None

    def __post_init__(self) -> None:
        if not self.below:
            raise ConfigError("stack needs at least one trained adapter folder in 'below'")
        if self.top not in BOTTLENECK_METHODS:
            raise ConfigError(f"the top of a stack must be one of {BOTTLENECK_METHODS}, got {self.top!r}")

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        from fedadapt.adapters.bottleneck import DEFAULT_ADAPTER, add_bottleneck
        from fedadapt.adapters.slots import Stack, set_setup
        from fedadapt.methods import make_method_config
        from fedadapt.methods.base import AppliedMethod

        names, schema_ids, hashes = _load_all(model, self.below, "stacked")
        add_bottleneck(model.backbone, DEFAULT_ADAPTER, make_method_config(self.top, size=self.r))  # type: ignore[arg-type]
        set_setup(model.backbone, Stack((*names, DEFAULT_ADAPTER)))
        return AppliedMethod(module=model, extras={"below_schema_ids": schema_ids, "below_weight_hashes": hashes})


@dataclass(frozen=True)
class FusionConfig:
    """AdapterFusion stage 2: ``adapters`` frozen, one trainable fusion attention per position."""

    name: ClassVar[str] = "fusion"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = False
    location_fields: ClassVar[tuple[str, ...]] = ("adapters",)
    adapters: tuple[str, ...] = ()
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if len(self.adapters) < 2:
            raise ConfigError(f"fusion needs at least two trained adapter folders, got {len(self.adapters)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature!r}")

    def apply(self, model: SequenceClassifier) -> AppliedMethod:
        from fedadapt.adapters.modules import FusionLayer
        from fedadapt.adapters.slots import Fuse, find_slots, set_setup
        from fedadapt.methods.base import AppliedMethod

        names, schema_ids, hashes = _load_all(model, self.adapters, "fused")
        for slot in find_slots(model.backbone):
            if any(n in slot.adapters for n in names):
                slot.add_fusion(FUSION, FusionLayer(slot.hidden_size, self.temperature))
        set_setup(model.backbone, Fuse(tuple(names), FUSION))
        return AppliedMethod(module=model, extras={"fused_schema_ids": schema_ids, "fused_weight_hashes": hashes})


def _load_all(
    model: SequenceClassifier, folders: tuple[str, ...], prefix: str
) -> tuple[list[str], list[str], list[str]]:
    """Load ``folders`` frozen as ``prefix0``, ``prefix1``…; return names, schema ids and weight hashes.

    Schema ids alone do not tell two adapters of the same config apart; the hashes bind the
    schema to the frozen weights, as FFA-LoRA's ``lora_a_hash`` does for its frozen A.
    """
    from fedadapt.freeze import fingerprint_tensors

    names = [f"{prefix}{index}" for index in range(len(folders))]
    schema_ids = [load_frozen_adapter(model, name, folder) for name, folder in zip(names, folders, strict=True)]
    hashes = [
        ""
        if _planned(model)
        else fingerprint_tensors((n, p) for n, p in model.named_parameters() if f".adapters.{name}." in n)
        for name in names
    ]
    return names, schema_ids, hashes
