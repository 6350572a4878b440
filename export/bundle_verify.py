"""Reading an export bundle without trusting it: bounded JSON, a checked manifest, confined paths, verified files.

The phone (export/phone_demo.py) and the exporter adding a user to a bundle (export/joining.py) read
bundles through this module only. It imports no torch or transformers (a phone has neither): the
stdlib, numpy, onnxruntime, and fedadapt's errors and jsonsafe.

Rules, each failure a BundleError naming the file and the field:
- JSON files are read with a size and a nesting-depth limit (fedadapt.jsonsafe).
- The manifest's fields have the types and ranges the readers rely on (``check_manifest``).
- Every path the manifest names (``graph``, ``graphs``, adapter ``file``, ``files``, the on-device
  graphs (and the int8 prefix, when there is one), ``required_operators``) is a relative POSIX path
  with no ``..``, no symlink anywhere along it inside the bundle, and resolves inside it.
- A file is used only if ``files`` lists it, and only after its size (first: a huge file is refused
  without being read) and then its sha256 match the manifest; ``read_verified`` returns the bytes
  it hashed, so what was checked is what is used.
- An adapter file must set exactly the graph's per-user inputs, with their shapes and dtypes.
- Writes into a bundle (``write_target``) refuse symlinks and paths that leave the bundle.
"""

from __future__ import annotations

import hashlib
import os
import re
import reprlib
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import onnxruntime as ort

from export.config import ADAPTER_NAME, MAX_LEARNING_RATE, MAX_TRAIN_BATCH, MAX_TRAIN_TOKENS, MODES
from export.errors import BundleError
from fedadapt import jsonsafe
from fedadapt.errors import JsonInputError

BUNDLE_FORMAT = "fedadapt.export.v1"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
REPORT_FILE = "report.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_FILE = "model.onnx"
BACKBONE_FILE = "backbone.onnx"
DEFAULT_GRAPHS = {"merged": MODEL_FILE, "swappable": BACKBONE_FILE}  # bundles written before "graph"

MAX_MANIFEST_BYTES = 4 << 20  # files, layout and per-user label names: a thousand users with 77 labels each fit
MAX_JSON_BYTES = 8 << 20  # labels.json, report.json, tokenizer_config.json
MAX_JSON_DEPTH = 16  # the deepest file a bundle holds nests 7 levels (report.json's parity batches)
MAX_FILE_BYTES = 16 << 30  # a recorded size above this is refused before anything is read
MAX_GRAPH_BYTES = 2 << 30  # protobuf's limit: a larger .onnx would need external data, which bundles do not use
MAX_TOKENIZER_BYTES = 64 << 20
MAX_FILES = 100_000
MAX_PATH_CHARS = 1024
MAX_LABELS = 100_000
MAX_TEXT_CHARS = 1000  # a label name, pad token, method name or schema id
MAX_SEQUENCE_LENGTH = 1 << 20
MAX_TOKEN_ID = (1 << 32) - 1  # tokenizers stores ids as u32
MAX_OPSET = 1000
ON_DEVICE_SECTION = "on_device_training"  # export/on_device.py writes it, export/phone_trainer.py reads it
# The on-device step graph's interface (export/on_device.py writes it, export/phone_trainer.py runs it).
HIDDEN = "hidden"
STEP_INPUTS = (HIDDEN, "attention_mask", "labels", "weights")
LOSS, LOGITS = "loss", "logits"
GRAD_PREFIX = "grad."
ADAPTERS_DIR = "adapters"  # a swappable bundle's users: adapters/<name>.onnx_adapter
ADAPTER_SUFFIX = ".onnx_adapter"
ON_DEVICE_FILES = ("prefix", "train_step", "program")
ON_DEVICE_OPTIONAL_FILES = ("prefix_int8",)  # written with --quantize int8: checked like the others when present
PROGRAM_BACKENDS = ("xnnpack", "portable")  # what train_step.pte was lowered with: the runtime must register it
# ``--ort`` bundles: the operators a minimal ONNX Runtime build needs (export/required_operators.py).
REQUIRED_OPERATORS = "required_operators"
REQUIRED_OPERATORS_FILE = "required_operators.config"
MAX_LAYERS = 10_000
MAX_HIDDEN = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 1 << 20
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60

