"""Loading what an export needs: the adapter folder's manifest, the model, and the parity check's reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from transformers import AutoTokenizer

from export.config import ExportConfig
from export.errors import ExportError
from export.parity import Feeds, ParityResult, RunGraph, check_parity, tokenize_batches
from fedadapt.checkpoint.folder import load_adapter, read_manifest
from fedadapt.errors import AdapterFolderError, ConfigError, FedAdaptError
from fedadapt.model.adapter_model import AdapterModel


def read_adapter_manifest(adapter: Path) -> dict[str, Any]:
    """The adapter folder's fedadapt_adapter.json; a clear error for a missing folder or unreadable file."""
    if not adapter.is_dir():
        raise ConfigError(
            f"adapter folder {adapter} does not exist; pass the folder `fedadapt train --out` wrote "
            "(or a simulation's final_adapter/)"
        )
    try:
        return read_manifest(adapter)
    except FedAdaptError:
        raise  # already names the file and the field
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFolderError(f"{adapter} has an unreadable manifest ({err}); save the adapter again") from err


def load_for_export(adapter: Path, backbone: str | None) -> AdapterModel:
    """Load the adapter folder in eval mode, turning a corrupt folder's low-level errors into a clear one.

    ``load_adapter`` checks the manifest and the weights before building anything, so a hostile folder
    ends in its AdapterFolderError naming the field; the catch below is for what no check foresaw.
    """
    try:
        return load_adapter(adapter, backbone=backbone).eval()
    except FedAdaptError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise AdapterFolderError(
            f"{adapter} is corrupt or truncated and cannot be loaded ({type(err).__name__}: {err}); "
            "save the adapter again"
        ) from err


def bundled_batches(reference: AdapterModel, bundle: Path, texts: tuple[str, ...]) -> dict[str, Feeds]:
    """Parity batches from the adapter's tokenizer, after checking the bundle's tokenizer.json tokenizes the same."""
    max_length = reference.max_text_tokens
    batches = tokenize_batches(reference.backbone.tokenizer, texts, max_length)
    bundled = tokenize_batches(AutoTokenizer.from_pretrained(str(bundle)), texts, max_length)
    for name, feeds in batches.items():
        if any(not (feeds[k] == bundled[name][k]).all() for k in ("input_ids", "attention_mask")):
            raise ExportError(f"the bundled tokenizer.json tokenizes the parity texts differently ({name})")
    return batches


def check_against_fresh_model(run_graph: RunGraph, config: ExportConfig, bundle: Path) -> ParityResult:
    """Parity of ``run_graph`` with a freshly loaded PyTorch model of ``config.adapter`` on the parity texts.

    Fresh, because ``torch.onnx.export`` may change the module it traces; ``bundle`` holds the
    tokenizer.json the phone will use, checked to tokenize like the adapter's tokenizer.
    """
    reference = load_for_export(config.adapter, config.backbone)
    batches = bundled_batches(reference, bundle, config.texts)
    return check_parity(run_graph, reference, batches, config.atol, len(config.texts))
