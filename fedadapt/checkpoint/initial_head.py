"""A head warm start: the classifier head of an earlier adapter folder as the starting head of another model.

A federated run can start from the head a cheaper run trained before it, e.g. a few rounds of the
``head`` method (a federated linear probe on the frozen backbone): the adapter run then spends its
first rounds improving the representation instead of fitting a random head. The two methods name
the head's tensors differently (``classifier.weight`` bare, ``...classifier.modules_to_save.default
.weight`` under PEFT), so tensors are matched by their last name component and shape, and the
folder's labels must be the model's labels in the same order.
"""

from __future__ import annotations

from pathlib import Path

from fedadapt.checkpoint.folder import load_adapter
from fedadapt.delta.state import State
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel


def initial_head_state(model: AdapterModel, folder: str | Path, backbone: str | None = None) -> State:
    """``model``'s head tensors (by its own names), filled from the head saved in adapter folder ``folder``.

    ConfigError when the folder's labels or head shapes differ from ``model``'s; the folder is loaded
    with every check of ``load_adapter`` (on ``backbone`` when given, which must be the one it was trained on).
    """
    source = load_adapter(folder, backbone)
    if tuple(source.labels) != tuple(model.labels):
        raise ConfigError(
            f"initial-head {folder} has {len(source.labels)} labels {list(source.labels)[:5]}..., the scenario's "
            f"model has {len(model.labels)} {list(model.labels)[:5]}...: a head warm start needs the same labels "
            "in the same order"
        )
    saved = source.state()
    by_suffix = {_suffix(s.name): s.name for s in source.schema.tensors if s.role == "head"}
    head: State = {}
    for spec in (s for s in model.schema.tensors if s.role == "head"):
        name = by_suffix.get(_suffix(spec.name))
        if name is None or tuple(saved[name].shape) != spec.shape:
            raise ConfigError(
                f"initial-head {folder} has no head tensor like {spec.name} {list(spec.shape)} (it has "
                f"{sorted(by_suffix)}): train the warm start on the scenario's backbone and labels"
            )
        head[spec.name] = saved[name].detach().clone()
    return head


def _suffix(name: str) -> str:
    """``weight`` or ``bias``: the part of a head tensor's name every method shares."""
    return name.rsplit(".", 1)[-1]
