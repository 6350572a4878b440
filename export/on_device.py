"""The graphs a phone trains its user's personal part with, written beside a swappable bundle (issue 21).

The personal part is the head plus the per-user tensors of the top ``train_layers`` encoder layers;
everything below (embeddings and layers ``0..F-1``, F = L - train_layers) is the frozen prefix. The
phone runs the prefix once per example, keeps its states, and trains only the top on them:

- ``prefix.onnx``: (input_ids, attention_mask (B, T), *prefix tensors) -> hidden (B, T, H). The
  user's own per-user tensors below the top are overridable inputs: the trainer feeds them from the
  user's ``.onnx_adapter``, so the prefix is that user's, not the exported one's.
- ``train_step.onnx``: (hidden (B, T, H), attention_mask (B, T), labels (B,), weights (B,),
  *trainable) -> loss, logits, and ``grad.<name>`` for each trainable tensor: one forward and
  backward at a fixed B x T. The loss is sum(w * ce) / sum(w), so padding rows (w = 0) count for
  nothing. ONNX Runtime's training packages ended at 1.19 (training left the 1.20 packages), so the
  backward pass is part of the graph and ONNX Runtime runs it as inference.
- ``train_step.pte``: the same joint program for ExecuTorch's training runtime, whose C++ module
  runs it on phones (its Python runtime loads libtorch, so the torch-free trainer uses the ONNX graph).
  Lowered with the XNNPACK delegate where that works, else portable (export/on_device_program.py).

Both step graphs come from one joint program (``torch.export`` and then
``_export_forward_backward``, ExecuTorch's documented route), exported under eager attention: SDPA's
backward does not lower to ExecuTorch. Dropout is off, as in the prefix: the phone trains in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from export.bundle_verify import GRAD_PREFIX, HIDDEN, LOGITS, LOSS, STEP_INPUTS
from export.bundle_verify import ON_DEVICE_SECTION as ON_DEVICE_SECTION  # re-exported for the exporter
from export.config import ON_DEVICE_EXTRA, OnDeviceConfig
from export.errors import ExportError
from export.graph import check_onnx, make_overridable, write_onnx
from export.on_device_int8 import tokenized, write_prefix_int8
from export.on_device_program import write_program
from export.quantize import int8_file
from export.swappable import parameters_replaced
from fedadapt.errors import ConfigError
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.train.frozen_prefix import EncoderParts, encoder_parts
from fedadapt.train.prefix_cache import extended_mask, run_layers

logger = logging.getLogger(__name__)


FOLDER = "on_device"
PREFIX_FILE = f"{FOLDER}/prefix.onnx"
PREFIX_INT8_FILE = int8_file(PREFIX_FILE)  # with --quantize int8: the prefix quantized as the main graph is
TRAIN_STEP_FILE = f"{FOLDER}/train_step.onnx"
PROGRAM_FILE = f"{FOLDER}/train_step.pte"
ORT_GRAPHS = (PREFIX_FILE, TRAIN_STEP_FILE)  # what the phone's trainer runs in ONNX Runtime (the .pte: ExecuTorch)
STEP_OPSET = 18  # torch's dynamo exporter (the only one that takes an ExportedProgram) writes 18 and up
GRADIENT_ATOL = 1e-5  # the export's own check of the step's gradients against eager PyTorch


@dataclass(frozen=True)
class PersonalPart:
    """Where a model's per-user tensors sit: below the trained top (prefix inputs) or in it (trainable)."""

    frozen_layers: int
    prefix_tensors: tuple[str, ...]
    trainable: tuple[str, ...]


