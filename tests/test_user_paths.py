"""A path of an unknown user's home (``~someone/x``) read from a file or run config is the project's error.

``Path("~someone/x").expanduser()`` raises RuntimeError when this machine has no user ``someone``;
every reader of such a path goes through ``fedadapt.config_values.expand_user`` instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.device import STATE_DIR, device_from_config
from fedadapt.config_values import expand_user
from fedadapt.data.label_map import LabelMap
from fedadapt.data.readers import load_text_dataset
from fedadapt.errors import ConfigError, DataError
from fedadapt.fleet.run_config import RUN_OUT_DIR, RUN_SCENARIO, fleet_run_from_config
from fedadapt.privacy.keys import parse_public_key

UNKNOWN_HOME = "~no_such_user_fedadapt_paths/x"


def test_expand_user_names_the_value_and_what_it_is() -> None:
    with pytest.raises(DataError, match=r"the data path is '~no_such_user_fedadapt_paths/x'.*home of no user"):
        expand_user(UNKNOWN_HOME, "the data path", DataError)


def test_expand_user_still_expands_a_known_home() -> None:
    assert expand_user("~/x", "a path") == Path.home() / "x"


def test_a_data_path_or_label_file_of_an_unknown_home_is_a_data_error() -> None:
    with pytest.raises(DataError, match="data path"):
        load_text_dataset(UNKNOWN_HOME)
    with pytest.raises(DataError, match="label file"):
        LabelMap.from_file(UNKNOWN_HOME)


def test_run_config_and_node_config_paths_of_an_unknown_home_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server public key"):
        parse_public_key(UNKNOWN_HOME)
    with pytest.raises(ConfigError, match=RUN_SCENARIO):
        fleet_run_from_config({RUN_SCENARIO: UNKNOWN_HOME, RUN_OUT_DIR: str(tmp_path)}, tmp_path)
    with pytest.raises(ConfigError, match=STATE_DIR):
        device_from_config({STATE_DIR: UNKNOWN_HOME, "partition-id": 0}, environ={})
