"""Reading an adapter folder's safetensors weights: the one check every loading path goes through.

The file's size is capped by what the expected tensors take, and its header (names, dtypes, shapes)
is compared with them before a single tensor is read; the tensors read are then checked by
``fedadapt.delta.state.check_state`` (exact names, shapes, dtypes, finite values). So an adapter, a head,
a stacked or a fused adapter is never filled from a file of other shapes (``copy_`` would broadcast
a shape-(1,) tensor into any slot) nor with NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from fedadapt.delta.safetensors_header import DTYPES, check_declared
from fedadapt.delta.state import State, TensorSpec, check_state, dtype_name
from fedadapt.errors import AdapterFolderError, StateError

# safetensors' dtype codes, as torch names them: the one table safetensors_header keeps.
_DTYPES = {code: name for code, (name, _size) in DTYPES.items()}
# Header bytes allowed beyond each tensor's name: its JSON entry (dtype, shape, offsets) and padding,
# plus room for the metadata (schema_id, PEFT's format) once per file.
_HEADER_BYTES_PER_TENSOR = 192
_HEADER_BYTES_PER_FILE = 4096


@dataclass(frozen=True)
class _Stored:
    """A tensor as the file's header declares it (nothing read yet)."""

    shape: tuple[int, ...]
    dtype: str


def specs_of(state: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """Specs (names, shapes, dtypes) of the tensors a model expects, e.g. PEFT's state dict of it.

    Part and role are not checked when reading a file; every spec gets the same ones.
    """
    return tuple(TensorSpec(n, tuple(t.shape), dtype_name(t.dtype), "shared", "adapter") for n, t in state.items())


def is_file_named(path: Path) -> bool:
    """``path.is_file()``, with the errors it raises for a path from a manifest (too long, unreadable) named."""
    try:
        return path.is_file()
    except OSError as err:  # ENAMETOOLONG for a 300-character name, EACCES for a folder one may not enter
        raise AdapterFolderError(
            f"{str(path)[:300]!r} cannot be looked at ({err.strerror or err}); name an adapter folder that exists"
        ) from None


def read_weight_file(path: Path, specs: Iterable[TensorSpec]) -> State:
    """The tensors of the safetensors file ``path``, in ``specs`` order, exactly as ``specs`` describe them.

    AdapterFolderError naming the file (and the tensor) if the file is larger than those tensors need,
    is not safetensors, declares other names, shapes or dtypes, or holds NaN or inf.
    """
    specs = tuple(specs)
    if not is_file_named(path):
        raise AdapterFolderError(f"{path} is missing; save the adapter again")
    allowed = max_file_bytes(specs)
    size = path.stat().st_size
    if size > allowed:
        raise AdapterFolderError(
            f"{path} is {size} bytes, more than the {allowed} that its {len(specs)} expected tensors take"
        )
    try:
        check_declared(_read_header(path), {s.name: s for s in specs}, what=str(path))
        state = load_file(str(path))
        check_state(state, specs, what=str(path))
    except StateError as err:
        raise AdapterFolderError(f"{err}; save the adapter again") from err
    except (SafetensorError, OSError) as err:
        raise AdapterFolderError(
            f"{path} is corrupt or truncated and cannot be loaded (not safetensors: {err}); save the adapter again"
        ) from err
    return {s.name: state[s.name] for s in specs}


def max_file_bytes(specs: Iterable[TensorSpec]) -> int:
    """The largest safetensors file that can hold exactly ``specs``: their bytes plus header room."""
    total = _HEADER_BYTES_PER_FILE
    for spec in specs:
        itemsize = getattr(torch, spec.dtype).itemsize
        total += math.prod(spec.shape) * itemsize + len(spec.name.encode()) + _HEADER_BYTES_PER_TENSOR
    return total


def _read_header(path: Path) -> dict[str, _Stored]:
    with safe_open(str(path), "pt") as handle:
        header = {}
        for name in handle.keys():  # noqa: SIM118 — a safe_open handle is not iterable
            stored = handle.get_slice(name)
            code = stored.get_dtype()
            header[name] = _Stored(tuple(stored.get_shape()), _DTYPES.get(code, code))
    return header