def personal_part(model: AdapterModel, train_layers: int) -> PersonalPart:
    """Split ``model``'s per-user tensors at layer L - ``train_layers``; ConfigError where a model cannot be split."""
    parts = encoder_parts(model)  # ConfigError for virtual tokens, BackboneError for a non-BERT encoder
    depth = len(parts.layers)
    if train_layers > depth:
        raise ConfigError(f"--train-layers {train_layers} is more than the backbone's {depth} layers")
    frozen = depth - train_layers
    below = _ids(parts.embeddings, *parts.layers[:frozen])
    top = _ids(*_top_modules(parts, frozen))
    named = dict(model.module.named_parameters())
    prefix: list[str] = []
    trainable: list[str] = []
    elsewhere: list[str] = []
    for name in model.state():
        place = id(named[name])
        (trainable if place in top else prefix if place in below else elsewhere).append(name)
    if elsewhere:
        raise ConfigError(
            f"method {model.method.name!r} has per-user tensors outside the encoder's layers and head "
            f"(e.g. {elsewhere[0]}); on-device training splits the model between its layers"
        )
    if not trainable:
        raise ConfigError("nothing of the personal part would train on the phone: the head has no per-user tensors")
    return PersonalPart(frozen, tuple(prefix), tuple(trainable))


def _ids(*modules: nn.Module) -> set[int]:
    return {id(p) for module in modules for p in module.parameters()}


def _top_modules(parts: EncoderParts, frozen_layers: int) -> list[nn.Module]:
    """The trained top: layers ``frozen_layers..L-1``, BERT's pooler (if kept), the pooling and the head."""
    modules: list[nn.Module] = [*parts.layers[frozen_layers:], parts.classifier.pooler, parts.classifier.classifier]
    return [*modules, parts.pooler] if parts.pooler is not None else modules


