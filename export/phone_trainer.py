"""Personalize a user's adapter on the phone: training with ONNX Runtime, tokenizers and numpy, and no torch.

    python export/phone_trainer.py personalize BUNDLE --user NAME --data my.csv [--steps N] [--from BASE]

The bundle must have been exported with ``fedadapt export --mode swappable --on-device-training``
(export/on_device.py). The trainer splits the user's labelled examples (a CSV with ``text`` and
``label`` columns, labels named as in the user's adapter) into a training and a held-out part,
scores the held-out part with the user's current adapter through the bundle's own ``backbone.onnx``,
runs ``prefix.onnx`` once per training example, trains the personal part (the head, and the adapters
of the top layers the export chose) with SGD on ``train_step.onnx``'s gradients, scores the new
adapter through ``backbone.onnx`` again, and writes it as ``adapters/NAME.onnx_adapter``: the bundle
serves it with no re-export. A new user starts from another user's adapter (``--from``).

Nothing in the bundle or the data is trusted: the bundle is read through export/bundle_verify.py (a
checked manifest, every file's size and sha256), the step graph must have exactly the inputs and
outputs its manifest section names, the data file is read with size, row and text-length limits, and
an unknown label is refused with the labels the user has. Any error leaves the bundle as it was: the
adapter file and the manifest are written beside their final paths and renamed into place last.

``--prefix-precision int8`` computes the prefix states with the bundle's ``prefix.int8.onnx`` (exported
with ``--quantize int8``) instead of ``prefix.onnx``; the step, the scoring and the adapter are the same.

``--runtime executorch`` runs the same loop on ExecuTorch's ``train_step.pte`` instead. ExecuTorch's
Python runtime loads libtorch, so that mode is for checking the program against the ONNX step here;
a phone runs the ``.pte`` with ExecuTorch's C++ training module.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

if not __package__:  # run as a script (python export/phone_trainer.py): make the export package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export.bundle_files import committed_files, file_entry, write_json, write_manifest  # noqa: E402
from export.bundle_verify import (  # noqa: E402
    ADAPTER_SUFFIX,
    ADAPTERS_DIR,
    GRAD_PREFIX,
    HIDDEN,
    LOGITS,
    LOSS,
    MANIFEST_FILE,
    MAX_GRAPH_BYTES,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    ON_DEVICE_SECTION,
    ORT_ERRORS,
    REPORT_FILE,
    STEP_INPUTS,
    TOKENIZER_FILE,
    check_adapter_fits,
    check_manifest,
    read_report,
    read_verified,
)
from export.config import ADAPTER_NAME, MAX_LEARNING_RATE  # noqa: E402
from export.errors import BundleError  # noqa: E402
from export.ort_adapters import read_adapter_file, write_adapter_file  # noqa: E402
from export.phone_demo import MAX_INPUT_CHARS, PhoneClassifier, forbidden_modules, tokenizer_failures  # noqa: E402
from fedadapt import jsonsafe  # noqa: E402
from fedadapt.errors import ConfigError, FedAdaptError, JsonInputError  # noqa: E402

MAX_DATA_BYTES = 64 << 20
MAX_EXAMPLES = 10_000
MAX_STATE_BYTES = 2 << 30  # the training examples' prefix states stay in memory: N x T x H float32
MAX_STEPS = 1_000_000
DEFAULT_EPOCHS = 5
DEFAULT_EVAL_FRACTION = 0.2
EVAL_BATCH = 32
RUNTIMES = ("onnxruntime", "executorch")
PREFIX_PRECISIONS = {"fp32": "prefix", "int8": "prefix_int8"}  # --prefix-precision -> the on-device section's key
REFUSED: tuple[type[BaseException], ...] = (FedAdaptError, OSError, ValueError, *ORT_ERRORS)  # main() exits 2


@dataclass(frozen=True)
class LabelledTexts:
    """Texts and their class ids (indices into the user's label names)."""

    texts: tuple[str, ...]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: np.ndarray) -> LabelledTexts:
        return LabelledTexts(tuple(self.texts[i] for i in rows), self.labels[rows])


