"""ONNX Runtime's swappable adapters: writing ``.onnx_adapter`` files and running a graph with one active.

An ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``, ONNX Runtime >= 1.20) holds named
tensors; at run time ``RunOptions.add_active_adapter`` feeds them to the graph inputs of the
same names. ONNX Runtime's API calls them LoRA adapters, but any tensors work: fedadapt puts
every per-user tensor (adapter and head) of any single-adapter method in them. Torch-free: the
phone's trainer (export/phone_trainer.py) writes its users' files with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from export.bundle_verify import check_adapter_fits

if TYPE_CHECKING:  # the phone's trainer writes adapter files with this module and has no torch (export.parity has)
    from export.parity import Feeds, RunGraph

TOKEN_INPUTS = ("input_ids", "attention_mask")
ADAPTER_VERSION = 1  # fedadapt's layout of the file: one tensor per per-user graph input
MODEL_VERSION = 1  # the manifest, not this number, binds an adapter to its graph


def write_adapter_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` (name → array) to ``path`` in ONNX Runtime's adapter format."""
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(ADAPTER_VERSION)
    adapter.set_model_version(MODEL_VERSION)
    # OrtValues only borrow the arrays' memory: keep contiguous copies alive until written.
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})
    adapter.export_adapter(str(path))


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an ``.onnx_adapter`` file, copied into numpy arrays."""
    parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return {name: np.array(value.numpy()) for name, value in parameters.items()}


def session_options() -> ort.SessionOptions:
    """Quiet CPU session options that do not spin (spinning threads starve torch on shared cores)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # one "initializer appears in graph inputs" warning per per-user tensor
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class AdapterRunner:
    """Runs ``graph_path`` in ONNX Runtime (CPU) with exactly the adapter at ``adapter_path`` active."""

    def __init__(self, graph_path: Path, adapter_path: Path) -> None:
        self.session = ort.InferenceSession(str(graph_path), session_options(), providers=["CPUExecutionProvider"])
        check_adapter_fits(self.session, adapter_path)  # the phone runs the same check (export/bundle_verify.py)
        self.adapter = ort.LoraAdapter()  # kept here: the run options must not outlive it
        self.adapter.Load(str(adapter_path))
        self.run_options = ort.RunOptions()
        self.run_options.add_active_adapter(self.adapter)  # one adapter per RunOptions: two would both apply

    def __call__(self, feeds: Feeds) -> np.ndarray:
        """Logits (B, num_labels) for the token inputs of ``feeds``."""
        outputs = self.session.run(["logits"], {name: feeds[name] for name in TOKEN_INPUTS}, self.run_options)
        return np.asarray(outputs[0])


def adapter_runner(graph_path: Path, adapter_path: Path) -> RunGraph:
    """A parity runner: ``graph_path`` with the adapter at ``adapter_path`` active."""
    return AdapterRunner(graph_path, adapter_path)