class TrainStep(nn.Module):
    """(hidden, attention_mask, labels, weights) -> (loss, logits): the top layers, pooling, head and weighted CE."""

    def __init__(self, parts: EncoderParts, frozen_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(parts.layers[frozen_layers:])
        self.bert_pooler = parts.pooler
        self.pooling = parts.classifier.pooler
        self.head = parts.classifier.classifier
        self.encoder_config = parts.config

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = top_logits(self, hidden, attention_mask)
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        return (loss * weights).sum() / weights.sum().clamp(min=1e-12), logits.detach()


def top_logits(step: TrainStep, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logits ``step``'s top computes on prefix states (B, T, H)."""
    if len(step.layers):
        hidden = run_layers(step.layers, hidden, extended_mask(step.encoder_config, hidden, attention_mask))
    backbone_pooled = step.bert_pooler(hidden) if step.bert_pooler is not None else None
    logits: torch.Tensor = step.head(step.pooling(hidden, attention_mask, backbone_pooled))
    return logits


def eager_train_step(model: AdapterModel, part: PersonalPart) -> tuple[TrainStep, dict[str, str]]:
    """A copy of ``model``'s top as a TrainStep under eager attention, and its parameter names -> schema names.

    Only the personal part requires grad in the copy; ``model`` itself is not changed.
    """
    live = TrainStep(encoder_parts(model), part.frozen_layers)
    schema = {id(p): name for name, p in model.module.named_parameters() if name in set(part.trainable)}
    names = {name: schema[id(p)] for name, p in live.named_parameters() if id(p) in schema}
    step = copy.deepcopy(live).eval()
    config = copy.deepcopy(step.encoder_config)
    config._attn_implementation = "eager"  # SDPA's backward does not lower to ExecuTorch
    for module in step.modules():
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config = config  # type: ignore[assignment]  # nn.Module's __setattr__ is typed for tensors
    step.encoder_config = config
    for name, param in step.named_parameters():
        param.requires_grad_(name in names)
    return step, names


def example_batch(config: OnDeviceConfig, hidden_size: int, num_labels: int) -> tuple[torch.Tensor, ...]:
    """A B x T batch to export with: random states, ragged masks, one padding row (weight 0)."""
    generator = torch.Generator().manual_seed(0)
    batch, length = config.batch_size, config.sequence_length
    hidden = torch.randn(batch, length, hidden_size, generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        attention_mask[row, max(1, length - 3 * row) :] = 0
    labels = torch.arange(batch) % num_labels
    weights = torch.ones(batch)
    weights[-1] = 0.0 if batch > 1 else 1.0
    return hidden, attention_mask, labels, weights


def joint_program(step: TrainStep, batch: tuple[torch.Tensor, ...]) -> Any:
    """The forward-and-backward ExportedProgram of ``step`` (loss, logits, then one gradient per trainable)."""
    from torch.export.experimental import _export_forward_backward

    with _quiet():
        exported = torch.export.export(step, batch, strict=False)
        return _export_forward_backward(exported)


class FlatStep(nn.Module):
    """The joint program's graph with every trainable tensor an input and the frozen ones buffers.

    torch.onnx keeps only an ExportedProgram's user outputs (the loss and the logits) and bakes its
    parameters in; re-exported through this module, the gradients are outputs and the personal
    tensors are inputs, in ``trainable`` order.
    """

    def __init__(self, joint: Any, trainable: Sequence[str]) -> None:
        super().__init__()
        self.graph = joint.graph_module
        self.trainable = tuple(trainable)
        signature = joint.graph_signature
        self.slots: list[tuple[str, str]] = []  # per graph input: ("user", i) / ("trained", name) / ("frozen", buffer)
        users = 0
        for index, spec in enumerate(signature.input_specs):
            kind = spec.kind.name
            if kind == "USER_INPUT":
                self.slots.append(("user", str(users)))
                users += 1
            elif spec.target in self.trainable:
                self.slots.append(("trained", spec.target))
            else:
                value = joint.constants[spec.target] if kind in ("CONSTANT_TENSOR",) else joint.state_dict[spec.target]
                self.register_buffer(f"frozen_{index}", value.detach().clone())
                self.slots.append(("frozen", f"frozen_{index}"))
        outputs = [spec.kind.name for spec in signature.output_specs]
        gradients = {
            spec.target: i for i, spec in enumerate(signature.output_specs) if spec.kind.name.startswith("GRAD")
        }
        missing = [name for name in self.trainable if name not in gradients]
        if outputs[:2] != ["LOSS_OUTPUT", "USER_OUTPUT"] or missing:
            raise ExportError(f"the joint program's outputs are {outputs}; no gradient for {missing[:3]}")
        self.order = [0, 1, *(gradients[name] for name in self.trainable)]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        users, trained = inputs[: len(STEP_INPUTS)], dict(zip(self.trainable, inputs[len(STEP_INPUTS) :], strict=True))
        flat = []
        for kind, key in self.slots:
            flat.append(
                users[int(key)] if kind == "user" else trained[key] if kind == "trained" else getattr(self, key)
            )
        outputs = self.graph(*flat)
        return tuple(outputs[i] for i in self.order)


def write_train_step(joint: Any, names: Mapping[str, str], batch: tuple[torch.Tensor, ...], path: Path) -> float:
    """``train_step.onnx``: inputs STEP_INPUTS + the trainable tensors (schema names); returns the seconds it took."""
    step_names = list(names)
    flat = FlatStep(joint, step_names).eval()
    values = dict(joint.state_dict)
    example = (*batch, *(values[name].detach() for name in step_names))
    output_names = [LOSS, LOGITS, *(GRAD_PREFIX + names[name] for name in step_names)]
    started = time.perf_counter()
    with _quiet():
        try:
            program = torch.onnx.export(
                flat,
                example,
                dynamo=True,
                opset_version=STEP_OPSET,
                input_names=[*STEP_INPUTS, *(names[name] for name in step_names)],
                output_names=output_names,
                verbose=False,
            )
        except Exception as err:  # torch.onnx raises many kinds; any of them means no step graph
            raise ExportError(f"torch.onnx could not export the training step: {str(err)[:500]}") from err
    if program is None:
        raise ExportError("torch.onnx returned no program for the training step")
    program.save(str(path))
    check_onnx(path)
    return time.perf_counter() - started


class PrefixGraph(nn.Module):
    """(input_ids, attention_mask, *prefix tensors) -> the states after layer F-1 (B, T, H)."""

    def __init__(self, module: nn.Module, where: tuple[str, str], part: PersonalPart, config: PretrainedConfig) -> None:
        super().__init__()
        self.module = module  # a copy of the model's module: the per-user tensors are swapped in while it runs
        self.embeddings, self.layers = where  # the embeddings' and the layer list's names in ``module``
        self.frozen_layers, self.names = part.frozen_layers, part.prefix_tensors
        self.encoder_config = config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *per_user: torch.Tensor) -> torch.Tensor:
        with parameters_replaced(self.module, dict(zip(self.names, per_user, strict=True))):
            hidden: torch.Tensor = self.module.get_submodule(self.embeddings)(input_ids=input_ids)
            layers = self.module.get_submodule(self.layers)
            assert isinstance(layers, nn.ModuleList)
            mask = extended_mask(self.encoder_config, hidden, attention_mask)
            return run_layers(layers[: self.frozen_layers], hidden, mask)


def write_prefix(model: AdapterModel, part: PersonalPart, config: OnDeviceConfig, path: Path, opset: int) -> float:
    """``prefix.onnx`` with the user's per-user tensors below the top as overridable inputs; returns its seconds."""
    parts = encoder_parts(model)
    where = {id(module): name for name, module in model.module.named_modules()}
    names = (where[id(parts.embeddings)], where[id(parts.layers)])
    graph = PrefixGraph(copy.deepcopy(model.module), names, part, parts.config).eval()
    state = model.state()
    vocab_size = int(parts.config.vocab_size)
    batch, length = config.batch_size, config.sequence_length
    input_ids = torch.arange(batch * length).reshape(batch, length) % vocab_size
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length // 2 :] = 0  # a padded row: the trace keeps the mask path
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    inputs |= {name: state[name] for name in part.prefix_tensors}
    seconds = write_onnx(graph, inputs, (HIDDEN,), path, opset, static_inputs=part.prefix_tensors)
    if part.prefix_tensors:
        make_overridable(path, {name: state[name].numpy() for name in part.prefix_tensors})
    return seconds


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export and torch.onnx print progress and deprecation warnings: the export's log says what it did."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_gradients(path: Path, step: TrainStep, names: Mapping[str, str], batch: tuple[torch.Tensor, ...]) -> float:
    """The largest difference between ``train_step.onnx``'s loss and gradients and eager PyTorch's; ExportError
    above GRADIENT_ATOL."""
    import onnxruntime as ort

    params = dict(step.named_parameters())
    for param in params.values():
        param.grad = None
    loss, _ = step(*batch)
    loss.backward()
    expected = {LOSS: loss.detach().numpy()}
    for name, schema in names.items():
        gradient = params[name].grad
        if gradient is None:
            raise ExportError(f"PyTorch computed no gradient for {schema}: it does not reach the loss")
        expected[GRAD_PREFIX + schema] = gradient.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in zip(STEP_INPUTS, batch, strict=True)}
    feeds |= {schema: params[name].detach().numpy() for name, schema in names.items()}
    found = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    worst = max(float(np.max(np.abs(found[key] - value), initial=0.0)) for key, value in expected.items())
    if not worst <= GRADIENT_ATOL:
        raise ExportError(f"train_step.onnx's gradients differ from PyTorch's by {worst:.2e} (> {GRADIENT_ATOL:g})")
    return worst


@dataclass(frozen=True)
class OnDeviceExport:
    """What ``write_on_device`` adds: the manifest's ``on_device_training`` section and the report's."""

    manifest: dict[str, Any]
    report: dict[str, Any]
    ort_graphs: tuple[str, ...] = ORT_GRAPHS  # what the phone may run in ONNX Runtime (the operators list covers them)


def write_on_device(
    model: AdapterModel, config: OnDeviceConfig, folder: Path, opset: int, int8_texts: Sequence[str] | None = None
) -> OnDeviceExport:
    """Write the prefix, the step graph and the ExecuTorch program for ``model``'s user into ``folder``.

    ``int8_texts`` (``--quantize int8``): also write ``prefix.int8.onnx`` and measure its states against
    the fp32 prefix's on these texts.
    """
    if config.sequence_length > model.max_text_tokens:
        raise ConfigError(
            f"the on-device sequence length {config.sequence_length} is more than the backbone's "
            f"{model.max_text_tokens} positions"
        )
    part = personal_part(model, config.train_layers)
    (folder / FOLDER).mkdir(exist_ok=True)
    prefix_seconds = write_prefix(model, part, config, folder / PREFIX_FILE, opset)
    prefix_int8 = None
    if int8_texts is not None:
        feeds = tokenized(model.backbone.tokenizer, int8_texts, config.sequence_length)
        prefix_int8 = write_prefix_int8(folder, PREFIX_FILE, part.prefix_tensors, feeds)
    step, names = eager_train_step(model, part)
    batch = example_batch(config, int(encoder_parts(model).config.hidden_size), len(model.labels))
    # One joint program each: torch.onnx and to_edge both change the program they are given.
    step_seconds = write_train_step(joint_program(step, batch), names, batch, folder / TRAIN_STEP_FILE)
    worst = check_gradients(folder / TRAIN_STEP_FILE, step, names, batch)
    try:
        import executorch  # noqa: F401  # the program's lowering imports its parts lazily
    except ImportError as err:
        raise ConfigError(f"{ON_DEVICE_EXTRA}: {err}") from None
    make_joint = lambda: joint_program(step, batch)  # noqa: E731  # each lowering changes the program it is given
    with _quiet():
        program = write_program(make_joint, step, names, batch, folder / PROGRAM_FILE, GRADIENT_ATOL)
    hidden_size = int(batch[0].shape[-1])
    section = {
        "prefix": PREFIX_FILE,
        **({"prefix_int8": PREFIX_INT8_FILE} if prefix_int8 is not None else {}),
        "train_step": TRAIN_STEP_FILE,
        "program": PROGRAM_FILE,
        "train_layers": config.train_layers,
        "frozen_layers": part.frozen_layers,
        "batch_size": config.batch_size,
        "sequence_length": config.sequence_length,
        "hidden_size": hidden_size,
        "prefix_inputs": list(part.prefix_tensors),
        "trainable": [names[name] for name in names],
        "program_parameters": dict(names),  # ExecuTorch names the gradients by the step's own parameter names
        "program_backend": program.backend,  # a phone's ExecuTorch runtime must register this backend to load it
        "optimizer": {"name": "sgd", "learning_rate": config.learning_rate, "momentum": config.momentum},
    }
    report = {
        "train_layers": config.train_layers,
        "trainable_tensors": len(names),
        "trainable_parameters": int(sum(p.numel() for n, p in step.named_parameters() if n in names)),
        "gradient_max_abs_diff": worst,
        "program_backend": program.backend,
        "program_fallback_reason": program.fallback_reason,
        "program_gradient_max_abs_diff": program.gradient_max_abs_diff,
        "seconds": {"prefix": prefix_seconds, "train_step": step_seconds, "program": program.seconds},
    }
    if prefix_int8 is not None:
        report["prefix_int8"] = prefix_int8
    logger.info(
        "on-device training: prefix of %d layers, %d trainable tensors, gradients within %.1e of PyTorch; "
        "train_step.pte lowered with %s, within %.1e",
        part.frozen_layers,
        len(names),
        worst,
        program.backend,
        program.gradient_max_abs_diff,
    )
    ort_graphs = (*ORT_GRAPHS, PREFIX_INT8_FILE) if prefix_int8 is not None else ORT_GRAPHS
    return OnDeviceExport(section, report, ort_graphs)
