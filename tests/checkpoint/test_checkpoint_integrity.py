"""Checkpoint integrity and origin: a SHA-256 catches corrupt files that still parse, an HMAC substituted ones."""

from __future__ import annotations

import json
import logging
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save

from fedadapt.aggregate.server_optimizers import OptimizerState
from fedadapt.checkpoint.rounds import (
    FORMAT,
    Checkpoint,
    checkpoint_path,
    content_sha256,
    load_checkpoint,
    load_latest_checkpoint,
    rng_state_to_json,
    save_checkpoint,
)
from fedadapt.errors import CheckpointAuthError, StateError

LOGGER = "fedadapt.checkpoint.rounds"
KEY = bytes(range(32))  # the server's checkpoint key in these tests


def _checkpoint(server_round: int, dtype: torch.dtype = torch.float32) -> Checkpoint:
    generator = torch.Generator().manual_seed(server_round)
    global_state = {
        "layer.0.lora_A": torch.randn(3, 4, generator=generator).to(dtype),
        "layer.0.lora_B": torch.randn(4, 3, generator=generator).to(dtype),
        "head.bias": torch.randn(5, generator=generator).to(dtype),
    }
    optimizer = OptimizerState(
        {f"m/{n}": torch.randn(t.shape, generator=generator) for n, t in global_state.items()},
        {"step": server_round, "beta1": 0.9},
    )
    return Checkpoint(
        round=server_round,
        schema_id="schema-abc",
        global_state=global_state,
        optimizer=optimizer,
        rng_state=rng_state_to_json(random.Random(server_round).getstate()),
        history=[{"round": r, "loss": 1.0 / r, "clients": [1, 2]} for r in range(1, server_round + 1)],
    )


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The safetensors header (parsed) and the data region."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    """A well-formed safetensors file from a header and a data region (header padded to 8 bytes)."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + body


def _flip_tensor_byte(path: Path, name: str = "global/layer.0.lora_A", index: int = 1) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    start, end = _split(data)[0][name]["data_offsets"]
    assert 0 <= index < end - start
    position = 8 + length + start + index
    corrupt = bytearray(data)
    corrupt[position] ^= 0x10
    path.write_bytes(bytes(corrupt))


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert (a.round, a.schema_id, a.rng_state, a.history) == (b.round, b.schema_id, b.rng_state, b.history)
    assert a.optimizer.scalars == b.optimizer.scalars
    for mine, theirs in ((a.global_state, b.global_state), (a.optimizer.tensors, b.optimizer.tensors)):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert mine[name].dtype == theirs[name].dtype
            assert torch.equal(mine[name], theirs[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_keeps_everything_and_verifies(tmp_path: Path, dtype: torch.dtype) -> None:
    original = _checkpoint(3, dtype)
    path = save_checkpoint(tmp_path, original, KEY)
    header, _ = _split(path.read_bytes())
    assert header["__metadata__"]["format"] == FORMAT == "fedadapt.checkpoint.v3"
    recorded = json.loads(header["__metadata__"]["json"])["sha256"]
    assert isinstance(recorded, str) and len(recorded) == 64
    _assert_same(load_checkpoint(path, KEY), original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flipped_tensor_byte_is_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    path = save_checkpoint(tmp_path, _checkpoint(2, dtype), KEY)
    _flip_tensor_byte(path)
    with pytest.raises(StateError, match="SHA-256") as caught:
        load_checkpoint(path, KEY)
    message = str(caught.value)
    assert message == f"{path}: content does not match its recorded SHA-256: the file is corrupt"


def test_flipped_optimizer_byte_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _checkpoint(2), KEY)
    _flip_tensor_byte(path, "optimizer/m/head.bias", index=7)
    with pytest.raises(StateError, match="SHA-256"):
        load_checkpoint(path, KEY)


def _rewrite_header_json(path: Path, change: Any) -> None:
    """Edit the checkpoint's header JSON (keeping its recorded hash) and write a file that still parses."""
    header, body = _split(path.read_bytes())
    content = json.loads(header["__metadata__"]["json"])
    change(content)
    header["__metadata__"]["json"] = json.dumps(content)
    path.write_bytes(_join(header, body))


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h["history"][0].update(loss=0.25),
        lambda h: h["history"].pop(),
        lambda h: h.update(round=7),
        lambda h: h.update(schema_id="other"),
        lambda h: h["optimizer"].update(step=99),
        lambda h: h["rng_state"][1].__setitem__(0, 12345),
        lambda h: h.update(extra="added"),
    ],
    ids=["history-entry", "history-length", "round", "schema", "optimizer-scalar", "rng-state", "extra-key"],
)
def test_changed_header_is_refused(tmp_path: Path, change: Any) -> None:
    path = save_checkpoint(tmp_path, _checkpoint(3), KEY)
    _rewrite_header_json(path, change)
    with pytest.raises(StateError, match="content does not match its recorded SHA-256: the file is corrupt"):
        load_checkpoint(path, KEY)


def test_rebuilt_file_without_changes_still_verifies(tmp_path: Path) -> None:
    """The rewrite helper itself keeps a valid file valid: the refusals above come from the edits."""
    original = _checkpoint(3)
    path = save_checkpoint(tmp_path, original, KEY)
    _rewrite_header_json(path, lambda h: None)
    _assert_same(load_checkpoint(path, KEY), original)


