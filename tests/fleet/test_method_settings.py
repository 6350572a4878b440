"""A scenario's [method-settings] table: the method's own fields from the TOML file to the model every device builds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import tiny_scenario, write_tiny_scenario

from fedadapt.delta.serialize import deserialize_state, serialize_state
from fedadapt.errors import ConfigError
from fedadapt.fleet.build import build_model
from fedadapt.fleet.data import load_fleet_data
from fedadapt.fleet.device_data import DeviceContext
from fedadapt.fleet.device_round import run_client_round
from fedadapt.fleet.method_settings import MAX_SETTING_CHARS, MAX_SETTING_ITEMS, METHOD_SETTING_BOUNDS
from fedadapt.fleet.run_config import fleet_run_from_config
from fedadapt.fleet.scenario import SCENARIO_BOUNDS, scenario_from_dict
from fedadapt.fleet.scenario_file import load_scenario
from fedadapt.fleet.variants import full_model_variant
from fedadapt.methods import METHODS, AppliedMethod, make_method_config, register_method


def _toml(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "s.toml"
    file.write_text(f'name = "s"\n{text}\n')
    return file


def test_the_table_sets_the_methods_fields(tmp_path: Path) -> None:
    scenario = load_scenario(
        _toml(tmp_path, 'method = "ffa-lora"\nrank = 4\n[method-settings]\ndrop-layers = 3\na_seed = 7\ndropout = 0\n')
    )
    assert scenario.method_settings == (("a_seed", 7), ("drop_layers", 3), ("dropout", 0.0))
    assert scenario.method_config() == make_method_config("ffa-lora", 4, drop_layers=3, a_seed=7, dropout=0.0)
    # dropout = 0 (a TOML integer) reads as 0.0: the same config, and schema, as the default's.
    assert isinstance(dict(scenario.method_settings)["dropout"], float)
    assert load_scenario(_toml(tmp_path, '[method-settings]\ntarget-modules = ["query"]\n')).method_config() == (
        make_method_config("lora", target_modules=("query",))
    )


def test_an_unknown_setting_is_the_registrys_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"method 'lora' has no settings \['drop_layerz'\]; it has \['alpha', "):
        load_scenario(_toml(tmp_path, "[method-settings]\ndrop-layerz = 3\n"))
    with pytest.raises(ConfigError, match=r"method 'pfeiffer' has no settings \['a_seed'\]"):
        scenario_from_dict({"method": "pfeiffer", "method-settings": {"a-seed": 1}})
    with pytest.raises(ConfigError, match=r"method 'head' has no settings \['drop_layers'\]; it has \[\]"):
        scenario_from_dict({"method": "head", "method-settings": {"drop-layers": 1}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dropout": 0.5, "alpha": 0}, r"'method-settings.alpha' must be an integer in \[1, 65536\], got 0"),
        ({"drop-layers": -1}, r"'method-settings.drop-layers' must be an integer in \[0, 1024\], got -1"),
        ({"drop-layers": 1.5}, r"'method-settings.drop-layers' must be an integer in \[0, 1024\], got 1.5"),
        ({"r": 5000}, r"'method-settings.r' must be an integer in \[1, 4096\], got 5000"),
        ({"target-modules": []}, "target_modules must name at least one module"),  # the config's own check
        (
            {"target-modules": ["q" * (MAX_SETTING_CHARS + 1)]},
            r"'method-settings.target-modules\[0\]' may have at most",
        ),
        ({"target-modules": ["q"] * (MAX_SETTING_ITEMS + 1)}, f"may hold at most {MAX_SETTING_ITEMS} entries"),
        ({"target-modules": [["query"]]}, r"'method-settings.target-modules\[0\]' must be a string, a number"),
        ({"dropout": {"x": 1}}, r"'method-settings.dropout' must be a string, a number"),
        ({"drop-layers": 1, "drop_layers": 2}, "sets 'drop_layers' twice"),
    ],
)
def test_values_are_bounded_and_checked_by_the_config(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scenario_from_dict({"method": "lora", "method-settings": settings})


def test_the_table_must_be_a_table_and_rank_and_r_are_one_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'method-settings' must be a table"):
        load_scenario(_toml(tmp_path, "method-settings = 3"))
    with pytest.raises(ConfigError, match=r"sets the size of 'lora' twice, with 'rank' and with \[method-settings\] r"):
        scenario_from_dict({"rank": 4, "method-settings": {"r": 8}})
    assert scenario_from_dict({"method-settings": {"r": 8}}).method_config() == make_method_config("lora", 8)


def test_a_head_only_fleet_must_share_its_head() -> None:
    with pytest.raises(ConfigError, match="method 'head' trains the head alone: with personal-head = true"):
        scenario_from_dict({"method": "head", "personal-head": True})
    assert scenario_from_dict({"method": "head"}).method_config().name == "head"


@dataclasses.dataclass(frozen=True)
class _Smoothed:
    """A method of one's own with a numeric setting that has no range in METHOD_SETTING_BOUNDS."""

    name: ClassVar[str] = "test-smoothed"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = False
    smoothing: float = 0.0

    def apply(self, model):  # type: ignore[no-untyped-def]
        return AppliedMethod(module=model)


