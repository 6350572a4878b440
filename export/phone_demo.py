"""A phone-style text classifier over an export bundle, using only ONNX Runtime, tokenizers and numpy.

    python export/phone_demo.py BUNDLE --text "where is my card" [--text ...] [--adapter NAME ...]

It does in Python what an app does on a phone: load the graph once, tokenize with the bundle's
tokenizer.json, and for a swappable bundle switch users by activating another adapter file in
the same session. It imports no torch, transformers or fedadapt: a phone has none of them.

A swappable bundle's backbone.onnx is not a valid model on its own (its per-user inputs default
to zeros): exactly one adapter must be active for every run. A merged bundle's model.onnx has
its adapter built in and takes no adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

FORBIDDEN_MODULES = ("torch", "transformers", "fedadapt")


class PhoneClassifier:
    """One InferenceSession over a bundle; ``use`` switches the active adapter, ``classify`` predicts."""

    def __init__(self, bundle: str | Path) -> None:
        self.bundle = Path(bundle)
        self.manifest: dict[str, Any] = json.loads((self.bundle / "manifest.json").read_text())
        self.swappable = self.manifest.get("mode") == "swappable"
        default_graph = "backbone.onnx" if self.swappable else "model.onnx"  # bundles written before "graph"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # one "initializer appears in graph inputs" warning per per-user tensor
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning drains the battery
        graph = self.bundle / self.manifest.get("graph", default_graph)
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.tokenizer = self._load_tokenizer()
        self.labels: list[str] = json.loads((self.bundle / "labels.json").read_text())
        self.adapters: dict[str, ort.LoraAdapter] = {}  # loaded on first use, then kept (memory-mapped)
        self.active: str | None = None
        self._run_options: ort.RunOptions | None = None

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters in the bundle (none in a merged bundle)."""
        return sorted(self.manifest.get("adapters", {}))

    def use(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one active adapter, in the same session (nothing is rebuilt)."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"use() activates exactly one adapter: pass one name, got {adapter_name!r}")
        if not self.swappable:
            raise ValueError(f"{self.bundle} is a merged bundle: its adapter is built into the graph; nothing to use")
        if adapter_name not in self.manifest["adapters"]:
            raise ValueError(f"no adapter {adapter_name!r} in {self.bundle}; it has {self.adapter_names}")
        if adapter_name not in self.adapters:
            adapter = ort.LoraAdapter()
            adapter.Load(str(self.bundle / self.manifest["adapters"][adapter_name]["file"]))
            self.adapters[adapter_name] = adapter
        # A fresh RunOptions per switch: adding to the old one would make two adapters active at once,
        # which ONNX Runtime accepts without an error.
        run_options = ort.RunOptions()
        run_options.add_active_adapter(self.adapters[adapter_name])
        self._run_options, self.active = run_options, adapter_name

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """The graph's logits (B, num_labels) for ``texts``, with the active adapter."""
        if self.swappable and self.active is None:
            raise RuntimeError(
                f"activate an adapter first with use(name), one of {self.adapter_names}: "
                "backbone.onnx alone is not a valid model"
            )
        logits: np.ndarray = self.session.run(["logits"], self._encode(texts), self._run_options)[0]
        return logits

    def classify(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class of each text, with the active adapter."""
        logits = self.logits(texts)  # (B, num_labels)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
        labels = self._active_labels()
        return [(labels[int(row.argmax())], float(row.max())) for row in probabilities]

    def _active_labels(self) -> list[str]:
        """The active adapter's label names (users may name classes differently), else labels.json."""
        if self.active is None:
            return self.labels
        return list(self.manifest["adapters"][self.active].get("labels", self.labels))

    def _encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (B, T), padded to the longest text."""
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def _load_tokenizer(self) -> Tokenizer:
        """tokenizer.json, truncating to the positions the graph has and padding with the pad token."""
        tokenizer = Tokenizer.from_file(str(self.bundle / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=int(self.manifest["max_sequence_length"]))
        pad_token, pad_id = self._pad_token(tokenizer)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        return tokenizer

    def _pad_token(self, tokenizer: Tokenizer) -> tuple[str, int]:
        """The pad token and id the manifest records, else tokenizer_config.json's (older bundles)."""
        recorded = self.manifest.get("tokenizer", {})
        if recorded.get("pad_token") is not None and recorded.get("pad_token_id") is not None:
            return str(recorded["pad_token"]), int(recorded["pad_token_id"])
        config = json.loads((self.bundle / "tokenizer_config.json").read_text())
        pad_token = config.get("pad_token")
        pad_id = tokenizer.token_to_id(pad_token) if isinstance(pad_token, str) else None
        if pad_id is None:
            raise ValueError(f"{self.bundle} names no pad token: batches of several texts cannot be padded")
        return pad_token, pad_id


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Classify texts with an export bundle, as a phone would.")
    parser.add_argument("bundle", type=Path, help="folder written by `fedadapt export`")
    parser.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    parser.add_argument(
        "--adapter", action="append", help="swappable bundles: adapter to use (repeatable; default: every adapter)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # Tests: report which of torch/transformers/fedadapt got imported (the answer must be none).
    parser.add_argument("--check-imports", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Classify ``--text`` with each ``--adapter`` in turn in one session; print the predictions."""
    args = _parse(argv)
    try:
        classifier = PhoneClassifier(args.bundle)
        results = _classify_each(classifier, args.text, args.adapter)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output: dict[str, Any] = {"bundle": str(args.bundle), "mode": classifier.manifest.get("mode"), "results": results}
    if args.check_imports:
        output["forbidden_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN_MODULES)
    if args.json:
        print(json.dumps(output))
        return 0
    for result in results:
        user = f"[{result['adapter']}] " if result["adapter"] else ""
        for text, prediction in zip(args.text, result["predictions"], strict=True):
            print(f"{user}{text!r} -> {prediction['label']} ({prediction['probability']:.2f})")
    return 0


def _classify_each(classifier: PhoneClassifier, texts: list[str], adapters: list[str] | None) -> list[dict[str, Any]]:
    """One result per adapter (swappable: the named ones, default all; merged: the built-in one)."""
    if adapters and not classifier.swappable:
        raise ValueError(f"{classifier.bundle} is a merged bundle and has no adapters to choose")
    results: list[dict[str, Any]] = []
    for name in (adapters or classifier.adapter_names) if classifier.swappable else [None]:
        if name is not None:
            classifier.use(name)
        predictions = [{"label": label, "probability": p} for label, p in classifier.classify(texts)]
        results.append({"adapter": name, "predictions": predictions})
    return results


if __name__ == "__main__":
    sys.exit(main())
