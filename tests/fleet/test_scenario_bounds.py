"""Every number a scenario holds has a finite range (issue 17): too large, too small, NaN and infinity are refused
with the key, the value and the range named, and simulations/README.md documents the same ranges."""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fedadapt.config_values import Bound
from fedadapt.errors import ConfigError
from fedadapt.fleet.faults import stall_seconds
from fedadapt.fleet.scenario import (
    MAX_SCRIPTED_FAULTS,
    MAX_SYNTHETIC_MESSAGES,
    MAX_TIERS,
    SCENARIO_BOUNDS,
    ScenarioConfig,
    ScriptedFault,
    scenario_from_dict,
)
from fedadapt.fleet.scenario_file import MAX_SCENARIO_BYTES, load_scenario
from fedadapt.methods import METHODS
from fedadapt.privacy.config import PRIVACY_BOUNDS, PrivacyConfig
from fedadapt.privacy.dp.config import ADAPTIVE_KEYS, DP_BOUNDS, DpConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
README = PROJECT_ROOT / "simulations" / "README.md"
ALL_BOUNDS = (
    SCENARIO_BOUNDS
    | {f"privacy.{key}": bound for key, bound in PRIVACY_BOUNDS.items()}
    | {f"privacy.dp.{key}": bound for key, bound in DP_BOUNDS.items()}
)
# Files are not opened by scenario_from_dict: naming one lifts the synthetic task's messages cap, so each key's
# own range is what is tested.
FILE_DATA = "train.csv"
# A method with each [method-settings] number, and the server optimizer with each server-* setting.
SETTING_METHODS = {
    **dict.fromkeys(("r", "alpha", "dropout", "drop-layers"), "lora"),
    "a-seed": "ffa-lora",
    "num-virtual-tokens": "prompt",
    **dict.fromkeys(("reduction-factor", "scaling", "layers"), "pfeiffer"),
    "temperature": "fusion",
}
SERVER_OPTIMIZER_OF = {
    "server-momentum": "fedavgm",
    **dict.fromkeys(("server-beta1", "server-beta2", "server-tau"), "fedyogi"),
}
LIST_KEYS = ("tier-steps", "method-settings.layers")  # ranges of each entry


def _toml(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "s.toml"
    file.write_text(f'name = "s"\n{text}\n')
    return file


# --- the findings -----------------------------------------------------------------------------------------------


def test_a_billion_clients_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"scenario key 'num-clients' must be an integer in \[1, 100000\], got 1000000000"
    ):
        load_scenario(_toml(tmp_path, "num-clients = 1000000000"))


def test_a_nan_gpu_share_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scenario key 'client-gpus' must be a finite number in \[0, 64\], got nan"):
        load_scenario(_toml(tmp_path, "client-gpus = nan"))


def test_a_round_timeout_of_1e300_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"scenario key 'round-timeout' must be a finite number in \(0, 86400\], got 1e\+300"
    ):
        load_scenario(_toml(tmp_path, "round-timeout = 1e300"))


def test_the_longest_round_timeout_is_a_valid_sleep_and_deadline() -> None:
    """A straggler sleeps round-timeout + a margin: at the top of the range that is still a valid wait."""
    longest = scenario_from_dict({"round-timeout": SCENARIO_BOUNDS["round-timeout"].high})
    assert stall_seconds(longest) < threading.TIMEOUT_MAX  # time.sleep and lock waits overflow beyond it
    assert math.isfinite(time.monotonic() + longest.round_timeout)  # the server's reply deadline


def test_synthetic_messages_are_capped_by_the_product_of_clients_and_examples() -> None:
    with pytest.raises(ConfigError, match=r"100000 x 80 = 8000000 messages, more than the 1000000 allowed"):
        scenario_from_dict({"num-clients": 100_000})
    assert scenario_from_dict({"num-clients": 100_000, "examples-per-user": 10}).num_clients == 100_000
    assert scenario_from_dict({"num-clients": 100_000, "data": FILE_DATA}).examples_per_user == 80
    assert MAX_SYNTHETIC_MESSAGES == 1_000_000


def test_a_deeply_nested_scenario_is_a_config_error(tmp_path: Path) -> None:
    """tomllib recurses per nested array: without the wrapper this raised RecursionError."""
    with pytest.raises(ConfigError, match="nests arrays or tables too deeply"):
        load_scenario(_toml(tmp_path, "tier-steps = " + "[" * 5000 + "]" * 5000))
    with pytest.raises(ConfigError, match="nests arrays or tables too deeply"):
        load_scenario(_toml(tmp_path, "x = " + "{a = " * 5000 + "1" + "}" * 5000))


def test_an_oversized_scenario_file_is_refused_before_parsing(tmp_path: Path) -> None:
    file = tmp_path / "big.toml"
    with file.open("wb") as handle:
        handle.truncate(64 * MAX_SCENARIO_BYTES)  # sparse: a read of it all would take 64 MiB
    with pytest.raises(ConfigError, match=f"larger than the {MAX_SCENARIO_BYTES} bytes"):
        load_scenario(file)