def read_examples(path: Path, label_names: Sequence[str]) -> LabelledTexts:
    """A CSV file's ``text`` and ``label`` columns, checked; ConfigError naming the row for anything off."""
    if not path.is_file():
        raise ConfigError(f"--data {path} is not a file; pass a CSV with a header row and text,label columns")
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise ConfigError(f"--data {path} has {size:,} bytes; the phone trains on at most {MAX_DATA_BYTES:,}")
    with path.open("rb") as handle:
        raw = handle.read(MAX_DATA_BYTES + 1)  # a file that grew since stat() is still read no further
    if len(raw) > MAX_DATA_BYTES:
        raise ConfigError(f"--data {path} has more than {MAX_DATA_BYTES:,} bytes; the phone trains on less")
    if len(set(label_names)) != len(label_names):
        raise ConfigError("this user's adapter names a label twice, so a label cannot be told apart; export it again")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--data {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids = {name: index for index, name in enumerate(label_names)}
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if reader.fieldnames and len(set(reader.fieldnames)) != len(reader.fieldnames):
        raise ConfigError(f"--data {path}: its header names a column twice: {reader.fieldnames}")
    if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
        raise ConfigError(f"--data {path} needs a header row with 'text' and 'label' columns, got {reader.fieldnames}")
    texts: list[str] = []
    labels: list[int] = []
    try:
        for row in reader:
            number = reader.line_num
            text, label = row.get("text"), row.get("label")
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"--data {path}, line {number}: the text is empty")
            if len(text) > MAX_INPUT_CHARS:
                raise ConfigError(
                    f"--data {path}, line {number}: a text of {len(text)} characters (at most {MAX_INPUT_CHARS})"
                )
            if label not in ids:
                raise ConfigError(
                    f"--data {path}, line {number}: unknown label {str(label)[:100]!r}; this user's labels are "
                    f"{list(label_names)[:20]}{' ...' if len(label_names) > 20 else ''}"
                )
            texts.append(text)
            labels.append(ids[label])
            if len(texts) > MAX_EXAMPLES:
                raise ConfigError(f"--data {path} has more than {MAX_EXAMPLES:,} examples; the phone trains on fewer")
    except csv.Error as err:
        raise ConfigError(f"--data {path}, line {reader.line_num}: not valid CSV ({err})") from None
    if len(texts) < 2:
        raise ConfigError(f"--data {path} has {len(texts)} labelled example(s); personalizing needs at least 2")
    return LabelledTexts(tuple(texts), np.asarray(labels, dtype=np.int64))


def split_examples(count: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and the held-out part (at least one each when eval_fraction > 0)."""
    order = np.random.default_rng(seed).permutation(count)
    held_out = 0 if eval_fraction == 0 else min(count - 1, max(1, round(count * eval_fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def plan_batches(count: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """The rows of each step's batch: a fresh permutation each epoch, cut into batches of at most ``batch_size``."""
    rng = np.random.default_rng(seed + 1)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(count)
        batches += [order[start : start + batch_size] for start in range(0, count, batch_size)]
    return batches[:steps]


@dataclass
class SGD:
    """torch.optim.SGD's update (no dampening, no Nesterov, no weight decay): the same numbers in numpy."""

    learning_rate: float
    momentum: float = 0.0
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, tensors: dict[str, np.ndarray], gradients: Mapping[str, np.ndarray]) -> None:
        for name, gradient in gradients.items():
            if gradient.shape != tensors[name].shape:
                raise BundleError(
                    f"the step's gradient of {name} has shape {gradient.shape}, the tensor {tensors[name].shape}"
                )
            if self.momentum:
                previous = self.buffers.get(name)
                gradient = gradient.copy() if previous is None else self.momentum * previous + gradient
                self.buffers[name] = gradient
            tensors[name] = (tensors[name] - self.learning_rate * gradient).astype(tensors[name].dtype)


