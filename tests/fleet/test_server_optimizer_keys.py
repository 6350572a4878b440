"""A scenario chooses the server optimizer: server-optimizer and its server-* settings, checked when read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedadapt.aggregate.server_optimizer_config import FedAdamConfig, FedAvgConfig, FedAvgMConfig, FedYogiConfig
from fedadapt.errors import ConfigError
from fedadapt.fleet.scenario import scenario_from_dict
from fedadapt.fleet.scenario_file import load_scenario
from fedadapt.fleet.variants import full_model_variant


def test_plain_fedavg_is_the_default() -> None:
    assert scenario_from_dict({}).server_optimizer_config() == FedAvgConfig(server_lr=1.0)
    assert scenario_from_dict({"server-lr": 0.5}).server_optimizer_config() == FedAvgConfig(server_lr=0.5)


@pytest.mark.parametrize(
    ("keys", "config"),
    [
        ({"server-optimizer": "fedavgm"}, FedAvgMConfig(server_lr=1.0, momentum=0.9)),
        ({"server-optimizer": "fedavgm", "server-lr": 0.1, "server-momentum": 0.5}, FedAvgMConfig(0.1, 0.5)),
        ({"server-optimizer": "fedadam"}, FedAdamConfig(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)),
        ({"server-optimizer": "fedyogi"}, FedYogiConfig(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)),
        (
            {
                "server-optimizer": "fedyogi",
                "server-lr": 0.05,
                "server-beta1": 0,
                "server-beta2": 0.999,
                "server-tau": 1,
            },
            FedYogiConfig(server_lr=0.05, beta1=0.0, beta2=0.999, tau=1.0),
        ),
    ],
)
def test_each_optimizer_with_its_settings(keys: dict[str, object], config: object) -> None:
    chosen = scenario_from_dict(keys).server_optimizer_config()
    assert chosen == config and type(chosen) is type(config)  # FedYogiConfig is a FedAdamConfig: the type matters


def test_the_toml_keys(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text('name = "s"\nserver-optimizer = "fedyogi"\nserver-lr = 0.03\nserver-tau = 0.0001\n')
    assert load_scenario(file).server_optimizer_config() == FedYogiConfig(server_lr=0.03, tau=1e-4)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"server-optimizer": "sgd"}, r"server-optimizer must be one of \('fedavg', 'fedavgm', 'fedadam', 'fedyogi'\)"),
        ({"server-momentum": 0.9}, r"'server-momentum' is a setting of server-optimizer fedavgm, not of 'fedavg'"),
        (
            {"server-optimizer": "fedavgm", "server-beta2": 0.9},
            r"'server-beta2' is a setting of server-optimizer fedadam and fedyogi, not of 'fedavgm'",
        ),
        ({"server-optimizer": "fedyogi", "server-beta2": 1.0}, r"'server-beta2' must be a finite number in \[0, 1\)"),
        ({"server-optimizer": "fedadam", "server-tau": 0}, r"'server-tau' must be a finite number in \(0, 1\]"),
        ({"server-optimizer": 3}, "'server-optimizer' must be a str"),
    ],
)
def test_wrong_settings_are_refused_when_read(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scenario_from_dict(keys)


def test_the_full_model_run_steps_by_plain_fedavg() -> None:
    yogi = scenario_from_dict({"server-optimizer": "fedyogi", "server-lr": 0.05, "server-beta2": 0.999})
    assert full_model_variant(yogi).server_optimizer_config() == FedAvgConfig(server_lr=1.0)
    fedavg = scenario_from_dict({"server-lr": 0.5})
    assert full_model_variant(fedavg).server_optimizer_config() == FedAvgConfig(server_lr=0.5)  # as before


def test_reading_the_keys_loads_no_torch() -> None:
    """Devices read the scenario in stages that never load torch (the SecAgg+ key stages)."""
    code = (
        "import sys; from fedadapt.fleet.scenario import scenario_from_dict; "
        "s = scenario_from_dict({'server-optimizer': 'fedyogi', 'method-settings': {'drop-layers': 1}}); "
        "s.server_optimizer_config(); s.method_config(); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"