def test_v2_file_without_a_hash_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _checkpoint(1), KEY)
    _rewrite_header_json(path, lambda h: h.pop("sha256"))
    with pytest.raises(StateError, match="records no SHA-256"):
        load_checkpoint(path, KEY)


def test_hash_covers_dtype_shape_and_name() -> None:
    header = {"round": 1}
    base = {"a": torch.arange(6, dtype=torch.int32)}
    digest = content_sha256(base, header)
    assert content_sha256({"a": base["a"].reshape(2, 3)}, header) != digest
    assert content_sha256({"a": base["a"].view(torch.float32)}, header) != digest
    assert content_sha256({"b": base["a"]}, header) != digest
    assert content_sha256(base, {"round": 2}) != digest
    assert content_sha256({"a": base["a"].clone()}, dict(header)) == digest
    # bfloat16 (no numpy dtype) and non-contiguous tensors hash by their values
    bf16 = torch.randn(4, 3).to(torch.bfloat16)
    assert content_sha256({"x": bf16.t()}, header) == content_sha256({"x": bf16.t().contiguous()}, header)


def test_latest_skips_a_corrupt_newest_and_says_which(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for server_round in (1, 2, 3):
        save_checkpoint(tmp_path, _checkpoint(server_round), KEY, keep=5)
    _flip_tensor_byte(checkpoint_path(tmp_path, 3))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = load_latest_checkpoint(tmp_path, KEY)
    assert loaded is not None and loaded.round == 2
    _assert_same(loaded, _checkpoint(2))
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "round-0003.safetensors is corrupt" in message
    assert "SHA-256" in message
    assert "resuming from round-0002.safetensors" in message


def test_latest_with_everything_corrupt_is_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for server_round in (1, 2, 3):
        _flip_tensor_byte(save_checkpoint(tmp_path, _checkpoint(server_round), KEY, keep=5))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_latest_checkpoint(tmp_path, KEY) is None
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    for server_round in (1, 2, 3):
        assert any(f"round-{server_round:04d}.safetensors is corrupt" in m for m in messages)
    assert all("resuming" not in m for m in messages)


def test_latest_with_no_checkpoints_is_none(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path, KEY) is None


def _file_parts(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON header of ``checkpoint``'s file, laid out here as save_checkpoint does, without a hash."""
    tensors = {"global/" + n: t.contiguous() for n, t in checkpoint.global_state.items()}
    tensors |= {"optimizer/" + n: t.contiguous() for n, t in checkpoint.optimizer.tensors.items()}
    header = {
        "round": checkpoint.round,
        "schema_id": checkpoint.schema_id,
        "optimizer": checkpoint.optimizer.scalars,
        "rng_state": checkpoint.rng_state,
        "history": checkpoint.history,
    }
    return tensors, header


def _write_file(
    out_dir: Path, server_round: int, tensors: dict[str, torch.Tensor], header: dict[str, Any], file_format: str
) -> Path:
    """Write a checkpoint file of ``file_format`` for ``server_round`` as given, bypassing save_checkpoint."""
    path = checkpoint_path(out_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_save(tensors, metadata={"format": file_format, "json": json.dumps(header)}))
    return path


def _save_v1(out_dir: Path, checkpoint: Checkpoint) -> Path:
    """A checkpoint as format v1 wrote it: same layout, no hash."""
    tensors, header = _file_parts(checkpoint)
    return _write_file(out_dir, checkpoint.round, tensors, header, "fedadapt.checkpoint.v1")


def test_v1_file_is_refused_unless_unverified_files_are_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = _checkpoint(2, torch.bfloat16)
    path = _save_v1(tmp_path, original)
    with pytest.raises(CheckpointAuthError, match=f"{path} is fedadapt.checkpoint.v1, which carries no HMAC"):
        load_checkpoint(path, KEY)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = load_checkpoint(path, KEY, accept_unverified=True)
    _assert_same(loaded, original)
    assert any("--accept-unverified-checkpoints" in r.getMessage() for r in caplog.records)


def test_latest_falls_back_from_corrupt_v3_to_v1_only_if_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_v1(tmp_path, _checkpoint(1))
    _flip_tensor_byte(save_checkpoint(tmp_path, _checkpoint(2), KEY, keep=5))
    with pytest.raises(CheckpointAuthError, match="round-0001.safetensors is fedadapt.checkpoint.v1"):
        load_latest_checkpoint(tmp_path, KEY)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = load_latest_checkpoint(tmp_path, KEY, accept_unverified=True)
    assert loaded is not None and loaded.round == 1
    assert any("resuming from round-0001.safetensors" in r.getMessage() for r in caplog.records)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _checkpoint(1), KEY)
    header, body = _split(path.read_bytes())
    header["__metadata__"]["format"] = "fedadapt.checkpoint.v0"
    path.write_bytes(_join(header, body))
    with pytest.raises(StateError, match="not a fedadapt checkpoint"):
        load_checkpoint(path, KEY)


def test_truncated_file_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, _checkpoint(1), KEY, keep=5)
    newest = save_checkpoint(tmp_path, _checkpoint(2), KEY, keep=5)
    newest.write_bytes(newest.read_bytes()[:-5])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = load_latest_checkpoint(tmp_path, KEY)
    assert loaded is not None and loaded.round == 1
    assert any(
        "round-0002.safetensors" in r.getMessage() and "resuming from round-0001.safetensors" in r.getMessage()
        for r in caplog.records
    )