def test_long_lists_are_refused() -> None:
    with pytest.raises(ConfigError, match=f"'tier-steps' may hold at most {MAX_TIERS} entries"):
        scenario_from_dict({"tier-steps": [1] * (MAX_TIERS + 1)})
    faults = [{"round": 1, "client": 0, "fault": "crash"}] * (MAX_SCRIPTED_FAULTS + 1)
    with pytest.raises(ConfigError, match=f"'scripted-faults' may hold at most {MAX_SCRIPTED_FAULTS} entries"):
        scenario_from_dict({"scripted-faults": faults})


# --- every key, at and beyond its ends ----------------------------------------------------------------------------


def _scenario(key: str, value: Any) -> ScenarioConfig:
    """A scenario whose only unusual value is ``key = value``, with what that key needs around it."""
    data: dict[str, Any] = {"data": FILE_DATA, "num-clients": SCENARIO_BOUNDS["num-clients"].high}
    if key.startswith("privacy.dp."):
        name = key.removeprefix("privacy.dp.")
        noise = {} if name in ("noise-multiplier", "target-epsilon") else {"noise-multiplier": 1.0}
        clip = {"clip": "adaptive", "initial-clip": 0.1} if name in ADAPTIVE_KEYS else {}
        return scenario_from_dict({**data, "privacy": {"dp": {**noise, **clip, name: value}}})
    if key.startswith("privacy."):
        name = key.removeprefix("privacy.")
        privacy: dict[str, Any] = {"num-shares": 1000, "reconstruction-threshold": 1000, name: value}
        if name == "reconstruction-threshold" and value == 2:
            privacy["num-shares"] = 2
        if name == "num-shares" and value == 2:
            privacy["reconstruction-threshold"] = 2
        return scenario_from_dict({**data, "privacy": privacy})
    if key.startswith("scripted-faults."):
        fault = {"round": 1, "client": 0, "fault": "crash", key.removeprefix("scripted-faults."): value}
        return scenario_from_dict({**data, "scripted-faults": [fault]})
    if key.startswith("method-settings."):
        setting = key.removeprefix("method-settings.")
        settings: dict[str, Any] = {setting: [value] if key in LIST_KEYS else value}
        if SETTING_METHODS[setting] == "fusion":
            settings["adapters"] = ["a", "b"]  # fusion needs two folders named; nothing opens them here
        return scenario_from_dict({**data, "method": SETTING_METHODS[setting], "method-settings": settings})
    if key == "tier-steps":
        return scenario_from_dict({**data, key: [value]})
    if key in SERVER_OPTIMIZER_OF:
        data["server-optimizer"] = SERVER_OPTIMIZER_OF[key]
    if key in ("server-warmup-epochs", "server-finetune-epochs"):
        data["server-proxy-data"] = FILE_DATA
    if key == "head-warmup-rounds":
        data["rounds"] = SCENARIO_BOUNDS["rounds"].high  # the warm-up is a share of them
    return scenario_from_dict({**data, key: value})


def _outside(bound: Bound) -> list[float]:
    """The nearest values just beyond each end."""
    if bound.kind == "int":
        return [bound.low - 1, bound.high + 1]
    below = bound.low if bound.low_open else math.nextafter(bound.low, -math.inf)
    above = bound.high if bound.high_open else math.nextafter(bound.high, math.inf)
    return [below, above]


def _inside_ends(bound: Bound) -> list[float]:
    """The ends themselves, or the nearest values inside an open end."""
    low = math.nextafter(bound.low, math.inf) if bound.low_open else bound.low
    high = math.nextafter(bound.high, -math.inf) if bound.high_open else bound.high
    return [low, high] if bound.kind == "float" else [int(low), int(high)]


def _value_of(scenario: ScenarioConfig, key: str) -> Any:
    if key.startswith("privacy.dp."):
        return getattr(scenario.privacy.dp, key.removeprefix("privacy.dp.").replace("-", "_"))
    if key.startswith("privacy."):
        return getattr(scenario.privacy, key.removeprefix("privacy.").replace("-", "_"))
    if key.startswith("scripted-faults."):
        return getattr(scenario.scripted_faults[0], key.removeprefix("scripted-faults."))
    if key == "tier-steps":
        return scenario.tier_steps[0]
    if key.startswith("method-settings."):
        value = dict(scenario.method_settings)[key.removeprefix("method-settings.").replace("-", "_")]
        return value[0] if key in LIST_KEYS else value
    return getattr(scenario, key.replace("-", "_"))


@pytest.mark.parametrize("key", sorted(ALL_BOUNDS))
def test_each_end_of_each_range_is_accepted(key: str) -> None:
    for value in _inside_ends(ALL_BOUNDS[key]):
        assert _value_of(_scenario(key, value), key) == value


