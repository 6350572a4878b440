"""Substituted checkpoints: only files authenticated under the server's checkpoint key resume a run."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save
from test_checkpoint_integrity import _checkpoint, _file_parts, _join, _rewrite_header_json, _split, _write_file

from fedadapt.checkpoint.key import (
    KEY_BYTES,
    checkpoint_key_path,
    create_checkpoint_key,
    load_or_create_checkpoint_key,
    read_checkpoint_key,
)
from fedadapt.checkpoint.rounds import (
    Checkpoint,
    checkpoint_path,
    content_hmac,
    content_sha256,
    load_latest_checkpoint,
    load_run_checkpoint,
    save_checkpoint,
)
from fedadapt.errors import CheckpointAuthError, ConfigError

KEY = bytes(range(32))


def _forge(out_dir: Path, checkpoint: Checkpoint, file_format: str, key: bytes | None = None) -> Path:
    """What an attacker who can write the checkpoint folder but lacks the key writes: a self-consistent file."""
    tensors, header = _file_parts(checkpoint)
    header = json.loads(json.dumps(header))
    if key is not None:
        header["hmac"] = content_hmac(key, tensors, header)
    header["sha256"] = content_sha256(tensors, header)
    return _write_file(out_dir, checkpoint.round, tensors, header, file_format)


def _poisoned(server_round: int) -> Checkpoint:
    """A global state of the attacker's choosing, claiming a later round than the genuine files."""
    genuine = _checkpoint(server_round)
    state = {n: torch.full_like(t, 1000.0) for n, t in genuine.global_state.items()}
    return Checkpoint(server_round, genuine.schema_id, state, genuine.optimizer, genuine.rng_state, genuine.history)


@pytest.mark.parametrize(
    ("file_format", "forger_key", "problem"),
    [
        ("fedadapt.checkpoint.v2", None, "is fedadapt.checkpoint.v2, which carries no HMAC"),
        ("fedadapt.checkpoint.v1", None, "is fedadapt.checkpoint.v1, which carries no HMAC"),
        ("fedadapt.checkpoint.v3", None, "fails its HMAC under this server's checkpoint key"),
        ("fedadapt.checkpoint.v3", b"\x01" * 32, "fails its HMAC under this server's checkpoint key"),
    ],
    ids=["v2-sha-only", "v1-no-hash", "v3-no-mac", "v3-other-key"],
)
def test_a_substituted_later_checkpoint_is_refused_naming_the_file(
    tmp_path: Path, file_format: str, forger_key: bytes | None, problem: str
) -> None:
    for server_round in (1, 2):
        save_checkpoint(tmp_path, _checkpoint(server_round), KEY, keep=5)
    forged = _forge(tmp_path, _poisoned(5), file_format, forger_key)
    with pytest.raises(CheckpointAuthError) as caught:
        load_latest_checkpoint(tmp_path, KEY)
    message = str(caught.value)
    assert message.startswith(f"{forged} {problem}")
    assert "--accept-unverified-checkpoints" in message and "Move it away" in message
    # Moved away, the genuine newest resumes the run.
    forged.unlink()
    resumed = load_latest_checkpoint(tmp_path, KEY)
    assert resumed is not None and resumed.round == 2


def test_an_edited_genuine_file_with_a_recomputed_sha256_fails_its_hmac(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _checkpoint(3), KEY)

    def edit(header: dict[str, object]) -> None:
        header["round"] = 9
        header.pop("sha256")

    _rewrite_header_json(path, edit)
    # Recompute the SHA-256 the way an attacker can: the file is then intact, but not ours.
    from safetensors.torch import load as safetensors_load

    outer, body = _split(path.read_bytes())
    inner = json.loads(outer["__metadata__"]["json"])
    inner["sha256"] = content_sha256(safetensors_load(path.read_bytes()), inner)
    outer["__metadata__"]["json"] = json.dumps(inner)
    path.write_bytes(_join(outer, body))
    with pytest.raises(CheckpointAuthError, match="fails its HMAC"):
        load_latest_checkpoint(tmp_path, KEY)


def test_no_key_means_no_resume_unless_accepted(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(2), KEY)
    with pytest.raises(CheckpointAuthError, match="checkpoint key is missing"):
        load_latest_checkpoint(tmp_path, None)
    accepted = load_latest_checkpoint(tmp_path, None, accept_unverified=True)
    assert accepted is not None and accepted.round == 2


def test_the_genuine_file_resumes_with_the_run_key(tmp_path: Path) -> None:
    key = load_or_create_checkpoint_key(tmp_path / "keys")
    save_checkpoint(tmp_path, _checkpoint(4), key)
    loaded = load_run_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 4
    assert torch.equal(loaded.global_state["head.bias"], _checkpoint(4).global_state["head.bias"])


def test_the_key_file_is_private_random_and_never_overwritten(tmp_path: Path) -> None:
    key = create_checkpoint_key(tmp_path)
    path = checkpoint_key_path(tmp_path)
    assert len(key) == KEY_BYTES and key != bytes(KEY_BYTES)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_checkpoint_key(tmp_path) == key == load_or_create_checkpoint_key(tmp_path)
    with pytest.raises(ConfigError, match="never overwritten"):
        create_checkpoint_key(tmp_path)
    assert read_checkpoint_key(tmp_path) == key
    assert create_checkpoint_key(tmp_path / "other") != key


def test_a_key_file_others_can_read_or_a_link_is_refused(tmp_path: Path) -> None:
    create_checkpoint_key(tmp_path / "a")
    os.chmod(checkpoint_key_path(tmp_path / "a"), 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_checkpoint_key(tmp_path / "a")
    (tmp_path / "b").mkdir()
    checkpoint_key_path(tmp_path / "b").symlink_to(checkpoint_key_path(tmp_path / "a"))
    with pytest.raises(ConfigError, match="regular file"):
        read_checkpoint_key(tmp_path / "b")
    (tmp_path / "c").mkdir()
    checkpoint_key_path(tmp_path / "c").write_text("not hex\n")
    os.chmod(checkpoint_key_path(tmp_path / "c"), 0o600)
    with pytest.raises(ConfigError, match="is not a checkpoint key"):
        read_checkpoint_key(tmp_path / "c")


def test_a_deeply_nested_header_is_a_damaged_file_not_a_crash(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(1), KEY, keep=5)
    path = checkpoint_path(tmp_path, 2)
    nested = "[" * 100_000 + "]" * 100_000
    path.write_bytes(
        safetensors_save({"x": torch.zeros(1)}, metadata={"format": "fedadapt.checkpoint.v3", "json": nested})
    )
    loaded = load_latest_checkpoint(tmp_path, KEY)  # the nested file is skipped as damaged
    assert loaded is not None and loaded.round == 1


def test_an_older_genuine_file_copied_over_a_newer_name_is_refused(tmp_path: Path) -> None:
    """The HMAC covers the round inside the file; the name must agree, or an old file rolls the run back."""
    for server_round in (1, 2, 3):
        save_checkpoint(tmp_path, _checkpoint(server_round), KEY, keep=5)
    replayed = checkpoint_path(tmp_path, 5)
    replayed.write_bytes(checkpoint_path(tmp_path, 1).read_bytes())
    with pytest.raises(CheckpointAuthError, match=f"{replayed} holds round 1, not the round its name says"):
        load_latest_checkpoint(tmp_path, KEY)
    replayed.unlink()
    resumed = load_latest_checkpoint(tmp_path, KEY)
    assert resumed is not None and resumed.round == 3
