"""The adapter folder's manifest (fedadapt_adapter.json), checked field by field before anything is built from it.

Every field ``load_adapter``, stacking, fusion, hot-swapping and the exporter read is checked for its
type and range here, and the numbers that size allocations against ``AdapterLimits``: a hostile
manifest fails with one AdapterFolderError (ConfigError for a method setting out of range) that names
the file and the field, never with a KeyError, a TypeError or a 15 GB head.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from fedadapt.adapters.modules import Nonlinearity
from fedadapt.adapters.slots import Position
from fedadapt.checkpoint.limits import AdapterLimits
from fedadapt.delta.state import PARTS, AdapterSchema, Role
from fedadapt.errors import AdapterFolderError, ConfigError, SchemaMismatch
from fedadapt.methods import METHODS, MethodConfig, method_config_from_dict, schema_method_dict
from fedadapt.model.pooling import POOLING_MODES

MANIFEST = "fedadapt_adapter.json"
OWN_WEIGHTS = "adapter.safetensors"
PEFT_WEIGHTS = ("adapter_config.json", "adapter_model.safetensors")
FOLDER_FORMAT = "fedadapt.adapter.v1"

_FIELDS = ("format", "method", "backbone", "labels", "split", "schema_id", "schema", "weights")
_BACKBONE_FIELDS = ("name_or_path", "fingerprint", "num_labels", "pooling", "head_dropout", "seed")
_SCHEMA_FIELDS = ("method", "backbone_fingerprint", "tensors", "extras")
_TENSOR_FIELDS = ("name", "shape", "dtype", "part", "role")
_ROLES: tuple[str, ...] = typing.get_args(Role)
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # trainable tensors are floating point
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
# Integers a seed (torch.manual_seed) or any other setting can take: one 64-bit word, signed or not.
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)
_MAX_NAME_CHARS = 4096


def check_manifest(data: Any, path: Path, limits: AdapterLimits) -> dict[str, Any]:
    """``data`` (the parsed manifest at ``path``) after checking every field; raises on the first bad one."""
    if not isinstance(data, dict):
        raise AdapterFolderError(f"{path}: the manifest must be a JSON object, got {_show(data)}")
    if data.get("format") != FOLDER_FORMAT:
        raise AdapterFolderError(
            f"{path} has format {_show(data.get('format'))}; this fedadapt reads {FOLDER_FORMAT!r}"
        )
    _require_fields(data, _FIELDS, path, "the manifest")
    num_labels = _check_backbone(data["backbone"], path, limits)
    _check_labels(data["labels"], num_labels, path)
    _check_split(data["split"], path)
    config = check_method(data["method"], path, limits)
    _check_schema(data, config, num_labels, path, limits)
    weights = list(PEFT_WEIGHTS if config.saves_peft_format else (OWN_WEIGHTS,))
    if data["weights"] != weights:
        raise AdapterFolderError(f"{path}: weights is {_show(data['weights'])}; a {config.name} adapter has {weights}")
    return data


def check_method(data: Any, path: Path, limits: AdapterLimits) -> MethodConfig:
    """The method config the manifest's ``method`` object describes, after typed and size checks."""
    if not isinstance(data, dict):
        raise AdapterFolderError(f"{path}: method must be an object, got {_show(data)}")
    name = data.get("name")
    if not isinstance(name, str) or name not in METHODS:
        raise AdapterFolderError(f"{path}: method.name is {_show(name)}; this fedadapt knows {sorted(METHODS)}")
    config_class = METHODS[name]
    settings = _setting_types(config_class)
    for key, value in data.items():
        if key == "name":
            continue
        if key not in settings:
            raise AdapterFolderError(f"{path}: method.{key} is not a setting of {name}; it has {sorted(settings)}")
        if not _json_matches(value, settings[key]):
            raise AdapterFolderError(f"{path}: method.{key} is {_show(value)}, not a valid {_type_text(settings[key])}")
        _check_setting_length(value, key, key in getattr(config_class, "location_fields", ()), path, limits)
    size_field = config_class.size_field
    size, cap = data.get(size_field or ""), limits.size_cap(size_field)
    if isinstance(size, int) and cap is not None and size > cap:
        raise AdapterFolderError(f"{path}: method.{size_field} is {size}, more than the {cap} allowed")
    for field in getattr(config_class, "location_fields", ()):
        folders = data.get(field)
        if isinstance(folders, list) and len(folders) > limits.max_composed:
            raise AdapterFolderError(
                f"{path}: method.{field} names {len(folders)} adapter folders, "
                f"more than the {limits.max_composed} allowed"
            )
    try:
        return method_config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: method: {err}") from err


