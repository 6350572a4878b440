"""The export folder a phone app ships: graph, tokenizer, labels, manifest and report, written atomically.

Everything is written to a temporary sibling of the output folder and renamed into place
only when the export (parity included) succeeded, so no error leaves a half-written bundle.
Adding a user to a swappable bundle writes each changed file to a temporary file beside it
and renames them into place afterwards, manifest.json last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from export.bundle_files import committed_files as committed_files  # re-exported: the writers name them here
from export.bundle_files import file_entries as file_entries
from export.bundle_files import file_entry as file_entry
from export.bundle_files import write_json as write_json
from export.bundle_files import write_manifest as write_manifest
from export.bundle_verify import (
    BUNDLE_FORMAT,
    LABELS_FILE,
    MANIFEST_FILE,
    load_manifest,
    read_manifest,
)
from export.bundle_verify import MODEL_FILE as MODEL_FILE  # re-exported: the exporter names the files from here
from export.bundle_verify import REPORT_FILE as REPORT_FILE
from export.errors import BundleError, ExportError
from fedadapt.errors import ConfigError


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
    """Whether ``folder`` holds a manifest this exporter wrote (read with size and depth limits)."""
    return _format_and_mode(folder)[0] == BUNDLE_FORMAT


def _format_and_mode(folder: Path) -> tuple[Any, Any]:
    """The manifest's format and mode, or (None, None) when ``folder`` has no readable manifest."""
    try:
        manifest = load_manifest(folder)
    except BundleError:
        return None, None
    return (manifest.get("format"), manifest.get("mode")) if isinstance(manifest, dict) else (None, None)


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


def read_bundle_manifest(folder: Path) -> dict[str, Any]:
    """The checked manifest of an export bundle (export/bundle_verify.py); BundleError if it is missing or bad."""
    return read_manifest(folder)


def is_swappable_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds a swappable export (which another user's adapter may join; checked when it does)."""
    return _format_and_mode(folder) == (BUNDLE_FORMAT, "swappable")


def tokenizer_padding(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The pad token and its id: what a runtime without transformers pads batches with."""
    return {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id}


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