StepFunction = Callable[[dict[str, np.ndarray], Mapping[str, np.ndarray]], tuple[float, dict[str, np.ndarray]]]
"""(step inputs, trainable tensors) -> (loss, gradient per trainable tensor)."""


def finite_step(loss: float, gradients: dict[str, np.ndarray], where: Path) -> tuple[float, dict[str, np.ndarray]]:
    """``(loss, gradients)`` of one step of ``where``; BundleError if any of them is NaN or infinite."""
    if not math.isfinite(loss) or not all(np.isfinite(g).all() for g in gradients.values()):
        raise BundleError(f"{where} computed a non-finite loss or gradient; lower the learning rate")
    return loss, gradients


class OrtStep:
    """One forward and backward of ``train_step.onnx`` in ONNX Runtime."""

    def __init__(self, graph: bytes, trainable: Sequence[str], options: ort.SessionOptions, where: Path) -> None:
        try:
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except ORT_ERRORS as err:
            raise BundleError(f"ONNX Runtime cannot load {where}: {err}") from None
        self.trainable = tuple(trainable)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        wanted = [LOSS, LOGITS, *(GRAD_PREFIX + name for name in self.trainable)]
        if sorted(inputs) != sorted([*STEP_INPUTS, *self.trainable]) or sorted(outputs) != sorted(wanted):
            raise BundleError(
                f"{where} does not match its manifest section: inputs {inputs[:6]}..., outputs {outputs[:6]}...; "
                "export the bundle again"
            )
        self.outputs = outputs
        self.where = where

    def __call__(
        self, batch: dict[str, np.ndarray], tensors: Mapping[str, np.ndarray]
    ) -> tuple[float, dict[str, np.ndarray]]:
        try:
            found = dict(zip(self.outputs, self.session.run(self.outputs, {**batch, **tensors}), strict=True))
        except ORT_ERRORS as err:
            raise BundleError(f"ONNX Runtime failed running {self.where}: {str(err)[:300]}") from None
        if np.asarray(found[LOSS]).size != 1:
            raise BundleError(f"{self.where}'s loss is not one number: shape {np.asarray(found[LOSS]).shape}")
        loss = float(np.asarray(found[LOSS]).reshape(()))
        gradients = {name: np.asarray(found[GRAD_PREFIX + name]) for name in self.trainable}
        return finite_step(loss, gradients, self.where)


class ExecuTorchStep:
    """One forward and backward of ``train_step.pte`` in ExecuTorch's training runtime (loads torch)."""

    def __init__(self, program: bytes, renames: Mapping[str, str], where: Path, threads: int = 0) -> None:
        try:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            from executorch.extension.training import _load_for_executorch_for_training_from_buffer
        except ImportError as err:
            raise ConfigError(f"--runtime executorch needs ExecuTorch: pip install -e '.[phone]' ({err})") from None
        import torch

        if threads:  # the process's one pool, which XNNPACK and the optimized kernels share; no step is running yet
            _unsafe_reset_threadpool(threads)

        self.torch = torch
        self.program = program  # ExecuTorch reads from this buffer without holding it: it must outlive the module
        self.module = _load_for_executorch_for_training_from_buffer(self.program)
        self.renames = dict(renames)  # the program's parameter name -> the schema name
        self.parameters: dict[str, Any] | None = None  # ExecuTorch 1.5.1 lists them only after a first step
        self.where = where

    def __call__(
        self, batch: dict[str, np.ndarray], tensors: Mapping[str, np.ndarray]
    ) -> tuple[float, dict[str, np.ndarray]]:
        torch = self.torch
        inputs = [torch.from_numpy(np.ascontiguousarray(batch[name])) for name in STEP_INPUTS]
        if self.parameters is None:
            try:
                self.module.forward_backward("forward", inputs)  # a throw-away step: it makes the parameters known
            except RuntimeError as err:
                raise BundleError(f"ExecuTorch failed running {self.where}: {str(err)[:300]}") from None
            self.parameters = self.module.named_parameters()
            if sorted(self.parameters) != sorted(self.renames):
                raise BundleError(f"{self.where}'s parameters {sorted(self.parameters)[:4]} are not its manifest's")
        for name, schema in self.renames.items():  # the program's own parameter memory: the step reads it
            shape = tuple(self.parameters[name].shape)
            if shape != tensors[schema].shape:
                raise BundleError(
                    f"{self.where}: {name} has shape {shape}, the adapter's {schema} {tensors[schema].shape}"
                )
            self.parameters[name].copy_(torch.from_numpy(np.ascontiguousarray(tensors[schema])))
        try:
            outputs = self.module.forward_backward("forward", inputs)
            gradients = self.module.named_gradients()
        except RuntimeError as err:
            raise BundleError(f"ExecuTorch failed running {self.where}: {str(err)[:300]}") from None
        found = {schema: gradients[name].detach().numpy().copy() for name, schema in self.renames.items()}
        return finite_step(float(outputs[0]), found, self.where)