_state = ort.capi.onnxruntime_pybind11_state
ORT_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    ValueError,
    *(kind for kind in vars(_state).values() if isinstance(kind, type) and issubclass(kind, Exception)),
)
"""What ONNX Runtime raises for a graph or adapter it cannot load or run.

Its Python layer raises RuntimeError and ValueError (a graph asking for inputs that are not fed);
its C++ layer one class per status code (Fail, InvalidArgument, RuntimeException, EPFail, ...),
sharing no base class, so every one its pybind module defines is taken (versions add some).
"""


def show(value: Any) -> str:
    """A short repr of a hostile value for an error message (never the whole of a huge one)."""
    return _SHOW.repr(value)


# ------------------------------------------------------------------------------------- manifest


def load_manifest(folder: Path) -> Any:
    """The JSON value of ``folder``'s manifest.json, read with size and depth limits (not checked further)."""
    path = bundle_path(folder, MANIFEST_FILE, f"{folder}")
    _regular_file_stat(path, f"{folder} has no {MANIFEST_FILE}; it is not an export bundle")
    try:
        return jsonsafe.load_file(path, max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_JSON_DEPTH)
    except JsonInputError as err:
        raise BundleError(f"{err}; it is not a readable export bundle: export it again") from None


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder``'s manifest, checked: its fields (``check_manifest``) and every path it names (confined)."""
    manifest = load_manifest(folder)
    where = str(folder / MANIFEST_FILE)
    check_manifest(manifest, where)
    root = folder.resolve()
    for name in named_paths(manifest):
        bundle_path(folder, name, where, root)
    return manifest  # type: ignore[no-any-return]  # check_manifest made sure it is a dict


def graph_file(manifest: Mapping[str, Any]) -> str:
    """The graph a runtime loads: ``graph``, else the mode's default (bundles written before ``graph``)."""
    return str(manifest.get("graph", DEFAULT_GRAPHS[manifest["mode"]]))


def named_paths(manifest: Mapping[str, Any]) -> list[str]:
    """Every path a checked manifest names: files, graph, graphs, adapter files, on-device graphs, operators list."""
    adapters = manifest.get("adapters", {})
    on_device = manifest.get(ON_DEVICE_SECTION, {})
    extra = [on_device[key] for key in (*ON_DEVICE_FILES, *ON_DEVICE_OPTIONAL_FILES) if key in on_device]
    extra += [manifest[REQUIRED_OPERATORS]] if REQUIRED_OPERATORS in manifest else []
    return sorted({*manifest["files"], graph_file(manifest), *manifest.get("graphs", {}), *_files_of(adapters), *extra})


def _files_of(adapters: Mapping[str, Any]) -> list[str]:
    return [entry["file"] for entry in adapters.values()]


def check_manifest(manifest: Any, where: str) -> None:
    """BundleError unless ``manifest`` has the fields, types and ranges the bundle's readers rely on."""
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise BundleError(f"{where} is not of format {BUNDLE_FORMAT} (found {show(found)}); it is not an export bundle")
    mode = manifest.get("mode")
    if mode not in MODES:
        raise BundleError(f"{where}: mode must be one of {list(MODES)}, got {show(mode)}")
    files = _field(manifest, "files", dict, where)
    if len(files) > MAX_FILES:
        raise BundleError(f"{where}: files lists {len(files)} files, more than the {MAX_FILES} allowed")
    for name, entry in files.items():
        _check_file_entry(name, entry, f"{where}: files[{show(name)}]")
    listed = _listed(files, where)
    listed(_path_field(manifest, "graph", where, DEFAULT_GRAPHS[mode]), "graph")
    _check_graphs(_field(manifest, "graphs", dict, where, {}), listed, where)
    if REQUIRED_OPERATORS in manifest:
        listed(_path_field(manifest, REQUIRED_OPERATORS, where), REQUIRED_OPERATORS)
    _int_field(manifest, "max_sequence_length", 1, MAX_SEQUENCE_LENGTH, where)
    _int_field(manifest, "num_labels", 1, MAX_LABELS, where, required=False)
    _int_field(manifest, "opset", 1, MAX_OPSET, where, required=False)
    _check_tokenizer(_field(manifest, "tokenizer", dict, where, {}), where)
    # A swappable bundle needs its adapters; a merged one has none, but any it lists are checked all the same.
    _check_adapters(_field(manifest, "adapters", dict, where, None if mode == "swappable" else {}), listed, where)
    layout = _field(manifest, "layout", dict, where, {})
    _check_layout(layout, f"{where}: layout")
    if ON_DEVICE_SECTION in manifest:
        on_device = _field(manifest, ON_DEVICE_SECTION, dict, where)
        _check_on_device(on_device, layout, manifest, listed, f"{where}: {ON_DEVICE_SECTION}")


