"""The export folder a phone app ships: graph, tokenizer, labels, manifest and report, written atomically.

Everything is written to a temporary sibling of the output folder and renamed into place
only when the export (parity included) succeeded, so no error leaves a half-written bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from export.errors import ExportError
from fedadapt.errors import ConfigError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
BUNDLE_FORMAT = "fedadapt.export.v1"


def check_out_folder(out: Path, adapter: Path, force: bool) -> None:
    """Refuse an ``out`` that is a file, holds or is the adapter, or is not empty without ``force``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder path for the export")
    resolved, source = out.resolve(), adapter.resolve()
    if resolved == source or resolved in source.parents:
        raise ConfigError(f"--out {out} is or contains the adapter folder {adapter}; export to another folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(
                f"--out {out} exists and is not empty; pass --force to replace it, or pick another folder"
            )
        if not is_export_bundle(out):
            # --force replaces earlier exports only: a typo must not delete someone's home folder.
            raise ConfigError(
                f"--out {out} is not empty and is not an earlier export (no {MANIFEST_FILE} of format "
                f"{BUNDLE_FORMAT}); --force only replaces exports: pick another folder"
            )


def is_export_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest this exporter wrote."""
    try:
        return bool(json.loads((folder / MANIFEST_FILE).read_text()).get("format") == BUNDLE_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, on any error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the bundle unreadable to the app's build tools
    try:
        yield staging
        _replace_dir(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, out: Path, force: bool) -> None:
    """Swap ``staging`` in as ``out``; an old ``out`` is removed only after the swap."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(staging, out)  # a rename over an empty folder is atomic on POSIX
        return
    if not force:  # something appeared in ``out`` while we exported
        raise ConfigError(f"--out {out} was filled by someone else during the export; pass --force to replace it")
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, retired / out.name)
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Pretty, stable JSON (sorted keys, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """tokenizer.json and its config files, as transformers saves them."""
    tokenizer.save_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(
            f"the backbone's tokenizer ({type(tokenizer).__name__}) has no fast tokenizer.json; "
            "phone runtimes need one: use a backbone with a fast tokenizer"
        )


def write_labels(folder: Path, labels: Sequence[str]) -> None:
    """Label names in class-id order: ``labels[argmax(logits)]`` is the prediction."""
    write_json(folder / LABELS_FILE, list(labels))


def file_entries(folder: Path, skip: Sequence[str] = (MANIFEST_FILE,)) -> dict[str, dict[str, Any]]:
    """Size in bytes and sha256 of every file under ``folder`` but ``skip``, by relative path."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in skip:
            entries[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (graphs are tens of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, description: dict[str, Any]) -> dict[str, Any]:
    """manifest.json: ``description`` plus every other file's size and sha256; return it."""
    manifest = {"format": BUNDLE_FORMAT, **description, "files": file_entries(folder)}
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest
