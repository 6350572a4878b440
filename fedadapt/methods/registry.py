"""The method registry: a method is a typed config selected by name.

It imports none of the methods: each method module registers its configs with ``@register_method``
when it is imported (as PEFT's tuners register themselves), and ``fedadapt.methods`` imports the
built-in ones. A method of your own registers the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from fedadapt.errors import ConfigError
from fedadapt.methods.base import MethodConfig

METHODS: dict[str, type[MethodConfig]] = {}

ConfigClass = TypeVar("ConfigClass", bound=type)


def register_method(config_class: ConfigClass) -> ConfigClass:
    """Add a method (a frozen dataclass following ``MethodConfig``) to the registry; usable as a decorator.

    A second class under a name already taken is refused (ConfigError) rather than silently replacing
    a built-in; the same class again, or from a reloaded module, replaces itself.
    """
    name = config_class.name  # type: ignore[attr-defined]
    taken = METHODS.get(name)
    reloaded = taken is not None and (taken.__module__, taken.__qualname__) == (
        config_class.__module__,
        config_class.__qualname__,
    )  # the same class from a reloaded module
    if taken is not None and taken is not config_class and not reloaded:
        raise ConfigError(f"a method named {name!r} is already registered ({METHODS[name].__qualname__})")
    METHODS[name] = config_class
    return config_class


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
