"""Files of a bundle, torch-free: their manifest records (size, sha256), and updates committed atomically.

The exporter (export/bundle.py) and the phone's trainer (export/phone_trainer.py, which imports no
torch or transformers) both write bundles through these.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from export.bundle_verify import BUNDLE_FORMAT, MANIFEST_FILE, write_target


@contextlib.contextmanager
def committed_files(folder: Path) -> Iterator[Callable[[str], Path]]:
    """Yield ``temp(name)``: a temporary path beside ``folder / name`` to write that file's new content to.

    On success each temporary file is renamed over its final path in the order ``temp`` was
    called (so call it for manifest.json last: its rename commits the update). On any error,
    before or during the renames, the temporary files are removed, the files already renamed
    are put back from hard-linked copies of what they replaced (or removed, if they were new),
    and ``folder`` is as it was. A crash of the process between two renames is not covered: an
    adapter renamed before its manifest then fails its sha256 check, which the phone reports.
    A ``name`` whose folders or file are symlinks, or that leads outside ``folder``, is refused
    (BundleError), at ``temp`` and again just before the rename.
    """
    pending: dict[str, Path] = {}
    replaced: list[tuple[Path, Path | None]] = []  # (final path, the old file's hard link, None if it was new)

    def temp(name: str) -> Path:
        final = write_target(folder, name)
        handle, path = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(handle)
        pending[name] = Path(path)
        return Path(path)

    try:
        yield temp
        for name, path in pending.items():
            final = write_target(folder, name)  # again: a symlink swapped in since ``temp`` is refused too
            path.chmod(0o644)  # mkstemp's 0600 would hide the file from the app's build tools
            old = _keep_old(final)
            try:
                os.replace(path, final)
            except BaseException:
                if old is not None:
                    old.unlink(missing_ok=True)
                raise
            replaced.append((final, old))
    except BaseException:
        for path in pending.values():
            path.unlink(missing_ok=True)
        for final, old in reversed(replaced):  # each on its own: one that fails must not keep the rest back
            with contextlib.suppress(OSError):
                if old is None:
                    final.unlink(missing_ok=True)
                else:
                    os.replace(old, final)
        raise
    finally:
        for _, old in replaced:
            if old is not None:
                old.unlink(missing_ok=True)


def _keep_old(final: Path) -> Path | None:
    """A hard link to the file at ``final`` (its bytes, kept when ``final`` is replaced); None if there is none."""
    if not final.exists():
        return None
    handle, path = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent)
    os.close(handle)
    os.unlink(path)
    os.link(final, path)
    return Path(path)


def write_json(path: Path, data: Any) -> None:
    """Pretty, stable JSON (sorted keys, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_entries(folder: Path, skip: Sequence[str] = (MANIFEST_FILE,)) -> dict[str, dict[str, Any]]:
    """Size in bytes and sha256 of every file under ``folder`` but ``skip``, by relative path."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in skip:
            entries[name] = file_entry(path)
    return entries


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest's record of one file: its size in bytes and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (graphs are tens of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(
    folder: Path, description: dict[str, Any], files: dict[str, dict[str, Any]] | None = None, path: Path | None = None
) -> dict[str, Any]:
    """manifest.json (or ``path``): ``description`` plus each file's size and sha256 (default: every other file)."""
    manifest = {"format": BUNDLE_FORMAT, **description, "files": file_entries(folder) if files is None else files}
    write_json(path or folder / MANIFEST_FILE, manifest)
    return manifest
