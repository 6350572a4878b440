"""Swappable mode: one shared graph whose per-user tensors are inputs, plus one ``.onnx_adapter`` per user.

Every trainable tensor of the adapter schema — the adapter's and the head's, since the head is
per user too — becomes a graph input that is also an overridable initializer (default: zeros).
A phone loads ``backbone.onnx`` once and switches users by activating another adapter file
(``RunOptions.add_active_adapter``); without an active adapter the graph computes nothing useful.

The graph is a wrapper that calls the classifier with the per-user tensors in place of its
parameters, so the same mechanism serves every single-adapter method (LoRA, FFA-LoRA, IA3,
BitFit, bottleneck adapters, prompt and prefix tuning). ``torch.func.functional_call`` would do the swap, but it refuses
to run under the TorchScript tracer ("The stateless API can't be used with Jitted modules").
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.bundle_verify import ADAPTER_SUFFIX, ADAPTERS_DIR
from export.bundle_verify import BACKBONE_FILE as BACKBONE_FILE  # re-exported: the phone names it there, torch-free
from export.graph import make_overridable, write_onnx
from export.merged import OUTPUT_NAME, dummy_inputs
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel

logger = logging.getLogger(__name__)

USAGE = (
    "Exactly one adapter must be active per run: load adapters/<name>.onnx_adapter with onnxruntime.LoraAdapter "
    "and pass RunOptions.add_active_adapter(adapter) to InferenceSession.run. backbone.onnx alone is not a valid "
    "model (its per-user inputs default to zeros), and ONNX Runtime silently applies two adapters activated "
    "together: use a fresh RunOptions per adapter."
)

UNSWAPPABLE: dict[str, str] = {
    "full": "full fine-tuning makes every weight per user, so there is no shared graph to swap adapters on",
    "stack": "a stack composes several adapters, and swappable bundles hold one adapter per user",
    "fusion": "fusion composes several adapters, and swappable bundles hold one adapter per user",
}


def check_swappable(method: str) -> None:
    """ConfigError if adapters of ``method`` cannot be exported in swappable mode."""
    if method in UNSWAPPABLE:
        raise ConfigError(
            f"{method} cannot be exported with --mode swappable: {UNSWAPPABLE[method]}; use --mode merged"
        )


def adapter_file(name: str) -> str:
    """Path of adapter ``name``'s file inside a bundle, relative to the bundle."""
    return f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"


def adapter_entry(name: str, adapter_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of adapter ``name``: its file, method, schema id and label names."""
    return {
        "file": adapter_file(name),
        "method": adapter_manifest["method"]["name"],
        "schema_id": adapter_manifest["schema_id"],
        "labels": list(adapter_manifest["labels"]),  # users may name their classes differently
    }


class SwappableGraph(nn.Module):
    """(input_ids, attention_mask (B, T), *per-user tensors) → logits (B, num_labels).

    ``names`` are the per-user tensors' parameter names in ``classifier``, in input order.
    """

    def __init__(self, classifier: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.classifier = classifier
        self.names = names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *per_user: torch.Tensor) -> torch.Tensor:
        with parameters_replaced(self.classifier, dict(zip(self.names, per_user, strict=True))):
            logits: torch.Tensor = self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


@contextlib.contextmanager
def parameters_replaced(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``module`` with its parameters named in ``tensors`` replaced by those tensors, restored on exit.

    A traced forward then reads the replacements, which are graph inputs, instead of the
    parameters, which would be baked into the graph as constants.
    """
    saved: list[tuple[nn.Module, str, nn.Parameter | None]] = []
    try:
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf not in owner._parameters:
                raise KeyError(f"{name} is not a parameter of {type(module).__name__}")
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = tensor  # type: ignore[assignment]  # a plain tensor: what forward reads
        yield
    finally:
        for owner, leaf, parameter in reversed(saved):
            owner._parameters[leaf] = parameter


def per_user_tensors(model: AdapterModel) -> dict[str, np.ndarray]:
    """Every trainable tensor (adapter and head) by schema name: the content of a user's adapter file."""
    return {name: tensor.numpy() for name, tensor in model.state().items()}


def export_swappable(model: AdapterModel, path: Path, opset: int) -> float:
    """Write the shared graph for ``model``'s adapter layout to ``path``; return the seconds torch.onnx took."""
    check_swappable(model.method.name)
    state = model.state()
    names = tuple(state)
    graph = SwappableGraph(copy.deepcopy(model.module), names).eval()  # a copy: tracing must not touch ``model``
    vocab_size = int(model.backbone.model.config.vocab_size)
    inputs: dict[str, torch.Tensor] = {**dummy_inputs(vocab_size), **state}
    seconds = write_onnx(graph, inputs, (OUTPUT_NAME,), path, opset, static_inputs=names)
    make_overridable(path, {name: np.zeros_like(t.numpy()) for name, t in state.items()})
    logger.info(
        "exported %s (swappable, %d per-user tensors) to %s in %.1f s", model.method.name, len(names), path, seconds
    )
    return seconds


def split_inputs(graph: Mapping[str, Any], per_user: set[str]) -> dict[str, Any]:
    """The graph description with its per-user inputs moved from ``inputs`` to ``adapter_inputs``."""
    return {
        **graph,
        "inputs": [i for i in graph["inputs"] if i["name"] not in per_user],
        "adapter_inputs": [i for i in graph["inputs"] if i["name"] in per_user],
    }
