"""A phone-style text classifier over an export bundle, using only ONNX Runtime, tokenizers and numpy.

    python export/phone_demo.py BUNDLE --text "where is my card" [--text ...] [--adapter NAME ...]

It does in Python what an app does on a phone: load the graph once, tokenize with the bundle's
tokenizer.json, and for a swappable bundle switch users by activating another adapter file in
the same session. It imports no torch or transformers (a phone has neither); of fedadapt, only its
errors and bounded JSON reader, through export/bundle_verify.py.

Nothing in the bundle is trusted: the manifest is checked, every file is used only after its size
and sha256 match the manifest, no path may leave the bundle, every adapter must set exactly the
graph's per-user inputs, and every labels list must be as long as the logits are wide. At run
time the graph's logits must be finite floats with one row per text and one column per label, and
whatever tokenizers raises for the bundle's tokenizer.json (its Rust panics included) is a
BundleError; texts longer than MAX_INPUT_CHARS are refused before the tokenizer sees them.

A swappable bundle's backbone.onnx is not a valid model on its own (its per-user inputs default
to zeros): exactly one adapter must be active for every run. A merged bundle's model.onnx has
its adapter built in and takes no adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

if not __package__:  # run as a script (python export/phone_demo.py): make the export package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export.bundle_verify import (  # noqa: E402
    LABELS_FILE,
    MANIFEST_FILE,
    MAX_GRAPH_BYTES,
    MAX_TOKENIZER_BYTES,
    ORT_ERRORS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    bundle_path,
    check_adapter_fits,
    check_files,
    check_labels,
    graph_file,
    read_json,
    read_manifest,
    read_verified,
    show,
)
from export.errors import BundleError  # noqa: E402
from fedadapt.errors import FedAdaptError  # noqa: E402

FORBIDDEN_MODULES = ("torch", "transformers")
ALLOWED_FEDADAPT_MODULES = ("fedadapt", "fedadapt.errors", "fedadapt.jsonsafe")  # none of them imports torch
OUTPUT_NAME = "logits"
PRECISIONS = ("fp32", "int8")  # the graph variants an export writes (export/variants.py)
FORMATS = ("onnx", "ort")
FLOAT_TENSORS = ("tensor(float)", "tensor(float16)", "tensor(double)")  # what the logits output may be
# A phone classifies messages, and the graph sees at most max_sequence_length tokens of each; the cap
# bounds how long a pre-tokenizer's regex (tokenizer.json is the bundle's) can be driven by one text.
MAX_INPUT_CHARS = 10_000
REFUSED: tuple[type[BaseException], ...] = (FedAdaptError, OSError, ValueError, *ORT_ERRORS)  # main() exits 2


def forbidden_modules() -> list[str]:
    """Loaded modules a phone would not have: torch, transformers, and fedadapt beyond its errors and JSON reader."""
    return sorted(
        name
        for name in sys.modules
        if name.split(".")[0] in FORBIDDEN_MODULES
        or (name.split(".")[0] == "fedadapt" and name not in ALLOWED_FEDADAPT_MODULES)
    )


@dataclass(frozen=True)
class PhoneBundle:
    """What the phone loads from a bundle, each file verified against the checked manifest."""

    folder: Path
    manifest: dict[str, Any]
    graph_name: str  # the file ``graph`` was read from
    graph: bytes  # the bytes that were hashed are the bytes ONNX Runtime parses
    tokenizer: Tokenizer
    labels: list[str]


def choose_graph(manifest: dict[str, Any], precision: str | None, fmt: str | None, folder: Path) -> str:
    """The graph file to run: the manifest's ``graph``, or its variant of ``precision`` (fp32, int8) and
    ``fmt`` (onnx, ort) from the ``graphs`` table; BundleError naming what the bundle has when it has no such one."""
    if precision is None and fmt is None:
        return graph_file(manifest)
    wanted = (precision or "fp32", fmt or "onnx")
    graphs = manifest.get("graphs", {})
    for name, entry in sorted(graphs.items()):
        if (entry["precision"], entry["format"]) == wanted:
            return str(name)
    if wanted == ("fp32", "onnx"):  # bundles written before the graphs table
        return graph_file(manifest)
    have = sorted({f"{e['precision']} {e['format']}" for e in graphs.values()}) or ["fp32 onnx"]
    raise BundleError(
        f"{folder} has no {wanted[0]} graph in {wanted[1]} format (it has: {', '.join(have)}); "
        "export it with --quantize int8 for int8 and --ort for the .ort format"
    )


def open_phone_bundle(folder: str | Path, precision: str | None = None, fmt: str | None = None) -> PhoneBundle:
    """Check ``folder``'s manifest and read the graph (the variant asked for), tokenizer and labels it lists;
    BundleError if anything is off."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    graph_name = choose_graph(manifest, precision, fmt, folder)
    graph = read_verified(folder, manifest, graph_name, MAX_GRAPH_BYTES)
    tokenizer = load_tokenizer(folder, manifest)
    width, width_from = manifest.get("num_labels"), "the manifest's num_labels has"
    labels = check_labels(read_json(folder, manifest, LABELS_FILE), width, str(folder / LABELS_FILE), width_from)
    for name, entry in manifest.get("adapters", {}).items():
        where = f"{folder / MANIFEST_FILE}: adapters[{name!r}].labels"
        check_labels(entry.get("labels", labels), width, where, width_from)
    return PhoneBundle(folder, manifest, graph_name, graph, tokenizer, labels)


