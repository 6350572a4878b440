"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedadapt import AdapterModel, BackboneConfig, StateSplit, load_backbone, make_method_config
from fedadapt.fleet.scenario import ScenarioConfig


def build_lora(tiny_bert: Path, r: int = 8, split: StateSplit | None = None) -> AdapterModel:
    """LoRA r on the tiny BERT with a 3-class head."""
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=3))
    return AdapterModel(loaded, make_method_config("lora", r=r), split)


def perturbed(state: Mapping[str, torch.Tensor], seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """``state`` plus seeded Gaussian noise: a non-trivial 'trained' state (no tensor all zeros)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: t + std * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in state.items()}


def train_steps(model: AdapterModel, batch: dict[str, torch.Tensor], steps: int = 5, lr: float = 1e-2) -> None:
    """A few full-batch AdamW steps on the trainable parameters, then eval mode."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


def tiny_scenario(tiny_bert: Path, **changes: object) -> ScenarioConfig:
    """A 3-client LoRA r=4 scenario on the tiny BERT, 2 local steps, CPU; ``changes`` override fields."""
    base = ScenarioConfig(
        name="tiny",
        backbone=str(tiny_bert),
        num_clients=3,
        method="lora",
        rank=4,
        local_max_steps=2,
        batch_size=8,
        max_length=16,
        device="cpu",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


TINY_SCENARIO: dict[str, object] = {
    "name": "tiny",
    "num-clients": 3,
    "rank": 4,
    "rounds": 2,
    "local-max-steps": 2,
    "batch-size": 8,
    "max-length": 16,
    "device": "cpu",
    "seed": 3,
}


def write_tiny_scenario(
    folder: Path, tiny_bert: Path, privacy: Mapping[str, object] | None = None, **changes: object
) -> Path:
    """``folder/scenario.toml``: TINY_SCENARIO on the tiny BERT, with ``changes`` (scenario keys; ``_`` reads
    as ``-``) and an optional ``[privacy]`` table. A list of dicts becomes a list of inline tables."""
    values = {"backbone": str(tiny_bert), **TINY_SCENARIO} | {k.replace("_", "-"): v for k, v in changes.items()}
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    if privacy:
        lines += ["[privacy]", *(f"{key} = {_toml_value(value)}" for key, value in privacy.items())]
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "scenario.toml"
    file.write_text("\n".join(lines) + "\n")
    return file


def _toml_value(value: object) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def set_flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this process the task identity Flower's runtime sets: a Message takes its run id from it."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class StubGrid(Grid):
    """A Grid whose nodes are answered in this process: subclasses give ``get_node_ids`` and ``send_and_receive``.

    ``push_messages`` / ``pull_messages`` (what the server's plain round uses) are built on ``send_and_receive``:
    the first pull answers every pushed message at once; a reply lost there never comes.
    """

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        pushed = self.__dict__.setdefault("_pushed", {})
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's in-memory grid does
            pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        pushed = self.__dict__.setdefault("_pushed", {})
        wanted = [pushed.pop(i) for i in list(message_ids) if i in pushed]
        if not wanted:
            return []
        by_node = {m.metadata.dst_node_id: m.metadata.message_id for m in wanted}
        replies = list(self.send_and_receive(wanted, timeout=None))
        for reply in replies:  # a test's hand-made reply may answer a copy of the message: file it by its node
            if reply.metadata.reply_to_message_id not in by_node.values():
                node = reply.metadata.src_node_id
                reply.metadata.__dict__["_reply_to_message_id"] = by_node.get(node, "")
        return replies


def seed_with_one_crash(rounds: int, clients: int, dropout: float) -> tuple[int, tuple[int, int]]:
    """A scenario seed under which exactly one (round, client) of the run crashes."""
    from fedadapt.fleet.faults import device_fault

    for seed in range(1000):
        scenario = ScenarioConfig(seed=seed, dropout_fraction=dropout)
        pairs = [(r, p) for r in range(1, rounds + 1) for p in range(clients)]
        crashes = [pair for pair in pairs if device_fault(scenario, *pair) == "crash"]
        if len(crashes) == 1:
            return seed, crashes[0]
    raise AssertionError("no seed gives exactly one crash")


def onnx_operators(*graphs: Path) -> set[str]:
    """The ai.onnx operator types of ``graphs``' nodes, read with onnx (not with ONNX Runtime)."""
    import onnx

    return {node.op_type for g in graphs for node in onnx.load(str(g)).graph.node if node.domain in ("", "ai.onnx")}


def config_operators(config: Path) -> dict[str, set[str]]:
    """domain → operators a required_operators.config names, read with the parser ONNX Runtime's build uses."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(config))
    return {domain: set().union(*opsets.values()) for domain, opsets in required.items()}
