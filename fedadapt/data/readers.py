"""Reading text-classification data: CSV, JSON, JSON lines, ``save_to_disk`` folders and Hugging Face data sets.

Files are read with bounds, so a wrong or hostile file fails as a DataError naming it instead of filling
memory or the stack: a data file holds at most MAX_DATA_FILE_BYTES (Banking77's train.csv is 0.8 MB),
a JSON lines row at most MAX_RECORD_BYTES, JSON nests at most RECORD_DEPTH levels (a file's array of
objects is 2), and a label file holds at most MAX_LABELS names in MAX_LABEL_FILE_BYTES.

The bound is on bytes, not rows: a file of MAX_DATA_FILE_BYTES of one-word rows becomes tens of millions
of Python strings (several GB). A ``save_to_disk`` folder or a hub data set is not capped at all: datasets
memory-maps its Arrow files, but every column is then read into Python lists (``to_dict``), so the whole
set must fit in memory. Data is the operator's own (a scenario's, a device's), not sent by a peer.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedadapt import jsonsafe
from fedadapt.config_values import expand_user
from fedadapt.data.dataset import TextDataset
from fedadapt.errors import DataError, JsonInputError

if TYPE_CHECKING:
    import datasets

TEXT_COLUMNS = ("text", "sentence", "utterance")


LABEL_COLUMNS = ("label", "category", "intent")


USER_COLUMNS = ("user_id", "user", "client_id")


FILE_SUFFIXES = (".csv", ".jsonl", ".json")


SPLITS = ("train", "test")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


MAX_DATA_FILE_BYTES = 512 * 1024 * 1024  # one CSV/JSON/JSONL file, read whole: 600x Banking77's train.csv


MAX_RECORD_BYTES = 1024 * 1024  # one JSON lines row: an example's text, label and user id


RECORD_DEPTH = 8  # a JSON data file's array of row objects is 2 levels; values get 6 more


@dataclass(frozen=True)
class _Table:
    """Columns as read from a source, before the text, label and user columns are chosen."""

    columns: dict[str, list[Any]]
    source: str
    class_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)


def load_text_dataset(
    path: str | Path,
    *,
    split: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> TextDataset:
    """Load a text-classification data set from a file, a folder or, when online, the hub.

    ``path`` is a CSV, JSON (a list of objects or one object per line) or JSONL file; a folder
    with ``train``/``test`` files of those kinds; a folder written by ``datasets``'
    ``save_to_disk``; or, when it is no local path, a Hugging Face hub id. ``split`` picks
    ``train`` (the default) or ``test`` in folders and hub data sets. The text column is the
    first of ``text``/``sentence``/``utterance``, the label column the first of
    ``label``/``category``/``intent`` or else the only other column, and a
    ``user_id``/``user``/``client_id`` column gives the user ids; the arguments override.
    """
    return _to_dataset(_read_table(path, split), text_column, label_column)


def _read_table(path: str | Path, split: str | None) -> _Table:
    local = expand_user(path, "the data path", DataError)
    if local.is_file():
        if split is not None:
            raise DataError(
                f"{local} is a single file, so split={split!r} does not apply: pass a folder to pick a split"
            )
        return _read_file(local)
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            return _read_saved_dataset(local, split)
        return _read_file(_split_file(local, split or "train"))
    if _looks_like_hub_id(str(path)):
        return _read_hub_dataset(str(path), split)
    raise DataError(
        f"{local} does not exist: pass a CSV, JSON or JSONL file, a folder with train/test files, "
        "a folder written by datasets' save_to_disk, or a hub id"
    )


def _looks_like_hub_id(name: str) -> bool:
    return _HUB_ID.fullmatch(name) is not None and not name.lower().endswith(FILE_SUFFIXES)


def _split_file(folder: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS} for the folder {folder}, got {split!r}")
    found = [folder / f"{split}{suffix}" for suffix in FILE_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if not found:
        names = ", ".join(f"{split}{suffix}" for suffix in FILE_SUFFIXES)
        raise DataError(f"folder {folder} has no {split} file: expected one of {names}")
    if len(found) > 1:
        raise DataError(f"folder {folder} has several {split} files ({[f.name for f in found]}): keep one")
    return found[0]


def _read_file(file: Path) -> _Table:
    suffix = file.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{file} has the unsupported extension {file.suffix!r}: use one of {FILE_SUFFIXES}")
    try:
        with file.open("rb") as stream:  # bytes, so line breaks inside quoted CSV fields stay as they are
            raw = stream.read(MAX_DATA_FILE_BYTES + 1)
    except OSError as err:
        raise DataError(f"{file} cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_DATA_FILE_BYTES:
        raise DataError(
            f"{file} is larger than the {MAX_DATA_FILE_BYTES} bytes a CSV/JSON/JSONL data file may have: "
            "save larger data with datasets' save_to_disk and pass that folder (not capped, but read whole: "
            "it must fit in memory)"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{file} is not UTF-8 text: {err}") from None
    del raw
    if not text.strip():
        raise DataError(f"{file} is empty: it has no header and no rows")
    table = _parse_csv(text, file) if suffix == ".csv" else _parse_json(text, file, lines=suffix == ".jsonl")
    if not any(table.columns.values()):
        raise DataError(f"{file} has no rows of data")
    return table


def _parse_csv(text: str, file: Path) -> _Table:
    # The csv module handles CRLF line ends and quoted fields that hold line breaks.
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
        _check_header(header, file)
        columns: dict[str, list[Any]] = {name: [] for name in header}
        for row in reader:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(
                    f"{file} line {reader.line_num} has {len(row)} fields but the header has {len(header)}: "
                    "quote fields that contain commas"
                )
            for name, value in zip(header, row, strict=True):
                columns[name].append(value)
    except csv.Error as err:
        raise DataError(f"{file} is not valid CSV near line {reader.line_num}: {err}") from err
    return _Table(columns=columns, source=str(file))


def _check_header(header: list[str], file: Path) -> None:
    repeated = sorted(name for name, count in Counter(header).items() if count > 1)
    if repeated or not all(header):
        raise DataError(f"{file} needs a header row of unique, non-empty column names, got {header!r}")


def _parse_json(text: str, file: Path, *, lines: bool) -> _Table:
    if not lines and text.lstrip().startswith("["):
        try:
            records = jsonsafe.loads(text, what=str(file), max_bytes=MAX_DATA_FILE_BYTES, max_depth=RECORD_DEPTH)
        except JsonInputError as err:
            raise DataError(f"{err}: a JSON data file must hold a list of row objects") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                what = f"{file} line {number}"
                records.append(jsonsafe.loads(line, what=what, max_bytes=MAX_RECORD_BYTES, max_depth=RECORD_DEPTH))
            except JsonInputError as err:
                reason = str(err).removeprefix(f"{what}: ")
                raise DataError(
                    f"{file} line {number} is not a JSON object ({reason}): "
                    "a JSON file must hold a list of objects or one object per line"
                ) from None
    return _Table(columns=_records_to_columns(records, file), source=str(file))


def _records_to_columns(records: list[Any], file: Path) -> dict[str, list[Any]]:
    names: dict[str, None] = {}  # column names in first-seen order
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{file} row {number} is a {type(record).__name__}, not an object of column values")
        names.update(dict.fromkeys(record))
    return {name: [record.get(name) for record in records] for name in names}


def _read_saved_dataset(folder: Path, split: str | None) -> _Table:
    import datasets  # about a second (pyarrow, pandas): only for save_to_disk folders and hub ids, not plain files

    try:
        saved = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as err:
        raise DataError(f"could not load the saved data set {folder}: {err}") from err
    if isinstance(saved, datasets.DatasetDict):
        name = split or "train"
        if name not in saved:
            raise DataError(f"saved data set {folder} has no split {name!r}; its splits are {sorted(saved)}")
        return _table_from_hf(saved[name], f"{folder} [{name}]")
    if split is not None:
        raise DataError(f"saved data set {folder} is a single Dataset, so split={split!r} does not apply")
    return _table_from_hf(saved, str(folder))


def _read_hub_dataset(name: str, split: str | None) -> _Table:
    import datasets  # heavy: see _read_saved_dataset

    chosen = split or "train"
    try:
        loaded = datasets.load_dataset(name, split=chosen)
    except (OSError, ValueError) as err:
        raise DataError(
            f"{name!r} is no local file or folder, and loading it as a Hugging Face hub data set failed: {err}. "
            "Check the path, or go online (and unset HF_DATASETS_OFFLINE) to use a hub id."
        ) from err
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"hub data set {name!r} split {chosen!r} is a {type(loaded).__name__}, not a Dataset")
    return _table_from_hf(loaded, f"hub:{name} [{chosen}]")


def _table_from_hf(dataset: datasets.Dataset, source: str) -> _Table:
    import datasets  # heavy: see _read_saved_dataset

    if dataset.num_rows == 0:
        raise DataError(f"{source} has no rows")
    class_labels = {
        name: tuple(feature.names)
        for name, feature in dataset.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    return _Table(columns=dataset.to_dict(), source=source, class_labels=class_labels)


def _to_dataset(table: _Table, text_column: str | None, label_column: str | None) -> TextDataset:
    text = _choose_column(table, "text", text_column, TEXT_COLUMNS, exclude=())
    user = next((name for name in USER_COLUMNS if name in table.columns and name != text), None)
    label = _choose_column(table, "label", label_column, LABEL_COLUMNS, exclude=(text, user))
    user_ids = None if user is None else _strings(table, user, "user id")
    return TextDataset(
        texts=_strings(table, text, "text"),
        labels=_strings(table, label, "label"),
        user_ids=user_ids,
        source=table.source,
    )


def _choose_column(
    table: _Table, role: str, explicit: str | None, candidates: tuple[str, ...], exclude: tuple[str | None, ...]
) -> str:
    existing = list(table.columns)
    if explicit is not None:
        if explicit not in table.columns:
            raise DataError(f"{table.source} has no {role} column {explicit!r}; its columns are {existing}")
        return explicit
    found = next((name for name in candidates if name in table.columns and name not in exclude), None)
    if found is not None:
        return found
    others = [name for name in existing if name not in exclude]
    if role == "label" and len(others) == 1:
        return others[0]
    raise DataError(
        f"{table.source} has no {role} column: expected one of {list(candidates)} among its columns {existing}; "
        f"pass {role}_column= to name it"
    )


def _strings(table: _Table, column: str, role: str) -> tuple[str, ...]:
    names = table.class_labels.get(column)
    values = [_as_string(value, names) for value in table.columns[column]]
    empty = [row for row, value in enumerate(values, start=1) if not value.strip()]
    if empty:
        raise DataError(
            f"{table.source}: {len(empty)} of {len(values)} rows have an empty {role} in column {column!r} "
            f"(first at data row {empty[0]}); remove or fill them"
        )
    return tuple(values)


def _as_string(value: Any, class_names: tuple[str, ...] | None) -> str:
    if value is None:
        return ""
    if class_names is not None and isinstance(value, int):
        # A Hugging Face ClassLabel stores ids; -1 marks an unlabeled row.
        return class_names[value] if 0 <= value < len(class_names) else ""
    return value if isinstance(value, str) else str(value)