def test_a_number_without_a_range_is_refused_until_it_has_one() -> None:
    register_method(_Smoothed)
    try:
        with pytest.raises(ConfigError, match="'method-settings.smoothing' has no range in .*METHOD_SETTING_BOUNDS"):
            scenario_from_dict({"method": "test-smoothed", "method-settings": {"smoothing": 0.1}})
        assert scenario_from_dict({"method": "test-smoothed"}).method_config() == _Smoothed()
    finally:
        del METHODS["test-smoothed"]


def test_every_numeric_setting_of_every_built_in_method_has_a_range() -> None:
    numeric = {
        f.name.replace("_", "-")
        for config_class in METHODS.values()
        for f in dataclasses.fields(config_class)  # type: ignore[arg-type]
        if "int" in str(f.type) or "float" in str(f.type)
    }
    assert numeric == set(METHOD_SETTING_BOUNDS)
    assert all(SCENARIO_BOUNDS[f"method-settings.{key}"] == b for key, b in METHOD_SETTING_BOUNDS.items())


# --- to every device, and not to the full-model run ---------------------------------------------------------------


def test_the_settings_travel_with_the_scenario_to_server_and_devices(tiny_bert: Path, tmp_path: Path) -> None:
    """The run config names the scenario file; whoever reads it (server, device) builds the top-layer model."""
    file = write_tiny_scenario(tmp_path, tiny_bert, **{"method-settings": {"drop-layers": 1}})
    run = fleet_run_from_config({"scenario": str(file), "out-dir": str(tmp_path / "out")}, tmp_path)
    assert run.scenario.method_settings == (("drop_layers", 1),)
    full = fleet_run_from_config({"scenario": str(file), "out-dir": "x", "full-model": True}, tmp_path).scenario
    assert full.method == "full" and full.method_settings == ()

    scenario = dataclasses.replace(run.scenario, device="cpu")
    model = build_model(scenario, load_fleet_data(scenario).labels.names)
    assert model.schema.method["drop_layers"] == 1
    adapters = [s.name for s in model.schema.specs("shared") if s.role == "adapter"]
    assert adapters and all(".layer.1." in n for n in adapters)
    blob = serialize_state(model.state("shared"), model.schema, "shared", "none")
    reply = run_client_round(DeviceContext(scenario, 0, tmp_path / "device"), blob, server_round=1)
    delta = deserialize_state(reply.delta_blob, model.schema, "shared")  # the device built the same schema
    assert list(delta) == [s.name for s in model.schema.specs("shared")]
    assert any(bool(delta[n].abs().sum() > 0) for n in adapters)


def test_the_cached_model_tells_settings_apart(tiny_bert: Path) -> None:
    """One model per process is cached by the fields a model depends on: the settings are among them."""
    from fedadapt.fleet.build import cached_model

    labels = load_fleet_data(tiny_scenario(tiny_bert)).labels.names
    full_depth = cached_model(tiny_scenario(tiny_bert), labels).model
    top = cached_model(tiny_scenario(tiny_bert, method_settings=(("drop_layers", 1),)), labels).model
    assert full_depth.schema_id != top.schema_id and top.schema.method["drop_layers"] == 1


def test_the_full_model_variant_drops_the_settings() -> None:
    scenario = scenario_from_dict({"method": "pfeiffer", "method-settings": {"drop-layers": 2, "scaling": 2}})
    assert dict(scenario.method_settings) == {"drop_layers": 2, "scaling": 2.0}
    variant = full_model_variant(scenario)
    assert variant.method == "full" and variant.method_settings == () and variant.method_config().name == "full"


def test_a_stacks_folders_are_the_scenario_files_like_its_data(tmp_path: Path) -> None:
    (tmp_path / "adapters" / "pfeiffer").mkdir(parents=True)
    file = _toml(tmp_path, 'method = "stack"\n[method-settings]\nbelow = ["adapters/pfeiffer", "elsewhere/none"]\n')
    settings = dict(load_scenario(file).method_settings)
    assert settings["below"] == (str((tmp_path / "adapters" / "pfeiffer").resolve()), "elsewhere/none")