@dataclass(frozen=True)
class PersonalizeConfig:
    """One personalization run: whose adapter, on which data, for how long."""

    bundle: Path
    user: str
    data: Path
    start_from: str | None = None
    steps: int | None = None
    epochs: int = DEFAULT_EPOCHS
    learning_rate: float | None = None
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    seed: int = 0
    threads: int = 0
    runtime: str = "onnxruntime"
    prefix_precision: str = "fp32"

    def __post_init__(self) -> None:
        if not ADAPTER_NAME.fullmatch(self.user):
            raise ConfigError(f"--user {self.user!r} is not a valid adapter name: letters, digits, '.', '_', '-'")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"--steps must be 1 to {MAX_STEPS:,}, got {self.steps}")
        if not 1 <= self.epochs <= 10_000:
            raise ConfigError(f"--epochs must be 1 to 10,000, got {self.epochs}")
        if self.learning_rate is not None and not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ConfigError(f"--lr must be in (0, {MAX_LEARNING_RATE:g}], got {self.learning_rate}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.threads <= 1024:
            raise ConfigError(f"--threads must be 0 (ONNX Runtime's choice) to 1024, got {self.threads}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.prefix_precision not in PREFIX_PRECISIONS:
            raise ConfigError(
                f"--prefix-precision must be one of {list(PREFIX_PRECISIONS)}, got {self.prefix_precision!r}"
            )


@dataclass
class PersonalizeReport:
    """What a run did: accuracy before and after on the held-out part, the losses, the time each part took."""

    user: str
    start_from: str
    train_examples: int
    eval_examples: int
    steps: int
    learning_rate: float
    seed: int
    runtime: str
    prefix_precision: str
    accuracy_before: float | None
    accuracy_after: float | None
    first_loss: float  # the mean loss of the first epoch's steps (of the first steps, if fewer)
    last_loss: float  # the mean loss of the last epoch's steps
    prefix_seconds: float
    train_seconds: float
    adapter_file: str
    adapter_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class PhoneTrainer:
    """A verified bundle's graphs, ready to train any of its users' personal parts."""

    def __init__(
        self, bundle: Path, threads: int = 0, runtime: str = "onnxruntime", prefix_precision: str = "fp32"
    ) -> None:
        self.classifier = PhoneClassifier(bundle)  # checks the manifest, backbone.onnx, tokenizer and labels
        self.bundle, self.manifest = self.classifier.bundle, self.classifier.manifest
        section = self.manifest.get(ON_DEVICE_SECTION)
        if section is None:
            raise BundleError(
                f"{bundle} was exported without on-device training; export it again with "
                "`fedadapt export --mode swappable --on-device-training`"
            )
        self.section: dict[str, Any] = section
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning drains the battery
        self.options.intra_op_num_threads = threads
        self.prefix_file = self._prefix_file(prefix_precision)
        self.prefix = self._prefix_session(self.prefix_file)
        self.step = self._step_function(runtime)
        self.tokenizer = self._training_tokenizer()

    def _prefix_file(self, precision: str) -> str:
        """The prefix graph ``--prefix-precision`` asks for; ConfigError, naming what the bundle has, if it has none."""
        key = PREFIX_PRECISIONS.get(precision)
        if key is None:
            raise ConfigError(f"--prefix-precision must be one of {list(PREFIX_PRECISIONS)}, got {precision!r}")
        if key not in self.section:
            has = {p: self.section[k] for p, k in PREFIX_PRECISIONS.items() if k in self.section}
            raise ConfigError(
                f"--prefix-precision {precision}: {self.bundle} has no {precision} prefix (its prefixes: {has}); "
                f"export it with --quantize int8 --on-device-training, or use --prefix-precision fp32"
            )
        return str(self.section[key])

    def _prefix_session(self, name: str) -> ort.InferenceSession:
        """The verified prefix graph ``name``, whose inputs and output must be what the manifest section says."""
        path = self.bundle / name
        try:
            session = ort.InferenceSession(
                read_verified(self.bundle, self.manifest, name, MAX_GRAPH_BYTES),
                self.options,
                providers=["CPUExecutionProvider"],
            )
        except ORT_ERRORS as err:
            raise BundleError(f"ONNX Runtime cannot load {path}: {err}") from None
        wanted = sorted(["input_ids", "attention_mask", *self.section["prefix_inputs"]])
        # The user's tensors below the top are overridable initializers, which get_inputs() leaves out.
        found = [i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]]
        if sorted(found) != wanted or [o.name for o in session.get_outputs()] != [HIDDEN]:
            raise BundleError(f"{path} does not match its manifest section; export the bundle again")
        return session

    def _step_function(self, runtime: str) -> StepFunction:
        section = self.section
        if runtime == "executorch":
            program = read_verified(self.bundle, self.manifest, section["program"], MAX_GRAPH_BYTES)
            where = self.bundle / section["program"]
            return ExecuTorchStep(program, section["program_parameters"], where, self.options.intra_op_num_threads)
        graph = read_verified(self.bundle, self.manifest, section["train_step"], MAX_GRAPH_BYTES)
        step = OrtStep(graph, section["trainable"], self.options, self.bundle / section["train_step"])
        self._check_step_shapes(step.session)
        return step

    def _check_step_shapes(self, session: ort.InferenceSession) -> None:
        """BundleError unless the step graph's inputs have the shapes the manifest and the layout give them."""
        batch, length, width = (self.section[k] for k in ("batch_size", "sequence_length", "hidden_size"))
        expected: dict[str, list[int]] = {
            "hidden": [batch, length, width],
            "attention_mask": [batch, length],
            "labels": [batch],
            "weights": [batch],
        }
        expected |= {t["name"]: list(t["shape"]) for t in self.manifest.get("layout", {}).get("tensors", [])}
        for graph_input in session.get_inputs():
            if list(graph_input.shape) != expected.get(graph_input.name):
                raise BundleError(
                    f"{self.bundle / self.section['train_step']}: input {graph_input.name} has shape "
                    f"{graph_input.shape}, the manifest says {expected.get(graph_input.name)}; export the bundle again"
                )

    def _training_tokenizer(self) -> Tokenizer:
        """The bundle's tokenizer, truncating and padding every text to the step graph's fixed length."""
        length = self.section["sequence_length"]
        tokenizer = Tokenizer.from_str(self.classifier.tokenizer.to_str())
        padding = self.classifier.tokenizer.padding or {}
        with tokenizer_failures(self.bundle / TOKENIZER_FILE, "setting the training length"):
            tokenizer.enable_truncation(max_length=length)
            # The bundle's own padding (side, pad id and token) at a fixed length.
            tokenizer.enable_padding(**{**padding, "length": length, "pad_to_multiple_of": None})
        return tokenizer

    def check_memory(self, examples: int) -> None:
        """ConfigError when ``examples`` prefix states (N x T x H float32) would take more than MAX_STATE_BYTES."""
        section = self.section
        needed = examples * section["sequence_length"] * section["hidden_size"] * 4
        if needed > MAX_STATE_BYTES:
            most = MAX_STATE_BYTES // (section["sequence_length"] * section["hidden_size"] * 4)
            raise ConfigError(
                f"{examples:,} examples need {needed / 2**30:.1f} GiB of prefix states on this bundle; "
                f"train on at most {most:,} at a time"
            )

    def start_tensors(self, name: str) -> dict[str, np.ndarray]:
        """Adapter ``name``'s per-user tensors, read after its file's size, sha256 and fit were checked."""
        if name not in self.manifest["adapters"]:
            raise ConfigError(f"no adapter {name!r} in {self.bundle}; it has {self.classifier.adapter_names}")
        return read_adapter_file(self.classifier.verified_adapter(name))

    def prefix_states(self, texts: Sequence[str], tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The prefix (fp32 or int8) once per text, with the user's tensors below the top: states (N, T, H), masks."""
        batch = self.section["batch_size"]
        feeds_below = {name: tensors[name] for name in self.section["prefix_inputs"]}
        states, masks = [], []
        for start in range(0, len(texts), batch):
            with tokenizer_failures(self.bundle / TOKENIZER_FILE, "encoding the training texts"):
                encodings = self.tokenizer.encode_batch(list(texts[start : start + batch]))
            input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
            attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            try:
                (hidden,) = self.prefix.run(
                    [HIDDEN], {"input_ids": input_ids, "attention_mask": attention_mask, **feeds_below}
                )
            except ORT_ERRORS as err:
                raise BundleError(f"ONNX Runtime failed running {self.prefix_file}: {str(err)[:300]}") from None
            hidden = np.asarray(hidden)
            expected = (len(input_ids), self.section["sequence_length"], self.section["hidden_size"])
            if hidden.shape != expected or hidden.dtype != np.float32:
                raise BundleError(
                    f"{self.prefix_file} returned {hidden.dtype} {hidden.shape} states; the manifest says "
                    f"float32 {expected}: export the bundle again"
                )
            states.append(hidden)
            masks.append(attention_mask)
        return np.concatenate(states), np.concatenate(masks)

    def step_batch(
        self, states: np.ndarray, masks: np.ndarray, labels: np.ndarray, rows: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The step graph's inputs for ``rows``: padded to the fixed batch size with zero-weight copies of row 0."""
        size = self.section["batch_size"]
        padded = np.concatenate([rows, np.full(size - len(rows), rows[0], dtype=rows.dtype)])
        weights = np.zeros(size, dtype=np.float32)
        weights[: len(rows)] = 1.0
        return {"hidden": states[padded], "attention_mask": masks[padded], "labels": labels[padded], "weights": weights}

    def train(
        self,
        states: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        tensors: dict[str, np.ndarray],
        batches: Sequence[np.ndarray],
        learning_rate: float,
    ) -> list[float]:
        """SGD on ``tensors`` (updated in place, the trainable ones only) over ``batches``; the loss of each step."""
        optimizer = SGD(learning_rate, float(self.section["optimizer"]["momentum"]))
        trainable = self.section["trainable"]
        losses = []
        for rows in batches:
            loss, gradients = self.step(
                self.step_batch(states, masks, labels, rows), {n: tensors[n] for n in trainable}
            )
            optimizer.step(tensors, gradients)
            losses.append(loss)
        return losses

    def accuracy(self, adapter_path: Path, examples: LabelledTexts) -> float:
        """The share of ``examples`` that ``backbone.onnx`` with the adapter at ``adapter_path`` classifies right."""
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(adapter_path))
        except ORT_ERRORS as err:
            raise BundleError(f"ONNX Runtime cannot load {adapter_path}: {err}") from None
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        right = 0
        for start in range(0, len(examples), EVAL_BATCH):
            feeds = self.classifier.encode(examples.texts[start : start + EVAL_BATCH])
            try:
                (logits,) = self.classifier.session.run(["logits"], feeds, run_options)
            except ORT_ERRORS as err:
                raise BundleError(f"ONNX Runtime failed scoring with {adapter_path}: {str(err)[:300]}") from None
            right += int((np.asarray(logits).argmax(axis=-1) == examples.labels[start : start + EVAL_BATCH]).sum())
        return right / len(examples)


def personalize(config: PersonalizeConfig) -> PersonalizeReport:
    """Train ``config.user``'s personal part on ``config.data`` and write their adapter into the bundle."""
    trainer = PhoneTrainer(config.bundle, config.threads, config.runtime, config.prefix_precision)
    manifest, adapters = trainer.manifest, trainer.manifest["adapters"]
    source = config.user if config.user in adapters else config.start_from
    if source is None:
        raise ConfigError(
            f"{config.user!r} has no adapter in {config.bundle} yet: start it from another user's with --from NAME, "
            f"one of {trainer.classifier.adapter_names}"
        )
    if config.start_from is not None and config.user in adapters and config.start_from != config.user:
        raise ConfigError(
            f"--from {config.start_from!r}: {config.user!r} already has an adapter, which training starts from"
        )
    if source not in adapters:
        raise ConfigError(
            f"--from {source!r}: no such adapter in {config.bundle}; it has {trainer.classifier.adapter_names}"
        )
    label_names = trainer.classifier.labels_of(source)
    # Read (and verified) before training, so that a damaged report costs no training time.
    earlier_report = read_report(trainer.bundle, manifest) if REPORT_FILE in manifest["files"] else None
    tensors = trainer.start_tensors(source)
    examples = read_examples(config.data, label_names)
    trainer.check_memory(len(examples))
    train_rows, eval_rows = split_examples(len(examples), config.eval_fraction, config.seed)
    training, held_out = examples.take(train_rows), examples.take(eval_rows)
    before = trainer.accuracy(trainer.classifier.verified_adapter(source), held_out) if len(held_out) else None
    started = time.perf_counter()
    states, masks = trainer.prefix_states(training.texts, tensors)
    prefix_seconds = time.perf_counter() - started
    batch = trainer.section["batch_size"]
    per_epoch = math.ceil(len(training) / batch)
    steps = config.steps or config.epochs * per_epoch
    learning_rate = config.learning_rate or float(trainer.section["optimizer"]["learning_rate"])
    started = time.perf_counter()
    losses = trainer.train(
        states, masks, training.labels, tensors, plan_batches(len(training), batch, steps, config.seed), learning_rate
    )
    train_seconds = time.perf_counter() - started
    file = f"{ADAPTERS_DIR}/{config.user}{ADAPTER_SUFFIX}"
    with committed_files(trainer.bundle) as temp:  # any error below: the bundle stays as it was
        adapter_path = temp(file)
        write_adapter_file(adapter_path, tensors)
        check_adapter_fits(trainer.classifier.session, adapter_path)  # what the phone checks before serving it
        after = trainer.accuracy(adapter_path, held_out) if len(held_out) else None
        entry = {**adapters[source], "file": file, "labels": list(label_names)}
        description = {key: value for key, value in manifest.items() if key not in ("format", "files")}
        description["adapters"] = {**adapters, config.user: entry}
        files = {**manifest["files"], file: file_entry(adapter_path)}
        report = PersonalizeReport(
            user=config.user,
            start_from=source,
            train_examples=len(training),
            eval_examples=len(held_out),
            steps=steps,
            learning_rate=learning_rate,
            seed=config.seed,
            runtime=config.runtime,
            prefix_precision=config.prefix_precision,
            accuracy_before=before,
            accuracy_after=after,
            first_loss=float(np.mean(losses[:per_epoch])),
            last_loss=float(np.mean(losses[-per_epoch:])),
            prefix_seconds=prefix_seconds,
            train_seconds=train_seconds,
            adapter_file=file,
            adapter_bytes=files[file]["bytes"],
        )
        if earlier_report is not None:  # the exporter's record learns what the phone did to this user
            report_path = temp(REPORT_FILE)
            write_json(report_path, recorded_report(earlier_report, entry["method"], report))
            read_back(report_path, MAX_JSON_BYTES, REPORT_FILE)
            files[REPORT_FILE] = file_entry(report_path)
        manifest_path = temp(MANIFEST_FILE)
        write_manifest(trainer.bundle, description, files=files, path=manifest_path)
        check_written_manifest(manifest_path)  # a manifest too big or wrong would lock the phone out of the bundle
    # leaving the block renames the adapter (and report), then the manifest: that commits
    return report


def recorded_report(earlier: Mapping[str, Any], method: str, run: PersonalizeReport) -> dict[str, Any]:
    """report.json with ``run.user``'s entry saying the phone trained it (no PyTorch parity check: none ran)."""
    report = dict(earlier)
    on_device = {key: value for key, value in run.to_dict().items() if key not in ("user", "adapter_file")}
    entry = {"file": run.adapter_file, "method": method, "trained_on_device": on_device}
    report["adapters"] = {**report.get("adapters", {}), run.user: entry}
    return report


def check_written_manifest(path: Path) -> None:
    """BundleError unless the manifest written to ``path`` reads back within the limits and passes the checks."""
    check_manifest(read_back(path, MAX_MANIFEST_BYTES, MANIFEST_FILE), f"the updated {MANIFEST_FILE}")


def read_back(path: Path, max_bytes: int, name: str) -> Any:
    """The JSON just written to ``path`` for the bundle's ``name``; BundleError if the phone could not read it."""
    try:
        return jsonsafe.load_file(path, max_bytes=max_bytes, max_depth=MAX_JSON_DEPTH)
    except JsonInputError as err:
        raise BundleError(f"the updated {name} would not be readable ({err}); the bundle was left as it was") from None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a user's personal part on the phone, without torch.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("personalize", help="train one user's adapter on their labelled texts")
    run.add_argument("bundle", type=Path, help="a swappable bundle exported with --on-device-training")
    run.add_argument("--user", required=True, help="the adapter to train and (re)write: adapters/USER.onnx_adapter")
    run.add_argument("--data", type=Path, required=True, help="CSV with a header row and text,label columns")
    run.add_argument("--from", dest="start_from", help="a new user starts from this user's adapter")
    run.add_argument("--steps", type=int, help="SGD steps (default: --epochs passes over the training part)")
    run.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    run.add_argument("--lr", type=float, help="learning rate (default: the one the bundle was exported with)")
    run.add_argument(
        "--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION, help="held out to score before/after"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=0, help="threads of ONNX Runtime and ExecuTorch (0: their default)")
    run.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    run.add_argument(
        "--prefix-precision",
        choices=list(PREFIX_PRECISIONS),
        default="fp32",
        help="int8: the prefix states come from prefix.int8.onnx (bundles exported with --quantize int8)",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--check-imports", action="store_true", help=argparse.SUPPRESS)  # tests: modules a phone lacks
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        config = PersonalizeConfig(
            bundle=args.bundle,
            user=args.user,
            data=args.data,
            start_from=args.start_from,
            steps=args.steps,
            epochs=args.epochs,
            learning_rate=args.lr,
            eval_fraction=args.eval_fraction,
            seed=args.seed,
            threads=args.threads,
            runtime=args.runtime,
            prefix_precision=args.prefix_precision,
        )
        report = personalize(config).to_dict()
    except REFUSED as err:  # a bad bundle, data file or request: say so, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check_imports:
        report["forbidden_modules"] = forbidden_modules()
    if args.json:
        print(json.dumps(report))
        return 0
    prefix = "" if report["prefix_precision"] == "fp32" else f", {report['prefix_precision']} prefix"
    counts = f"{report['steps']} steps on {report['train_examples']} examples"
    print(f"{report['user']}: {counts} ({report['runtime']}{prefix})")
    if report["accuracy_before"] is not None:
        print(
            f"held-out accuracy on {report['eval_examples']} examples: {report['accuracy_before']:.3f} -> "
            f"{report['accuracy_after']:.3f}"
        )
    print(
        f"loss {report['first_loss']:.4f} -> {report['last_loss']:.4f}; wrote {config.bundle / report['adapter_file']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