class PhoneClassifier:
    """One InferenceSession over a verified bundle; ``use`` switches the active adapter, ``classify`` predicts."""

    def __init__(self, bundle: str | Path, precision: str | None = None, fmt: str | None = None) -> None:
        verified = open_phone_bundle(bundle, precision, fmt)
        self.bundle, self.manifest, self.graph_name = verified.folder, verified.manifest, verified.graph_name
        self.swappable = self.manifest["mode"] == "swappable"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # one "initializer appears in graph inputs" warning per per-user tensor
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning drains the battery
        if self.manifest.get("graphs", {}).get(self.graph_name, {}).get("format") == "ort":
            options.add_session_config_entry("session.load_model_format", "ORT")  # bytes carry no file extension
        try:
            self.session = ort.InferenceSession(verified.graph, options, providers=["CPUExecutionProvider"])
        except ORT_ERRORS as err:
            raise BundleError(f"ONNX Runtime cannot load {self.bundle / self.graph_name}: {err}") from None
        self.tokenizer = verified.tokenizer
        self.labels = verified.labels
        self.width = _logits_width(self.session, self.bundle / self.graph_name)
        check_labels(self.labels, self.width, str(self.bundle / LABELS_FILE))  # every labels list fits the logits
        for name in self.adapter_names:
            check_labels(self.labels_of(name), self.width, f"{self.bundle / MANIFEST_FILE}: adapters[{name!r}].labels")
        self.adapters: dict[str, ort.LoraAdapter] = {}  # loaded on first use, then kept (memory-mapped)
        self.active: str | None = None
        self._run_options: ort.RunOptions | None = None

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters in the bundle (none in a merged bundle)."""
        return sorted(self.manifest.get("adapters", {}))

    def use(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one active adapter, in the same session (nothing is rebuilt).

        Each call checks the adapter file's size and sha256 and that it sets exactly the graph's
        per-user inputs (a missing one would silently run on its zero default).
        """
        if not isinstance(adapter_name, str):
            raise TypeError(f"use() activates exactly one adapter: pass one name, got {adapter_name!r}")
        if not self.swappable:
            raise ValueError(f"{self.bundle} is a merged bundle: its adapter is built into the graph; nothing to use")
        if adapter_name not in self.manifest["adapters"]:
            raise ValueError(f"no adapter {adapter_name!r} in {self.bundle}; it has {self.adapter_names}")
        path = self.verified_adapter(adapter_name)
        if adapter_name not in self.adapters:
            adapter = ort.LoraAdapter()
            try:
                adapter.Load(str(path))
            except ORT_ERRORS as err:
                raise BundleError(f"ONNX Runtime cannot load {path}: {err}") from None
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
        feeds = self.encode(texts)
        graph = self.bundle / self.graph_name
        try:
            outputs = self.session.run([OUTPUT_NAME], feeds, self._run_options)
        except ORT_ERRORS as err:  # e.g. a Gather past its table, a Reshape to an impossible shape
            raise BundleError(f"ONNX Runtime failed running {graph}: {str(err)[:300]}") from None
        return _checked_logits(outputs[0], len(texts), len(self._active_labels()), graph)

    def classify(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class of each text, with the active adapter."""
        logits = self.logits(texts).astype(np.float64)  # (B, num_labels), checked
        labels = self._active_labels()
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
        return [(labels[int(row.argmax())], float(row.max())) for row in probabilities]

    def verified_adapter(self, name: str) -> Path:
        """The path of adapter ``name``'s file, after its size, sha256 and fit to the graph were checked."""
        file = self.manifest["adapters"][name]["file"]
        check_files(self.bundle, self.manifest, [file])
        path = bundle_path(self.bundle, file, str(self.bundle / MANIFEST_FILE))
        check_adapter_fits(self.session, path)
        return path

    def _active_labels(self) -> list[str]:
        """The active adapter's label names (users may name classes differently), else labels.json."""
        return self.labels if self.active is None else self.labels_of(self.active)

    def labels_of(self, name: str) -> list[str]:
        return list(self.manifest["adapters"][name].get("labels", self.labels))

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (B, T), padded to the longest text."""
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to classify")
        for number, text in enumerate(texts, 1):
            if not isinstance(text, str):
                raise TypeError(f"text {number} is a {type(text).__name__}, not a str")
            if len(text) > MAX_INPUT_CHARS:
                raise ValueError(
                    f"text {number} has {len(text)} characters; the phone classifies texts of at most "
                    f"{MAX_INPUT_CHARS} (the graph sees at most {self.manifest['max_sequence_length']} tokens)"
                )
        with tokenizer_failures(self.bundle / TOKENIZER_FILE, "encoding the texts"):
            encodings = self.tokenizer.encode_batch(texts)
            return {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            }


def _logits_width(session: ort.InferenceSession, graph: Path) -> int | None:
    """The number of classes the graph's (B, num_labels) float logits have; None if the graph leaves it symbolic."""
    outputs = {output.name: (output.type, output.shape) for output in session.get_outputs()}
    kind, shape = outputs.get(OUTPUT_NAME, (None, None))
    if shape is None or len(shape) != 2:
        raise BundleError(
            f"{graph} has no (batch, num_labels) output named {OUTPUT_NAME!r}; its outputs: {show(outputs)}"
        )
    if kind not in FLOAT_TENSORS:
        raise BundleError(f"{graph}: its {OUTPUT_NAME!r} output is a {show(kind)}, not one of {FLOAT_TENSORS}")
    return shape[1] if isinstance(shape[1], int) else None


def _checked_logits(logits: Any, rows: int, width: int, graph: Path) -> np.ndarray:
    """``logits`` if they are finite floats of shape (rows, width), else a BundleError naming ``graph``.

    The graph computes whatever it was made to: its declared output type and shape are checked when
    it is loaded, but a symbolic batch dimension can hide fewer rows than texts, and NaN would be
    printed as a prediction (and as invalid JSON).
    """
    if not isinstance(logits, np.ndarray) or not np.issubdtype(logits.dtype, np.floating):
        found = logits.dtype if isinstance(logits, np.ndarray) else type(logits).__name__
        raise BundleError(f"{graph}: its {OUTPUT_NAME!r} output must be a float tensor, got {found}")
    if logits.shape != (rows, width):
        raise BundleError(
            f"{graph}: its {OUTPUT_NAME!r} output has shape {logits.shape}; {rows} texts and {width} labels "
            f"need ({rows}, {width})"
        )
    if not np.isfinite(logits).all():
        raise BundleError(f"{graph}: its {OUTPUT_NAME!r} output has NaN or infinite values")
    return logits


def load_tokenizer(folder: Path, manifest: dict[str, Any]) -> Tokenizer:
    """tokenizer.json (verified), truncating to the positions the graph has and padding with the pad token."""
    text = read_verified(folder, manifest, TOKENIZER_FILE, MAX_TOKENIZER_BYTES)
    with tokenizer_failures(folder / TOKENIZER_FILE, "loading it"):
        tokenizer = Tokenizer.from_str(text.decode("utf-8"))
        tokenizer.enable_truncation(max_length=manifest["max_sequence_length"])
    pad_token, pad_id = _pad_token(folder, manifest, tokenizer)
    with tokenizer_failures(folder / TOKENIZER_FILE, "setting its padding"):
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


@contextmanager
def tokenizer_failures(file: Path, doing: str) -> Iterator[None]:
    """Whatever tokenizers raises while ``doing`` something with ``file`` becomes a BundleError naming it.

    tokenizers raises plain Exception for its errors (a file it cannot parse, a text it cannot
    encode), and when its Rust code panics, pyo3's PanicException: a BaseException, so ``except
    Exception`` misses it, and tokenizers does not export the class, so it is recognised by its
    module and name. A hostile pre-tokenizer regex makes Oniguruma hit its retry limit, which panics.
    KeyboardInterrupt, SystemExit and any other BaseException pass through.
    """
    try:
        yield
    except Exception as err:
        raise BundleError(f"{file}: tokenizers failed {doing}: {str(err)[:200]}") from None
    except BaseException as err:
        if not _is_rust_panic(err):
            raise
        raise BundleError(f"{file}: tokenizers panicked {doing}: {str(err)[:200]}") from None


def _is_rust_panic(err: BaseException) -> bool:
    """Whether ``err`` is pyo3's PanicException (a Rust panic inside an extension such as tokenizers)."""
    return type(err).__module__ == "pyo3_runtime" and type(err).__name__ == "PanicException"


def _pad_token(folder: Path, manifest: dict[str, Any], tokenizer: Tokenizer) -> tuple[str, int]:
    """The pad token and id the manifest records, else tokenizer_config.json's (older bundles)."""
    recorded = manifest.get("tokenizer", {})
    pad_token, pad_id = recorded.get("pad_token"), recorded.get("pad_token_id")
    if pad_token is None or pad_id is None:
        config = read_json(folder, manifest, TOKENIZER_CONFIG_FILE)
        pad_token = config.get("pad_token") if isinstance(config, dict) else None
        pad_id = tokenizer.token_to_id(pad_token) if isinstance(pad_token, str) else None
    if pad_token is None or pad_id is None:
        raise BundleError(f"{folder} names no pad token: batches of several texts cannot be padded")
    if pad_id >= tokenizer.get_vocab_size(with_added_tokens=True):
        raise BundleError(
            f"{folder / MANIFEST_FILE}: tokenizer.pad_token_id {pad_id} is not in the tokenizer's vocabulary"
        )
    return pad_token, pad_id


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Classify texts with an export bundle, as a phone would.")
    parser.add_argument("bundle", type=Path, help="folder written by `fedadapt export`")
    parser.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    parser.add_argument(
        "--adapter", action="append", help="swappable bundles: adapter to use (repeatable; default: every adapter)"
    )
    parser.add_argument("--precision", choices=PRECISIONS, help="run the bundle's fp32 or int8 graph (--quantize int8)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, help="run the .onnx or the .ort graph (--ort)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # Tests: report which modules a phone would not have got imported (the answer must be none).
    parser.add_argument("--check-imports", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Classify ``--text`` with each ``--adapter`` in turn in one session; print the predictions."""
    args = _parse(argv)
    try:
        classifier = PhoneClassifier(args.bundle, args.precision, args.fmt)
        results = _classify_each(classifier, args.text, args.adapter)
        report = _report(args, classifier, results)
    except REFUSED as err:  # a bad bundle or request: say so, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _report(args: argparse.Namespace, classifier: PhoneClassifier, results: list[dict[str, Any]]) -> str:
    """The predictions as one JSON object (--json) or one line per text and adapter."""
    output: dict[str, Any] = {"bundle": str(args.bundle), "mode": classifier.manifest["mode"], "results": results}
    output["graph"] = classifier.graph_name
    if args.check_imports:
        output["forbidden_modules"] = forbidden_modules()
    if args.json:
        return json.dumps(output)
    lines = []
    for result in results:
        user = f"[{result['adapter']}] " if result["adapter"] else ""
        for text, prediction in zip(args.text, result["predictions"], strict=True):
            lines.append(f"{user}{text!r} -> {prediction['label']} ({prediction['probability']:.2f})")
    return "\n".join(lines)


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
