"""Reading a scenario TOML file: bounded in bytes and depth, relative paths resolved against the file's folder."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedadapt.config_values import expand_user
from fedadapt.data.synthetic import SYNTHETIC
from fedadapt.errors import ConfigError
from fedadapt.fleet.scenario import ScenarioConfig, scenario_from_dict
from fedadapt.methods import METHODS

MAX_SCENARIO_BYTES = 1024 * 1024  # a scenario file; shipped ones are under 3 KB


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Read a scenario TOML file (flat kebab-case keys)."""
    file = expand_user(path, "the scenario file")
    if not file.is_file():
        raise ConfigError(f"scenario file {file} does not exist")
    where = f"scenario file {file}"
    return scenario_from_dict(_relative_to(_read_toml(file), file.resolve().parent, where), where=where)


def _read_toml(file: Path) -> dict[str, Any]:
    """The TOML file's table: at most MAX_SCENARIO_BYTES read, every failure a ConfigError naming the file.

    tomllib recurses once per nested array or inline table, so ``x = [[[[...]]]]`` a thousand deep raises
    RecursionError. A bracket count before parsing cannot be trusted here (TOML has four string quotings,
    and comments, that may hold brackets), but tomllib is pure Python: its RecursionError unwinds cleanly
    after at most the interpreter's recursion limit of frames, on at most MAX_SCENARIO_BYTES of input.
    """
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_SCENARIO_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"scenario file {file} cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_SCENARIO_BYTES:
        raise ConfigError(f"scenario file {file} is larger than the {MAX_SCENARIO_BYTES} bytes a scenario may have")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except ValueError as err:  # TOMLDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise ConfigError(f"scenario file {file} is not valid TOML: {str(err)[:200]}") from None
    except RecursionError:
        raise ConfigError(f"scenario file {file} nests arrays or tables too deeply to be a scenario") from None


def _relative_to(data: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """Relative ``data`` and ``backbone`` paths are the scenario file's; the apps run in other folders.

    So are the adapter folders a composed method names in ``[method-settings]`` (a stack's ``below``).
    """
    resolved = dict(data)
    for key in ("data", "backbone", "labels", "server-proxy-data", "initial-head"):
        if key in resolved:
            resolved[key] = _path_from(resolved[key], folder, f"{where}: {key}")
    table = resolved.get("method-settings")
    located = getattr(METHODS.get(str(resolved.get("method", ScenarioConfig.method))), "location_fields", ())
    if isinstance(table, Mapping) and located:
        resolved["method-settings"] = {
            key: [_path_from(v, folder, f"{where}: {key}") for v in value]
            if key.replace("-", "_") in located and isinstance(value, list)
            else value
            for key, value in table.items()
        }
    return resolved


def _path_from(value: Any, folder: Path, what: str) -> Any:
    """``value`` resolved against ``folder`` when it is a relative path that exists there, else as it was."""
    if isinstance(value, str) and value != SYNTHETIC and not expand_user(value, what).is_absolute():
        candidate = folder / value
        if candidate.exists():
            return str(candidate.resolve())
    return value
