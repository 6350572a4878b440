"""Second adversarial review of issue 17: each test reproduces one finding and fails until it is fixed.

Adapter folders: a LoRA manifest listing tens of thousands of target modules (well under the 8 MiB manifest
cap) makes PEFT's target-module condensing run in quadratic time, in the meta plan and again in the real
build; an IA3 manifest whose feedforward_modules are not among its target_modules raises PEFT's ValueError;
a stack naming a below-folder whose name is longer than the file system allows raises OSError. State blobs:
a header shape whose element count has more than 4300 digits raises ValueError while the error is worded;
an int8 scale that is a JSON integer of 2**64 or more raises OverflowError in the decode.
"""

from __future__ import annotations

import json
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedadapt import AdapterModel, BackboneConfig, load_backbone, make_method_config
from fedadapt.checkpoint.folder import MANIFEST, load_adapter, save_adapter
from fedadapt.delta.safetensors_header import read_header
from fedadapt.delta.serialize import deserialize_state, read_metadata, serialize_state
from fedadapt.delta.state import AdapterSchema, TensorSpec
from fedadapt.errors import FedAdaptError, StateError

# ------------------------------------------------------------------------------------------- tools


class _TookTooLong(BaseException):
    """Raised by the alarm; a BaseException so no ``except Exception`` in PEFT or fedadapt swallows it."""


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def ring(signum: int, frame: Any) -> None:
        raise _TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _folder(tiny_bert: Path, out: Path, method: str, **fields: Any) -> Path:
    loaded = load_backbone(BackboneConfig(name_or_path=str(tiny_bert), num_labels=3))
    return save_adapter(AdapterModel(loaded, make_method_config(method, **fields)), out)


def _set_method(folder: Path, **fields: Any) -> None:
    """Change method settings in the manifest (and schema.method for those it records), rehashing schema_id."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["method"].update(fields)
    manifest["schema"]["method"].update({k: v for k, v in fields.items() if k not in ("below", "adapters")})
    manifest["schema_id"] = AdapterSchema.from_dict(manifest["schema"]).schema_id
    (folder / MANIFEST).write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------ adapter folders


def test_many_lora_target_modules_are_refused_or_cheap(tiny_bert: Path, tmp_path: Path) -> None:
    """30,000 names (about 0.6 MB of manifest) took PEFT's _find_minimal_target_modules minutes (O(n^2))."""
    folder = _folder(tiny_bert, tmp_path / "lora", "lora", size=2)
    _set_method(folder, target_modules=[f"m{i}" for i in range(30_000)] + ["query", "value"])
    assert (folder / MANIFEST).stat().st_size < 8 * 1024 * 1024  # within max_manifest_bytes
    with _deadline(15), suppress(FedAdaptError):
        load_adapter(folder)


def test_ia3_feedforward_modules_outside_target_modules_is_a_named_error(tiny_bert: Path, tmp_path: Path) -> None:
    """peft.IA3Config raised ValueError ("should be a subset of target_modules") outside _wrap's catch."""
    folder = _folder(tiny_bert, tmp_path / "ia3", "ia3")
    _set_method(folder, target_modules=["query"], feedforward_modules=["value"])
    with pytest.raises(FedAdaptError, match="feedforward_modules"):
        load_adapter(folder)


def test_stack_below_folder_with_an_over_long_name_is_a_named_error(tiny_bert: Path, tmp_path: Path) -> None:
    """Path.is_file() raises OSError(ENAMETOOLONG) for a 300-character name; read_manifest let it out."""
    below = _folder(tiny_bert, tmp_path / "pfeiffer", "pfeiffer", size=2)
    stack = _folder(tiny_bert, tmp_path / "stack", "stack", below=(str(below),), size=2)
    _set_method(stack, below=["a" * 300])
    with pytest.raises(FedAdaptError):
        load_adapter(stack)


# ------------------------------------------------------------------------------------------ state blobs


def _blob(header: dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_header_shape_with_a_huge_element_count_is_a_state_error() -> None:
    """300 dims of 10**18 (6 KB of header): the count has 5,400 digits and the error's f-string raised ValueError."""
    blob = _blob({"w": {"dtype": "F32", "shape": [10**18] * 300, "data_offsets": [0, 0]}})
    with pytest.raises(StateError):
        read_header(blob)
    with pytest.raises(StateError):
        read_metadata(blob)  # fedadapt/checkpoint/rounds.py's reader of a checkpoint file
    schema = AdapterSchema(
        method={"name": "x"},
        backbone_fingerprint="f" * 64,
        tensors=(TensorSpec("w", (4,), "float32", "shared", "adapter"),),
    )
    with pytest.raises(StateError):
        deserialize_state(blob, schema, "shared")


def test_int8_scale_integer_beyond_int64_is_a_state_error() -> None:
    """A 20-digit JSON integer scale fits the blob's size slack; ``int8 tensor * scale`` raised OverflowError."""
    schema = AdapterSchema(
        method={"name": "x"},
        backbone_fingerprint="f" * 64,
        tensors=(TensorSpec("w", (4,), "float32", "shared", "adapter"),),
    )
    honest = serialize_state({"w": torch.ones(4)}, schema, "shared", "int8")
    (length,) = struct.unpack_from("<Q", honest)
    metadata = json.loads(honest[8 : 8 + length])["__metadata__"]
    metadata["int8_scales"] = json.dumps({"w": 99_999_999_999_999_999_999})  # 2**64 < this < 10**20
    hostile = safetensors_save(safetensors_load(honest), metadata=metadata)
    assert len(hostile) <= len(honest) + 24  # within max_blob_size's room for a scale's text
    with pytest.raises(StateError):
        deserialize_state(hostile, schema, "shared")
