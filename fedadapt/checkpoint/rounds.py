"""Round checkpoints of the federation: written atomically every round, the latest one resumes a run.

One safetensors file per round, ``checkpoints/round-NNNN.safetensors``: the global shared state
(``global/<tensor>``), the server optimizer's buffers (``optimizer/<buffer>``) and, as JSON in the
header, the round, the sampler's RNG state, the optimizer's scalars and the metrics so far. The
file is written to a temporary sibling and renamed, so a crash leaves the previous round intact.

Integrity and origin (format v3): the header JSON records ``sha256``, a SHA-256 over every
tensor's name, dtype, shape and raw bytes (sorted by name) and the canonical JSON of the rest of
the header, and ``hmac``, an HMAC-SHA256 over the same stream under the server's checkpoint key
(``fedadapt.checkpoint.key``: 32 random bytes, 0600, beside its other keys). The SHA-256 catches
damage: a file whose content no longer matches it (bit rot, a truncated write) is skipped with a
warning and the run resumes from the newest intact one. The HMAC catches substitution: anyone can
write a self-consistent SHA-256, only the key holder a valid HMAC. A file that is intact but not
authenticated (a wrong or missing HMAC, a v1 or v2 file, no key to check it with) is refused
(``CheckpointAuthError``, naming the file) unless the user explicitly accepts unverified files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedadapt import jsonsafe
from fedadapt.aggregate.server_optimizers import OptimizerState
from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.checkpoint.key import KEYS_FOLDER, read_checkpoint_key
from fedadapt.delta.serialize import read_metadata
from fedadapt.delta.state import State, dtype_name
from fedadapt.errors import CheckpointAuthError, StateError

logger = logging.getLogger(__name__)

FORMAT = "fedadapt.checkpoint.v3"
FORMAT_V2 = "fedadapt.checkpoint.v2"  # SHA-256, no HMAC: read only when unverified files are accepted
FORMAT_V1 = "fedadapt.checkpoint.v1"  # no hash at all: the same
_FORMATS = (FORMAT, FORMAT_V2, FORMAT_V1)
_HASH_KEY = "sha256"  # in the header JSON; covers the tensors and every other header key
_MAC_KEY = "hmac"  # in the header JSON (v3); the same stream as the hash, under the checkpoint key
_HASH_DOMAIN = b"fedadapt.checkpoint.v2\0"  # fixed: a later FORMAT must still verify v2 files
_HEADER_DEPTH = 64  # the round records nest a few levels; a checkpoint's header is the server's own JSON
_MAC_DOMAIN = b"fedadapt.checkpoint.v3.hmac\0"
ACCEPT_FLAG = "--accept-unverified-checkpoints"  # the CLI flag that lets unauthenticated files resume a run
FOLDER = "checkpoints"
KEEP = 3  # checkpoints kept; older ones are removed after a newer one is in place
_NAME = re.compile(r"round-(\d{4,})\.safetensors")
_GLOBAL = "global/"
_OPTIMIZER = "optimizer/"
_RUN_SECRET = "run_secret"  # header key, hex; absent outside secagg+


@dataclass(frozen=True)
class Checkpoint:
    """Everything the server needs to continue after ``round``."""

    round: int
    schema_id: str
    global_state: State = field(repr=False)
    optimizer: OptimizerState = field(repr=False)
    rng_state: list[Any] = field(repr=False)  # random.Random.getstate(), JSON-ready
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # one record per completed round
    run_secret: bytes | None = field(default=None, repr=False)  # secagg+: seeds the sample and ring of each round


def checkpoint_path(out_dir: Path, server_round: int) -> Path:
    return Path(out_dir) / FOLDER / f"round-{server_round:04d}.safetensors"


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint, key: bytes, keep: int = KEEP) -> Path:
    """Write ``checkpoint`` atomically, authenticated under ``key``, and prune all but the newest ``keep``."""
    tensors = {_GLOBAL + n: t.detach().cpu().contiguous().clone() for n, t in checkpoint.global_state.items()}
    tensors |= {_OPTIMIZER + n: t.detach().cpu().contiguous().clone() for n, t in checkpoint.optimizer.tensors.items()}
    header = {
        "round": checkpoint.round,
        "schema_id": checkpoint.schema_id,
        "optimizer": checkpoint.optimizer.scalars,
        "rng_state": checkpoint.rng_state,
        "history": checkpoint.history,
    }
    if checkpoint.run_secret is not None:
        header[_RUN_SECRET] = checkpoint.run_secret.hex()
    # Hash what a reader will parse back (tuples become lists, keys become strings, ...), through the reader's own
    # limits: a header it would refuse fails here, before a checkpoint no resume could read is written.
    text = json.dumps(header)
    header = jsonsafe.loads(text, what="the checkpoint header", max_bytes=len(text.encode()), max_depth=_HEADER_DEPTH)
    header[_MAC_KEY] = content_hmac(key, tensors, header)
    header[_HASH_KEY] = content_sha256(tensors, header)  # over the header with its HMAC
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


def load_checkpoint(path: Path, key: bytes | None, accept_unverified: bool = False) -> Checkpoint:
    """Read one checkpoint file.

    StateError if it is not one or its content fails its SHA-256 (damage); CheckpointAuthError if it
    is intact but not authenticated under ``key`` (a wrong or missing HMAC, a v1/v2 file, no key),
    unless ``accept_unverified``, which loads such a file with a warning.
    """
    data = Path(path).read_bytes()
    try:
        metadata = read_metadata(data)
    except StateError as err:
        raise StateError(f"{path}: {err}") from err
    file_format = metadata.get("format")
    if file_format not in _FORMATS:
        raise StateError(f"{path} is not a fedadapt checkpoint (format {file_format!r})")
    try:
        raw = metadata["json"].encode()
        header = jsonsafe.loads(raw, what=f"{path}'s header", max_bytes=len(raw), max_depth=_HEADER_DEPTH)
        if not isinstance(header, dict):
            raise ValueError("its header JSON is not an object")
        tensors = safetensors_load(data)
    except (KeyError, ValueError, SafetensorError) as err:  # JsonInputError is a ValueError
        raise StateError(f"{path} is a damaged checkpoint: {type(err).__name__}: {str(err)[:200]}") from err
    if file_format != FORMAT_V1:
        recorded = header.pop(_HASH_KEY, None)
        if not isinstance(recorded, str):
            raise StateError(f"{path} is a damaged checkpoint: its header records no SHA-256")
        if not hmac.compare_digest(recorded, content_sha256(tensors, header)):
            raise StateError(f"{path}: content does not match its recorded SHA-256: the file is corrupt")
    problem = _authentication_problem(file_format, header, tensors, key)
    if problem is not None:
        if not accept_unverified:
            raise CheckpointAuthError(
                f"{path} {problem}: it may not have been written by this server, so the run does not resume from "
                f"it. Move it away to resume from an earlier checkpoint, or pass {ACCEPT_FLAG} if you trust it"
            )
        logger.warning("checkpoint %s %s; loading it anyway, as %s asks", path, problem, ACCEPT_FLAG)
    try:
        checkpoint = Checkpoint(
            round=int(header["round"]),
            schema_id=str(header["schema_id"]),
            global_state=_with_prefix(tensors, _GLOBAL),
            optimizer=OptimizerState(_with_prefix(tensors, _OPTIMIZER), dict(header["optimizer"])),
            rng_state=list(header["rng_state"]),
            history=list(header["history"]),
            run_secret=_run_secret(header.get(_RUN_SECRET)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{path} is a damaged checkpoint: bad header field {err}") from err
    named = _NAME.fullmatch(Path(path).name)
    if named is not None and int(named.group(1)) != checkpoint.round and not accept_unverified:
        # The HMAC covers the round inside the file, not its name: an older genuine file copied over a
        # newer name would otherwise roll the run back.
        raise CheckpointAuthError(
            f"{path} holds round {checkpoint.round}, not the round its name says: an older checkpoint was "
            f"copied over a newer one. Move it away to resume from an earlier checkpoint, or pass {ACCEPT_FLAG}"
        )
    return checkpoint


def _authentication_problem(
    file_format: str, header: dict[str, Any], tensors: Mapping[str, torch.Tensor], key: bytes | None
) -> str | None:
    """Why the file is not authenticated under ``key`` (``header`` loses its HMAC), or None when it is."""
    recorded = header.pop(_MAC_KEY, None)
    if file_format != FORMAT:
        return f"is {file_format}, which carries no HMAC"
    if key is None:
        return "cannot be authenticated: the server's checkpoint key is missing"
    if not isinstance(recorded, str) or not hmac.compare_digest(recorded, content_hmac(key, tensors, header)):
        return "fails its HMAC under this server's checkpoint key"
    return None


def load_latest_checkpoint(out_dir: Path, key: bytes | None, accept_unverified: bool = False) -> Checkpoint | None:
    """The newest intact checkpoint in ``out_dir``, or None when there is none.

    Damaged files (unreadable, or failing their SHA-256) are skipped, each with a warning naming it,
    the reason and the checkpoint the run resumes from instead. An intact file that is not
    authenticated raises CheckpointAuthError (see ``load_checkpoint``): it is not silently skipped.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            checkpoint = load_checkpoint(path, key, accept_unverified)
        except (OSError, StateError) as err:
            reason = "is corrupt" if isinstance(err, StateError) else "is unreadable"
            skipped.append((path, f"{reason} ({err})"))
            continue
        for bad, why in skipped:
            logger.warning(
                "checkpoint %s %s; resuming from %s (round %d) instead",
                bad.name,
                why,
                path.name,
                checkpoint.round,
            )
        return checkpoint
    for bad, why in skipped:
        logger.warning(
            "checkpoint %s %s; no readable checkpoint is left in %s: starting afresh", bad.name, why, bad.parent
        )
    return None