def _check_setting_length(value: Any, key: str, is_location: bool, path: Path, limits: AdapterLimits) -> None:
    """A type-checked method setting ``key`` is no longer than ``limits`` allow (folder paths: ``_MAX_NAME_CHARS``).

    What PEFT and the methods do with a list setting grows with its length, and faster (PEFT's target-module
    condensing is quadratic), so a 0.6 MB list of 30,000 names must stop here, before the meta plan.
    """
    items = value if isinstance(value, list) else [value]
    if not is_location and len(items) > limits.max_setting_items:  # folder lists: max_composed, checked below
        raise AdapterFolderError(
            f"{path}: method.{key} lists {len(items)} entries, more than the {limits.max_setting_items} allowed "
            "(max_setting_items)"
        )
    chars = _MAX_NAME_CHARS if is_location else limits.max_setting_chars
    for index, item in enumerate(items):
        if isinstance(item, str) and len(item) > chars:
            where = f"method.{key}[{index}]" if isinstance(value, list) else f"method.{key}"
            raise AdapterFolderError(
                f"{path}: {where} is {_show(item)}, {len(item)} characters, more than the {chars} allowed"
                + ("" if is_location else " (max_setting_chars)")
            )


def _check_backbone(data: Any, path: Path, limits: AdapterLimits) -> int:
    _require_fields(data, _BACKBONE_FIELDS, path, "backbone")
    name = data["name_or_path"]
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_CHARS:
        raise AdapterFolderError(f"{path}: backbone.name_or_path is {_show(name)}, not a backbone name or folder")
    if not isinstance(data["fingerprint"], str) or not _HEX64.match(data["fingerprint"]):
        raise AdapterFolderError(
            f"{path}: backbone.fingerprint is {_show(data['fingerprint'])}, not a SHA-256 hex digest"
        )
    num_labels = _integer(data["num_labels"], path, "backbone.num_labels", 1, limits.max_labels)
    pooling = data["pooling"]
    _require_fields(pooling, ("mode", "normalize"), path, "backbone.pooling")
    if pooling["mode"] not in POOLING_MODES:
        raise AdapterFolderError(f"{path}: backbone.pooling.mode is {_show(pooling['mode'])}; one of {POOLING_MODES}")
    if not isinstance(pooling["normalize"], bool):
        raise AdapterFolderError(
            f"{path}: backbone.pooling.normalize is {_show(pooling['normalize'])}, not true or false"
        )
    dropout = data["head_dropout"]
    if not _json_matches(dropout, float) or not 0.0 <= dropout < 1.0:
        raise AdapterFolderError(f"{path}: backbone.head_dropout is {_show(dropout)}, not a number in [0, 1)")
    _integer(data["seed"], path, "backbone.seed", *_INT_RANGE)
    return num_labels


def _check_labels(labels: Any, num_labels: int, path: Path) -> None:
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise AdapterFolderError(f"{path}: labels must be a list of names, got {_show(labels)}")
    if len(labels) != num_labels:
        raise AdapterFolderError(f"{path}: labels lists {len(labels)} names, but backbone.num_labels is {num_labels}")


def _check_split(data: Any, path: Path) -> None:
    _require_fields(data, ("personal",), path, "split")
    personal = data["personal"]
    if (
        not isinstance(personal, list)
        or any(role not in _ROLES for role in personal)
        or len(set(personal)) < len(personal)
    ):
        raise AdapterFolderError(f"{path}: split.personal is {_show(personal)}, not a list of distinct roles {_ROLES}")


def _check_schema(
    data: dict[str, Any], config: MethodConfig, num_labels: int, path: Path, limits: AdapterLimits
) -> None:
    """The recorded schema is well formed, small enough, agrees with the manifest and hashes to its schema_id."""
    schema = data["schema"]
    _require_fields(schema, _SCHEMA_FIELDS, path, "schema")
    if schema["method"] != schema_method_dict(config):
        raise AdapterFolderError(f"{path}: schema.method {_show(schema['method'])} is not the manifest's method config")
    if schema["backbone_fingerprint"] != data["backbone"]["fingerprint"]:
        raise AdapterFolderError(f"{path}: schema.backbone_fingerprint is not backbone.fingerprint")
    if not isinstance(schema["extras"], dict):
        raise AdapterFolderError(f"{path}: schema.extras must be an object, got {_show(schema['extras'])}")
    tensors = schema["tensors"]
    if not isinstance(tensors, list):
        raise AdapterFolderError(f"{path}: schema.tensors must be a list, got {_show(tensors)}")
    names: set[str] = set()
    values = 0
    for index, tensor in enumerate(tensors):
        where = f"schema.tensors[{index}]"
        values += _check_tensor(tensor, path, where, limits)
        if values > limits.max_params:
            raise AdapterFolderError(
                f"{path}: {where} brings the schema to {values} values, more than the {limits.max_params} allowed"
            )
        if tensor["name"] in names:
            raise AdapterFolderError(f"{path}: {where}.name {tensor['name']!r} appears twice")
        names.add(tensor["name"])
        if tensor["role"] == "head" and tensor["shape"][:1] != [num_labels]:
            raise AdapterFolderError(
                f"{path}: {where} is a head of shape {tensor['shape']}, not of {num_labels} labels"
            )
    schema_id = data["schema_id"]
    if not isinstance(schema_id, str) or not _HEX32.match(schema_id):
        raise AdapterFolderError(f"{path}: schema_id is {_show(schema_id)}, not a 32-digit hex schema id")
    recorded = AdapterSchema.from_dict(schema).schema_id
    if recorded != schema_id:
        raise SchemaMismatch(f"{path}: schema_id is {schema_id}, but the recorded schema hashes to {recorded}")


