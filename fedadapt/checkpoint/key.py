"""The server's checkpoint key: 32 random bytes that authenticate its round checkpoints (HMAC-SHA256).

Kept as hex in ``<out>/keys/checkpoint.key`` beside the server's other keys, created 0600 and never
overwritten. Only the server reads it; nothing derived from it is logged.
"""

from __future__ import annotations

import secrets
import stat
from pathlib import Path

from fedadapt.errors import ConfigError

KEYS_FOLDER = "keys"  # <out>/keys: the server's private keys (envelope key pair, checkpoint key)
KEY_NAME = "checkpoint.key"
KEY_BYTES = 32


def checkpoint_key_path(keys_dir: Path) -> Path:
    return Path(keys_dir) / KEY_NAME


def create_checkpoint_key(keys_dir: Path) -> bytes:
    """A new key in ``keys_dir`` (0600); ConfigError if one exists, since a new key would orphan the old files."""
    path = checkpoint_key_path(keys_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    # cryptography comes with privacy.keys: loaded when a key is made, not by every reader of KEYS_FOLDER
    from fedadapt.privacy.keys import _write_new

    _write_new(path, (key.hex() + "\n").encode(), 0o600)  # O_EXCL, fsynced, removed if the write fails
    return key


def read_checkpoint_key(keys_dir: Path) -> bytes | None:
    """The key in ``keys_dir``, or None when there is none; ConfigError when the file is not a private key file."""
    path = checkpoint_key_path(keys_dir)
    if not path.exists() and not path.is_symlink():
        return None
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path} must be a regular file (not a link or a folder)")
    if info.st_mode & 0o077:
        raise ConfigError(f"{path} can be read by other users: run `chmod 600 {path}`")
    text = path.read_text(errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path} is not a checkpoint key ({KEY_BYTES} bytes as hex)")
    return key


def load_or_create_checkpoint_key(keys_dir: Path) -> bytes:
    """The key in ``keys_dir``, made on first use."""
    return read_checkpoint_key(keys_dir) or create_checkpoint_key(keys_dir)