def load_run_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of the run in ``out_dir``, authenticated with the key in ``<out_dir>/keys``."""
    return load_latest_checkpoint(out_dir, read_checkpoint_key(Path(out_dir) / KEYS_FOLDER))


def content_sha256(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> str:
    """Hex SHA-256 over the tensors (name, dtype, shape, raw bytes; sorted by name) and ``header``.

    ``header`` is everything else the file records (without the hash itself), hashed as canonical
    JSON. Streams through the tensors: no concatenated copy of the state is made.
    """
    digest = hashlib.sha256(_HASH_DOMAIN)
    _feed(digest, tensors, header)
    return digest.hexdigest()


def content_hmac(key: bytes, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> str:
    """Hex HMAC-SHA256 under ``key`` over the same stream as ``content_sha256`` (``header`` without the MAC)."""
    mac = hmac.new(key, _MAC_DOMAIN, hashlib.sha256)
    _feed(mac, tensors, header)
    return mac.hexdigest()


def _feed(digest: Any, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        # Length-prefixed description, so no two different files feed the same byte stream.
        described = json.dumps([name, dtype_name(tensor.dtype), list(tensor.shape), tensor.nbytes]).encode()
        digest.update(len(described).to_bytes(8, "little") + described)
        # A byte view works for every dtype, bfloat16 included (numpy has no bfloat16).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    digest.update(len(canonical).to_bytes(8, "little") + canonical)


def _run_secret(value: Any) -> bytes | None:
    if value is None:
        return None
    secret = bytes.fromhex(value)  # ValueError/TypeError: a damaged header
    if len(secret) != 32:
        raise ValueError(f"{_RUN_SECRET} must be 32 bytes, got {len(secret)}")
    return secret


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
