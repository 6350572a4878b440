"""Round checkpoints of the federation: written atomically every round, the latest one resumes a run.

One safetensors file per round, ``checkpoints/round-NNNN.safetensors``: the global shared state
(``global/<tensor>``), the server optimizer's buffers (``optimizer/<buffer>``) and, as JSON in the
header, the round, the sampler's RNG state, the optimizer's scalars and the metrics so far. The
file is written to a temporary sibling and renamed, so a crash leaves the previous round intact.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedadapt.aggregate import OptimizerState
from fedadapt.errors import StateError
from fedadapt.folder import write_bytes_atomic
from fedadapt.serialize import read_metadata
from fedadapt.state import State

logger = logging.getLogger(__name__)

FORMAT = "fedadapt.checkpoint.v1"
FOLDER = "checkpoints"
KEEP = 3  # checkpoints kept; older ones are removed after a newer one is in place
_NAME = re.compile(r"round-(\d{4,})\.safetensors")
_GLOBAL = "global/"
_OPTIMIZER = "optimizer/"


@dataclass(frozen=True)
class Checkpoint:
    """Everything the server needs to continue after ``round``."""

    round: int
    schema_id: str
    global_state: State = field(repr=False)
    optimizer: OptimizerState = field(repr=False)
    rng_state: list[Any] = field(repr=False)  # random.Random.getstate(), JSON-ready
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # one record per completed round


def checkpoint_path(out_dir: Path, server_round: int) -> Path:
    return Path(out_dir) / FOLDER / f"round-{server_round:04d}.safetensors"


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint, keep: int = KEEP) -> Path:
    """Write ``checkpoint`` atomically and prune all but the newest ``keep``."""
    tensors = {_GLOBAL + n: t.detach().cpu().contiguous().clone() for n, t in checkpoint.global_state.items()}
    tensors |= {_OPTIMIZER + n: t.detach().cpu().contiguous().clone() for n, t in checkpoint.optimizer.tensors.items()}
    header = {
        "round": checkpoint.round,
        "schema_id": checkpoint.schema_id,
        "optimizer": checkpoint.optimizer.scalars,
        "rng_state": checkpoint.rng_state,
        "history": checkpoint.history,
    }
    path = checkpoint_path(out_dir, checkpoint.round)
    write_bytes_atomic(path, safetensors_save(tensors, metadata={"format": FORMAT, "json": json.dumps(header)}))
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint files in ``out_dir``, oldest round first."""
    folder = Path(out_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint file; StateError if it is not one."""
    data = Path(path).read_bytes()
    metadata = read_metadata(data)
    if metadata.get("format") != FORMAT:
        raise StateError(f"{path} is not a fedadapt checkpoint (format {metadata.get('format')!r})")
    try:
        header = json.loads(metadata["json"])
        tensors = safetensors_load(data)
    except (KeyError, ValueError, SafetensorError) as err:
        raise StateError(f"{path} is a damaged checkpoint: {err}") from err
    return Checkpoint(
        round=int(header["round"]),
        schema_id=str(header["schema_id"]),
        global_state=_with_prefix(tensors, _GLOBAL),
        optimizer=OptimizerState(_with_prefix(tensors, _OPTIMIZER), dict(header["optimizer"])),
        rng_state=list(header["rng_state"]),
        history=list(header["history"]),
    )


def load_latest_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint in ``out_dir``, or None when there is none."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return load_checkpoint(path)
        except (OSError, StateError) as err:
            logger.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> State:
    # Insertion order of safetensors loads is sorted by name; callers order by their schema.
    return {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}


def rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    """random.Random.getstate() as JSON-ready lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(data: list[Any]) -> tuple[Any, ...]:
    """Inverse of ``rng_state_to_json`` for random.Random.setstate()."""
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