def _check_file_entry(name: Any, entry: Any, where: str) -> None:
    check_relative_path(name, where)
    if not isinstance(entry, dict):
        raise BundleError(f"{where} must be an object with bytes and sha256, got {show(entry)}")
    _int_field(entry, "bytes", 0, MAX_FILE_BYTES, where)
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise BundleError(f"{where}: sha256 must be 64 lowercase hex digits, got {show(digest)}")


def _listed(files: Mapping[str, Any], where: str) -> Any:
    """``check(name, field)``: BundleError unless ``name`` is a valid path that ``files`` lists."""

    def check(name: str, field: str) -> None:
        check_relative_path(name, f"{where}: {field}")
        if name not in files:
            raise BundleError(f"{where}: {field} {name!r} is not listed in files, so it cannot be verified")

    return check


def _check_graphs(graphs: dict[str, Any], listed: Any, where: str) -> None:
    for name, entry in graphs.items():
        listed(name, f"graphs[{show(name)}]")
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: graphs[{name!r}] must be an object, got {show(entry)}")
        for key in ("precision", "format"):
            _text_field(entry, key, f"{where}: graphs[{name!r}]")
        source = entry.get("source", name)
        if source not in graphs:
            raise BundleError(f"{where}: graphs[{name!r}].source {show(source)} is not one of the graphs")


def _check_tokenizer(tokenizer: dict[str, Any], where: str) -> None:
    if tokenizer.get("pad_token") is not None:
        _text_field(tokenizer, "pad_token", f"{where}: tokenizer")
    if tokenizer.get("pad_token_id") is not None:
        _int_field(tokenizer, "pad_token_id", 0, MAX_TOKEN_ID, f"{where}: tokenizer")


def _check_adapters(adapters: dict[str, Any], listed: Any, where: str) -> None:
    for name, entry in adapters.items():
        if not ADAPTER_NAME.fullmatch(name):
            raise BundleError(f"{where}: adapter name {show(name)} is not a valid adapter name")
        what = f"{where}: adapters[{name!r}]"
        if not isinstance(entry, dict):
            raise BundleError(f"{what} must be an object, got {show(entry)}")
        listed(_path_field(entry, "file", what), f"adapters[{name!r}].file")
        for key in ("method", "schema_id"):
            if key in entry:
                _text_field(entry, key, what)
        if "labels" in entry:
            check_labels(entry["labels"], None, f"{what}.labels")


def _check_layout(layout: dict[str, Any], where: str) -> None:
    """The fields layout_differences (export/layout.py) compares when a user joins."""
    for key in ("method", "extras", "pooling"):
        _field(layout, key, dict, where, {})
    _int_field(layout, "num_labels", 1, MAX_LABELS, where, required=False)
    for index, tensor in enumerate(_field(layout, "tensors", list, where, [])):
        what = f"{where}.tensors[{index}]"
        if not isinstance(tensor, dict):
            raise BundleError(f"{what} must be an object with name, shape and dtype, got {show(tensor)}")
        _text_field(tensor, "name", what)
        _text_field(tensor, "dtype", what)
        shape = _field(tensor, "shape", list, what)
        if not all(type(n) is int and 0 <= n <= MAX_FILE_BYTES for n in shape):
            raise BundleError(f"{what}: shape must be a list of sizes, got {show(shape)}")