def _check_tensor(tensor: Any, path: Path, where: str, limits: AdapterLimits) -> int:
    """Values of one schema tensor entry, after checking its fields."""
    _require_fields(tensor, _TENSOR_FIELDS, path, where)
    if not isinstance(tensor["name"], str) or not 0 < len(tensor["name"]) <= _MAX_NAME_CHARS:
        raise AdapterFolderError(f"{path}: {where}.name is {_show(tensor['name'])}, not a tensor name")
    shape = tensor["shape"]
    if not isinstance(shape, list) or len(shape) > 8:
        raise AdapterFolderError(f"{path}: {where}.shape is {_show(shape)}, not a list of at most 8 sizes")
    count = 1
    for dim in shape:
        count *= _integer(dim, path, f"{where}.shape", 0, limits.max_params)
    if tensor["dtype"] not in _FLOAT_DTYPES:
        raise AdapterFolderError(f"{path}: {where}.dtype is {_show(tensor['dtype'])}; one of {_FLOAT_DTYPES}")
    if tensor["part"] not in PARTS or tensor["role"] not in _ROLES:
        raise AdapterFolderError(
            f"{path}: {where} has part {_show(tensor['part'])} and role {_show(tensor['role'])}; "
            f"parts are {PARTS}, roles {_ROLES}"
        )
    return count


def _require_fields(data: Any, fields: tuple[str, ...], path: Path, where: str) -> None:
    if not isinstance(data, dict):
        raise AdapterFolderError(f"{path}: {where} must be an object, got {_show(data)}")
    missing = [f for f in fields if f not in data]
    if missing:
        raise AdapterFolderError(f"{path}: {where} lacks {missing}; save the adapter again")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise AdapterFolderError(f"{path}: {where} has fields this fedadapt does not know: {_show(unknown)}")


def _integer(value: Any, path: Path, field: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise AdapterFolderError(f"{path}: {field} is {_show(value)}, not an integer")
    if value > high:
        raise AdapterFolderError(f"{path}: {field} is {_show(value)}, more than the {high} allowed")
    if value < low:
        raise AdapterFolderError(f"{path}: {field} is {_show(value)}, less than {low}")
    return value


@functools.cache
def _setting_types(config_class: type[MethodConfig]) -> dict[str, Any]:
    """Each setting of a method config and its type, from the dataclass annotations."""
    # The bottleneck configs name these types only under TYPE_CHECKING (they live beside torch code).
    names = {"Nonlinearity": Nonlinearity, "Position": Position}
    try:
        hints = typing.get_type_hints(config_class, localns=names)
    except NameError:
        hints = {}  # a registered method annotated with names not importable here: plain JSON values only
    fields = dataclasses.fields(config_class)  # type: ignore[arg-type]
    return {f.name: hints.get(f.name, _PLAIN) for f in fields}


_SCALAR = str | int | float | bool | None
_PLAIN = _SCALAR | tuple[_SCALAR, ...]


def _json_matches(value: Any, annotation: Any) -> bool:
    """Whether the JSON value fits ``annotation`` (JSON lists stand for tuples; floats must be finite)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool) and _INT_RANGE[0] <= value <= _INT_RANGE[1]
    if annotation is float:
        return _is_finite_number(value)
    if annotation is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if origin in (typing.Union, types.UnionType):
        return any(_json_matches(value, arg) for arg in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return isinstance(value, list) and all(_json_matches(item, args[0]) for item in value)
    if origin is tuple:
        return isinstance(value, list) and len(value) == len(args) and all(map(_json_matches, value, args))
    return False  # a type this reader does not know: refuse rather than guess


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _type_text(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _show(value: Any) -> str:
    """A short repr for messages (a hostile value may be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
