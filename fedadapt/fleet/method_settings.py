"""A scenario's ``[method-settings]`` table: the adapter method's own settings, e.g. ``drop-layers = 3``.

Keys are the method config's fields in kebab-case (``drop-layers`` is ``drop_layers``; the snake-case
spelling is read too) and go to ``make_method_config`` as they are, so an unknown key is the registry's
ConfigError naming it and each value is checked by the config itself. Before that, every value is bounded
as the other scenario keys are: each numeric setting has a range here (``METHOD_SETTING_BOUNDS``, in
simulations/README.md), strings and lists have caps, and nothing nests. A method of one's own whose
numeric settings a scenario should set adds their ranges to ``METHOD_SETTING_BOUNDS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedadapt.config_values import Bound
from fedadapt.errors import ConfigError
from fedadapt.methods import METHODS

TABLE = "method-settings"
# The range of each numeric setting of the built-in methods (kebab-case, as written in the table).
METHOD_SETTING_BOUNDS: dict[str, Bound] = {
    "r": Bound("int", 1, 4096),  # LoRA rank, bottleneck size: as the scenario's `rank`
    "alpha": Bound("int", 1, 65536),
    "dropout": Bound("float", 0, 1, high_open=True),
    "a-seed": Bound("int", 0, 2**32 - 1),
    "drop-layers": Bound("int", 0, 1024),  # each method also refuses a value that leaves its backbone no layer
    "num-virtual-tokens": Bound("int", 1, 4096),
    "reduction-factor": Bound("int", 1, 65536),
    "scaling": Bound("float", 0, 1000, low_open=True),
    "temperature": Bound("float", 0, 1000, low_open=True),
    "layers": Bound("int", 0, 1023),  # each entry
}
MAX_SETTINGS = 64  # entries of the table
MAX_SETTING_ITEMS = 256  # entries of a list setting (target_modules, layers, a stack's folders)
MAX_SETTING_CHARS = 4096  # characters of a string setting or list entry (module names, folder paths)

Settings = tuple[tuple[str, Any], ...]
"""The table as a scenario holds it: (field name, value) pairs in name order, lists as tuples (hashable)."""


def read_method_settings(table: Any, method: str, where: str) -> Settings:
    """The ``[method-settings]`` table of a scenario whose method is ``method``: field names, typed values.

    A TOML integer given for a float setting becomes a float, as for the other scenario keys, so the
    method's config (and the schema id) is the same whichever way the number was written.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: {TABLE!r} must be a table, e.g. [{TABLE}] drop-layers = 3, got {table!r}")
    floats = {name for name, kind in (_fields(method) or {}).items() if "float" in kind}
    settings: dict[str, Any] = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        if name in settings:
            raise ConfigError(f"{where}: [{TABLE}] sets {name!r} twice ({key!r} and its other spelling)")
        if isinstance(value, list):
            value = tuple(value)
        elif name in floats and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        settings[name] = value
    return tuple(sorted(settings.items()))


def check_method_settings(settings: Settings, method: str) -> None:
    """Every value of the table within its bounds (ConfigError naming ``method-settings.<key>``).

    A name that is no setting of ``method`` is left to ``make_method_config``, whose error names it.
    """
    if not isinstance(settings, tuple) or not all(isinstance(pair, tuple) and len(pair) == 2 for pair in settings):
        raise ConfigError(f"method_settings must be (name, value) pairs, got {settings!r}")
    if len(settings) > MAX_SETTINGS:
        raise ConfigError(f"scenario key {TABLE!r} may hold at most {MAX_SETTINGS} settings, got {len(settings)}")
    known = _fields(method)
    for name, value in settings:
        if known is not None and name not in known:
            continue
        key = f"{TABLE}.{str(name).replace('_', '-')}"
        if isinstance(value, tuple):
            if len(value) > MAX_SETTING_ITEMS:
                raise ConfigError(
                    f"scenario key {key!r} may hold at most {MAX_SETTING_ITEMS} entries, got {len(value)}"
                )
            for index, item in enumerate(value):
                _check_scalar(f"{key}[{index}]", key, item)
        else:
            _check_scalar(key, key, value)


def _check_scalar(shown: str, key: str, value: Any) -> None:
    if isinstance(value, str):
        if len(value) > MAX_SETTING_CHARS:
            raise ConfigError(f"scenario key {shown!r} may have at most {MAX_SETTING_CHARS} characters")
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        bound = METHOD_SETTING_BOUNDS.get(key.removeprefix(f"{TABLE}."))
        if bound is None:
            raise ConfigError(
                f"scenario key {key!r} has no range in fedadapt.fleet.method_settings.METHOD_SETTING_BOUNDS; "
                "add one there to set this number from a scenario"
            )
        bound.check(shown, value)
    else:
        raise ConfigError(
            f"scenario key {shown!r} must be a string, a number, a boolean or a list of those, got {value!r}"
        )


def _fields(method: str) -> dict[str, str] | None:
    """The settings of ``method`` and their types; None for an unknown method (make_method_config names it)."""
    config_class = METHODS.get(method)
    if config_class is None:
        return None
    return {f.name: str(f.type) for f in dataclasses.fields(config_class)}  # type: ignore[arg-type]