def _check_on_device(
    section: dict[str, Any], layout: dict[str, Any], manifest: Mapping[str, Any], listed: Any, where: str
) -> None:
    """The on-device training section: listed files, sizes in range, and a place for every per-user tensor."""
    if manifest.get("mode") != "swappable":
        raise BundleError(f"{where}: only a swappable bundle can train on the device (its mode: {manifest['mode']})")
    for key in ON_DEVICE_FILES:
        listed(_path_field(section, key, where), f"{ON_DEVICE_SECTION}.{key}")
    for key in ON_DEVICE_OPTIONAL_FILES:
        if key in section:
            listed(_path_field(section, key, where), f"{ON_DEVICE_SECTION}.{key}")
    for key, high in (("train_layers", MAX_LAYERS), ("frozen_layers", MAX_LAYERS), ("hidden_size", MAX_HIDDEN)):
        _int_field(section, key, 0 if key.endswith("layers") else 1, high, where)
    _int_field(section, "batch_size", 1, MAX_TRAIN_BATCH, where)
    _int_field(section, "sequence_length", 2, min(MAX_TRAIN_TOKENS, manifest["max_sequence_length"]), where)
    prefix, trainable = _names(section, "prefix_inputs", where), _names(section, "trainable", where)
    if not trainable:
        raise BundleError(f"{where}: trainable lists no tensor, so nothing would train")
    per_user = [tensor["name"] for tensor in layout.get("tensors", [])]
    if set(prefix) & set(trainable) or sorted([*prefix, *trainable]) != sorted(per_user):
        raise BundleError(
            f"{where}: prefix_inputs and trainable must split the layout's {len(per_user)} per-user tensors between "
            "them, each once; export the bundle again"
        )
    renames = _field(section, "program_parameters", dict, where)
    named = all(isinstance(k, str) and isinstance(v, str) for k, v in renames.items())
    if not named or sorted(renames.values()) != sorted(trainable):
        raise BundleError(f"{where}: program_parameters must name each trainable tensor once")
    backend = section.get("program_backend", "portable")  # bundles from before XNNPACK lowering lack the field
    if backend not in PROGRAM_BACKENDS:
        raise BundleError(f"{where}: program_backend must be one of {PROGRAM_BACKENDS}, got {show(backend)}")
    optimizer = _field(section, "optimizer", dict, where)
    if optimizer.get("name") != "sgd":
        raise BundleError(f"{where}: optimizer.name must be 'sgd', got {show(optimizer.get('name'))}")
    rate, momentum = optimizer.get("learning_rate"), optimizer.get("momentum")
    if type(rate) not in (int, float) or not 0 < rate <= MAX_LEARNING_RATE:
        raise BundleError(f"{where}: optimizer.learning_rate must be a number in (0, {MAX_LEARNING_RATE:g}]")
    if type(momentum) not in (int, float) or not 0 <= momentum < 1:
        raise BundleError(f"{where}: optimizer.momentum must be a number in [0, 1), got {show(momentum)}")


def _names(section: Mapping[str, Any], key: str, where: str) -> list[str]:
    names = _field(section, key, list, where)
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_TEXT_CHARS for n in names) or len(set(names)) != len(names):
        raise BundleError(f"{where}: {key} must list distinct tensor names, got {show(names)}")
    return names


def check_labels(labels: Any, width: int | None, where: str, width_from: str = "the graph's logits have") -> list[str]:
    """``labels`` as a list of label names; BundleError unless it is one, of ``width`` names when given.

    ``width_from`` says where ``width`` comes from, for the message ("... but {width_from} {width} columns").
    """
    if not isinstance(labels, list) or not 1 <= len(labels) <= MAX_LABELS:
        raise BundleError(f"{where} must be a list of 1 to {MAX_LABELS} label names, got {show(labels)}")
    bad = [label for label in labels if not isinstance(label, str) or len(label) > MAX_TEXT_CHARS]
    if bad:
        raise BundleError(f"{where}: label names must be strings of at most {MAX_TEXT_CHARS} characters: {show(bad)}")
    if width is not None and len(labels) != width:
        raise BundleError(
            f"{where} has {len(labels)} label names, but {width_from} {width} columns; export the bundle again"
        )
    return labels