@pytest.mark.parametrize("key", sorted(ALL_BOUNDS))
def test_just_beyond_each_end_is_refused_naming_key_value_and_range(key: str) -> None:
    bound = ALL_BOUNDS[key]
    for value in _outside(bound):
        with pytest.raises(ConfigError) as caught:
            _scenario(key, value)
        message = str(caught.value)
        shown = f"{key}[0]" if key in LIST_KEYS else key
        assert f"scenario key '{shown}' must be" in message and f"in {bound}, got {value!r}" in message, message


@pytest.mark.parametrize("key", sorted(k for k, b in ALL_BOUNDS.items() if b.kind == "float"))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_for_every_float(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' must be a finite number in .*, got -?(nan|inf)"):
        _scenario(key, value)


@pytest.mark.parametrize("key", sorted(k for k, b in ALL_BOUNDS.items() if b.kind == "int"))
@pytest.mark.parametrize("value", [True, 2.0, "3"])
def test_ints_refuse_bools_floats_and_strings_even_when_built_directly(key: str, value: object) -> None:
    """TOML types are checked on reading; the range check itself also refuses them for code that builds configs."""
    assert not ALL_BOUNDS[key].contains(value)


def test_integers_too_large_for_a_float_are_refused_not_overflowed(tmp_path: Path) -> None:
    huge = 10**400
    with pytest.raises(ConfigError, match=r"'num-clients' must be an integer in \[1, 100000\], got 1000"):
        load_scenario(_toml(tmp_path, f"num-clients = {huge}"))
    with pytest.raises(ConfigError, match="'client-gpus' must be a finite number"):
        ScenarioConfig(client_gpus=huge)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not valid TOML: Exceeds the limit"):  # tomllib's int() gives a ValueError
        load_scenario(_toml(tmp_path, "num-clients = " + "9" * 5000))


def test_every_numeric_field_has_a_range() -> None:
    """A new numeric key without a range would be unbounded again: the table must name every one."""
    numeric = re.compile(r"\b(int|float)\b")
    keys = {f.name.replace("_", "-") for f in dataclasses.fields(ScenarioConfig) if numeric.search(str(f.type))}
    keys |= {f"scripted-faults.{f.name}" for f in dataclasses.fields(ScriptedFault) if numeric.search(str(f.type))}
    keys |= {
        f"privacy.{f.name.replace('_', '-')}" for f in dataclasses.fields(PrivacyConfig) if numeric.search(str(f.type))
    }
    keys |= {
        f"privacy.dp.{f.name.replace('_', '-')}" for f in dataclasses.fields(DpConfig) if numeric.search(str(f.type))
    }
    keys |= {  # every built-in method's numeric settings, for the [method-settings] table
        f"method-settings.{f.name.replace('_', '-')}"
        for config_class in METHODS.values()
        for f in dataclasses.fields(config_class)  # type: ignore[arg-type]
        if numeric.search(str(f.type))
    }
    assert keys - {"privacy.modulus-bits"} == set(ALL_BOUNDS)  # modulus-bits is a choice: 32 or 64


def test_scenarios_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="'round-timeout'"):
        ScenarioConfig(round_timeout=math.inf)
    with pytest.raises(ConfigError, match="'privacy.clipping-range'"):
        PrivacyConfig(clipping_range=math.nan)
    with pytest.raises(ConfigError, match="'scripted-faults.round'"):
        ScriptedFault(round=10**9, client=0, fault="crash")


# --- documentation and shipped scenarios ---------------------------------------------------------------------


def _readme_rows() -> dict[str, str]:
    rows = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\| `([a-z0-9-]+)` \| [^|]* \| ([^|]*) \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


@pytest.mark.parametrize("key", sorted(ALL_BOUNDS))
def test_the_readme_states_each_range(key: str) -> None:
    rows = _readme_rows()
    base, _, field = key.removeprefix("privacy.dp.").removeprefix("privacy.").partition(".")
    assert base in rows, f"simulations/README.md has no row for `{base}`"
    assert str(ALL_BOUNDS[key]) in rows[base], (key, rows[base])
    if field:
        assert f"`{field}`" in rows[base], (key, rows[base])


def test_the_readme_states_the_list_and_product_caps() -> None:
    rows, text = _readme_rows(), README.read_text()
    assert f"at most {MAX_TIERS} entries" in rows["tier-steps"]
    assert f"at most {MAX_SCRIPTED_FAULTS} faults" in rows["scripted-faults"]
    assert f"at most {MAX_SYNTHETIC_MESSAGES} messages" in text and f"({MAX_SCENARIO_BYTES} bytes)" in text
    assert rows["modulus-bits"] == "32 or 64"


@pytest.mark.parametrize("file", sorted((PROJECT_ROOT / "simulations").glob("*.toml")), ids=lambda f: f.name)
def test_every_shipped_scenario_still_loads(file: Path) -> None:
    scenario = load_scenario(file)
    assert scenario.name == file.stem
