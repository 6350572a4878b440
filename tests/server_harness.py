"""The server's round loop on an in-process grid: every node runs the real ClientApp in this process.

Tests of the round (tests/simulations/test_simulation.py, tests/aggregate/test_server_training.py)
share it; import ``task_identity`` into a test module to make its messages carry Flower's task identity.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from helpers import StubGrid, set_flower_task_identity, write_tiny_scenario

from fedadapt.fleet import protocol

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed; Flower imports them from the project folder
    sys.path.insert(0, str(PROJECT_ROOT))

from clients.client_app import app as client_app  # noqa: E402
from server.server_app import app as server_app  # noqa: E402

Tamper = Callable[[Message], Message | None]


class InProcessGrid(StubGrid):
    """A grid whose nodes run the ClientApp in this process (node 101 is partition 0, and so on)."""

    def __init__(self, num_nodes: int, run_config: dict[str, Any], tamper: dict[int, Tamper] | None = None) -> None:
        self.nodes = {101 + i: i for i in range(num_nodes)}
        self.run_config = run_config
        self.tamper = tamper or {}
        self.sent: list[int] = []
        self.global_blobs: list[bytes] = []  # what each message carried

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append(node)
            self.global_blobs.append(message.content[protocol.ARRAYS][protocol.ADAPTER_STATE].numpy().tobytes())
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": self.nodes[node], "state-dir": device_root(self.run_config)},
                state=RecordDict(),
                run_config=self.run_config,
            )
            reply = self.tamper.get(node, lambda m: m)(client_app(message, context))
            if reply is not None:  # None: the reply never arrived (a lost or straggling device)
                replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_flower_task_identity(monkeypatch)


def server_scenario_file(tmp_path: Path, tiny_bert: Path, **extra: Any) -> Path:
    return write_tiny_scenario(tmp_path, tiny_bert, **{"clients-per-round": 2, **extra})


def run_server(grid: InProcessGrid) -> dict[str, Any]:
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=grid.run_config))
    out_dir = Path(str(grid.run_config["out-dir"]))
    return dict(json.loads((out_dir / "metrics.json").read_text()))


def server_run_config(scenario: Path, out_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"scenario": str(scenario), "out-dir": str(out_dir)} | extra


def device_root(run_config: dict[str, Any]) -> str:
    """Where the in-process devices keep their files: as in a simulation, ``<out-dir>/clients``."""
    return str(Path(str(run_config["out-dir"])) / "clients")