def _field(mapping: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    """``mapping[key]``, which must be a ``kind``; ``default`` when missing (None: the field is required)."""
    if key not in mapping and default is not None:
        return default
    value = mapping.get(key)
    if not isinstance(value, kind):
        raise BundleError(f"{where}: {key} must be a JSON {kind.__name__}, got {show(value)}")
    return value


def _int_field(mapping: Mapping[str, Any], key: str, low: int, high: int, where: str, required: bool = True) -> None:
    if key not in mapping and not required:
        return
    value = mapping.get(key)
    if type(value) is not int or not low <= value <= high:  # bool is an int subclass: refused too
        raise BundleError(f"{where}: {key} must be an integer from {low} to {high}, got {show(value)}")


def _text_field(mapping: Mapping[str, Any], key: str, where: str) -> None:
    value = mapping.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT_CHARS:
        raise BundleError(f"{where}: {key} must be a string of 1 to {MAX_TEXT_CHARS} characters, got {show(value)}")


def _path_field(mapping: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = _field(mapping, key, str, where, default)
    return check_relative_path(value, f"{where}: {key}")


# ---------------------------------------------------------------------------------------- paths


def check_relative_path(name: Any, where: str) -> str:
    """``name`` if it is a relative POSIX path inside a bundle (no ``..``, ``.``, ``//``, ``\\`` or NUL)."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_PATH_CHARS:
        raise BundleError(f"{where}: a path must be a string of 1 to {MAX_PATH_CHARS} characters, got {show(name)}")
    # Split by hand, not with PurePosixPath: pathlib interns every part, and a hostile manifest's names would
    # grow (and now and then resize, megabytes at once) the interpreter's table of interned strings.
    parts = name.split("/")  # an absolute path, "//" or a trailing "/" gives an empty part
    if {"", ".", ".."} & set(parts) or "\\" in name or "\x00" in name:
        raise BundleError(
            f"{where}: {show(name)} is not a plain relative path inside the bundle (no '..', absolute paths, "
            "'.', '//', backslashes or NUL); export the bundle again"
        )
    return name


def bundle_path(folder: Path, name: str, where: str, root: Path | None = None) -> Path:
    """``folder / name``, refused unless every part of ``name`` that exists is no symlink and it stays inside.

    ``root`` is ``folder.resolve()`` when the caller has it already (checking many paths).
    """
    check_relative_path(name, where)
    current = folder
    for part in name.split("/"):
        current = current / part
        found = _lstat(current)
        if found is not None and stat.S_ISLNK(found.st_mode):
            raise BundleError(f"{where}: {current} is a symlink; a bundle holds no symlinks (it could point outside)")
    try:
        inside = current.resolve().is_relative_to(root or folder.resolve())
    except (OSError, RuntimeError) as err:
        raise BundleError(f"{where}: cannot resolve {current} ({err})") from None
    if not inside:
        raise BundleError(f"{where}: {name!r} resolves outside the bundle {folder}")
    return current


def write_target(folder: Path, name: str) -> Path:
    """``folder / name`` to write to: its folders are created as needed, and none of them nor the file is a symlink.

    ExportError (BundleError) names the path otherwise: a write must never land outside the bundle.
    """
    where = f"refusing to write {folder / name}"
    check_relative_path(name, where)
    current = folder
    for part in PurePosixPath(name).parts[:-1]:
        current = current / part
        if _lstat(current) is None:
            current.mkdir(exist_ok=True)
        found = _lstat(current)
        if found is None or not stat.S_ISDIR(found.st_mode):  # lstat: a symlink to a folder is no folder
            raise BundleError(f"{where}: {current} is a symlink or not a folder; it could lead outside the bundle")
    target = current / PurePosixPath(name).name
    found = _lstat(target)
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise BundleError(f"{where}: {target} exists and is a symlink or not a regular file")
    return bundle_path(folder, name, where)


def _lstat(path: Path) -> os.stat_result | None:
    """``os.lstat(path)``; None when nothing is there; BundleError for a path the system refuses."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise BundleError(f"cannot inspect {path} ({err.strerror or err})") from None


def _regular_file_stat(path: Path, missing: str) -> os.stat_result:
    found = _lstat(path)
    if found is None:
        raise BundleError(missing)
    if not stat.S_ISREG(found.st_mode):
        raise BundleError(f"{path} is not a regular file; export the bundle again")
    return found


# ---------------------------------------------------------------------------------------- files


def check_files(folder: Path, manifest: Mapping[str, Any], names: Iterable[str] | None = None) -> None:
    """BundleError unless each file ``names`` (default: every listed file) is in ``folder`` as the manifest records.

    All sizes are compared before any file is hashed, so a file of the wrong size costs no read.
    """
    files = manifest["files"]
    wanted = sorted(files if names is None else names)
    where = str(folder / MANIFEST_FILE)
    problems, sized, root = [], [], folder.resolve()
    for name in wanted:
        if name not in files:
            problems.append(f"{name} is not listed in files")
            continue
        path = bundle_path(folder, name, where, root)
        found = _lstat(path)
        if found is None:
            problems.append(f"{name} is missing")
        elif not stat.S_ISREG(found.st_mode):
            problems.append(f"{name} is not a regular file")
        elif found.st_size != files[name]["bytes"]:
            problems.append(f"{name} differs from the manifest ({found.st_size} bytes, not {files[name]['bytes']})")
        else:
            sized.append((name, path))
    if not problems:
        problems = [
            f"{name} differs from the manifest (sha256)" for name, path in sized if not _matches(path, files[name])
        ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BundleError(f"the bundle {folder} was changed after export ({shown}); export it again")


def read_verified(folder: Path, manifest: Mapping[str, Any], name: str, max_bytes: int) -> bytes:
    """The bytes of the listed file ``name``, after its size and sha256 matched the manifest (read once)."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise BundleError(f"{folder / MANIFEST_FILE} does not list {name} in files, so it cannot be verified")
    if entry["bytes"] > max_bytes:
        raise BundleError(
            f"{folder / name}: the manifest records {entry['bytes']} bytes, more than the {max_bytes} allowed"
        )
    path = bundle_path(folder, name, str(folder / MANIFEST_FILE))
    with _open_regular(path) as handle:
        data = handle.read(entry["bytes"] + 1)  # one more: a file that grew since the size check shows it
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(
            f"the bundle {folder} was changed after export ({name} differs from the manifest); export it again"
        )
    return data


def read_json(folder: Path, manifest: Mapping[str, Any], name: str) -> Any:
    """The JSON value of the listed file ``name``, verified (``read_verified``) and read with depth limits."""
    data = read_verified(folder, manifest, name, MAX_JSON_BYTES)
    try:
        return jsonsafe.loads(data, what=str(folder / name), max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH)
    except JsonInputError as err:
        raise BundleError(f"{err}; export the bundle again") from None


def read_report(folder: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's report.json, verified against the manifest and read with size and depth limits."""
    report = read_json(folder, manifest, REPORT_FILE)
    if not isinstance(report, dict) or not isinstance(report.get("adapters", {}), dict):
        raise BundleError(f"{folder / REPORT_FILE} must be an object whose adapters is an object, got {show(report)}")
    return report


def _open_regular(path: Path) -> Any:
    """``path`` opened for reading without following a symlink or blocking on a FIFO; BundleError if irregular."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise BundleError(f"cannot open {path} ({err.strerror or err}); export the bundle again") from None
    handle = os.fdopen(descriptor, "rb")
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        handle.close()
        raise BundleError(f"{path} is not a regular file; export the bundle again")
    return handle


def _matches(path: Path, entry: Mapping[str, Any]) -> bool:
    """Whether ``path`` has the recorded size and sha256, read in 1 MiB chunks (graphs are tens of MB)."""
    digest, size = hashlib.sha256(), 0
    with _open_regular(path) as handle:
        while size <= entry["bytes"] and (chunk := handle.read(_READ_CHUNK)):
            digest.update(chunk)
            size += len(chunk)
    return size == entry["bytes"] and digest.hexdigest() == entry["sha256"]


# -------------------------------------------------------------------------------------- adapters


def check_adapter_fits(session: ort.InferenceSession, adapter_path: Path) -> None:
    """BundleError unless the adapter file sets exactly the graph's per-user inputs, with their shapes and dtypes.

    A swappable graph's per-user inputs default to zeros, so an adapter that leaves one out would
    run on a zero tensor without any error from ONNX Runtime.
    """
    # ONNX Runtime lists inputs that have an initializer apart from the required ones.
    expected = {i.name: (list(i.shape), i.type) for i in session.get_overridable_initializers()}
    try:
        parameters = ort.AdapterFormat.read_adapter(str(adapter_path)).get_parameters()
        tensors = {name: (list(value.shape()), value.data_type()) for name, value in parameters.items()}
    except ORT_ERRORS as err:
        raise BundleError(f"{adapter_path} is not an ONNX Runtime adapter file ({str(err)[-200:]})") from None
    problems = [f"missing {name}" for name in sorted(set(expected) - set(tensors))]
    problems += [f"unknown {name}" for name in sorted(set(tensors) - set(expected))]
    for name in sorted(set(expected) & set(tensors)):
        if tensors[name] != expected[name]:
            (shape, dtype), (want_shape, want_dtype) = tensors[name], expected[name]
            problems.append(f"{name}: {dtype}{shape}, graph wants {want_dtype}{want_shape}")
    if problems:
        raise BundleError(
            f"{adapter_path.name} does not fit the graph's per-user inputs: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )
