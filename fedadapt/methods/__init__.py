"""The method registry: a method is a typed config selected by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedadapt.adapters.bottleneck import HoulsbyConfig, ParallelConfig, PfeifferConfig
from fedadapt.adapters.compose import FusionConfig, StackConfig
from fedadapt.errors import ConfigError
from fedadapt.methods.base import AppliedMethod, MethodConfig, config_to_dict, schema_method_dict
from fedadapt.methods.bitfit import BitFitConfig
from fedadapt.methods.full import FullFineTuneConfig
from fedadapt.methods.peft_methods import FfaLoraConfig, IA3Config, LoraConfig, PrefixConfig, PromptConfig

METHODS: dict[str, type[MethodConfig]] = {
    cls.name: cls
    for cls in (
        LoraConfig,
        FfaLoraConfig,
        IA3Config,
        PromptConfig,
        PrefixConfig,
        BitFitConfig,
        HoulsbyConfig,
        PfeifferConfig,
        ParallelConfig,
        StackConfig,
        FusionConfig,
        FullFineTuneConfig,
    )
}


def register_method(config_class: type[MethodConfig]) -> None:
    """Add a method (a frozen dataclass following ``MethodConfig``) to the registry."""
    METHODS[config_class.name] = config_class


def make_method_config(name: str, size: int | None = None, **fields: Any) -> MethodConfig:
    """Build the config of method ``name``; ``size`` sets its size field (rank, bottleneck, tokens)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    config_class = METHODS[name]
    if size is not None:
        if config_class.size_field is None:
            raise ConfigError(f"method {name!r} has no rank or size to set; drop --rank")
        fields[config_class.size_field] = size
    known = {f.name for f in dataclasses.fields(config_class)}  # type: ignore[arg-type]
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no settings {unknown}; it has {sorted(known)}")
    typed = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    config: MethodConfig = config_class(**typed)
    return config


def method_config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Inverse of ``config_to_dict``."""
    fields = dict(data)
    name = fields.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"a method config needs a 'name', got {data!r}")
    return make_method_config(name, **fields)


__all__ = [
    "METHODS",
    "AppliedMethod",
    "MethodConfig",
    "config_to_dict",
    "make_method_config",
    "method_config_from_dict",
    "register_method",
    "schema_method_dict",
]
