"""The label map: label names in a fixed order, each one's row of the classifier head.

A label file is read with bounds: at most MAX_LABELS names in MAX_LABEL_FILE_BYTES, nested at most
LABEL_FILE_DEPTH levels, so a wrong or hostile file fails as a DataError naming it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedadapt import jsonsafe
from fedadapt.config_values import expand_user
from fedadapt.errors import DataError, JsonInputError

if TYPE_CHECKING:
    pass


MAX_LABELS = 100_000  # a label map's names: the head has one row per label (100k x 384 floats is 150 MB)


MAX_LABEL_FILE_BYTES = 8 * 1024 * 1024  # MAX_LABELS names of up to ~80 bytes each


LABEL_FILE_DEPTH = 2  # a list of strings is 1 level; a nested one is refused by the list check with its type


@dataclass(frozen=True)
class LabelMap:
    """The global label names ↔ class ids of a task; one map serves every client."""

    names: tuple[str, ...]
    source: str = ""
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f" (from {self.source})" if self.source else ""
        if not self.names:
            raise DataError(f"a label map needs at least one label{where}")
        if len(self.names) > MAX_LABELS:
            raise DataError(f"a label map may hold at most {MAX_LABELS} labels{where}, got {len(self.names)}")
        bad = [name for name in self.names if not isinstance(name, str) or not name.strip()]
        if bad:
            raise DataError(f"label names must be non-empty strings{where}, got {bad[:5]!r}")
        duplicates = sorted(name for name, count in Counter(self.names).items() if count > 1)
        if duplicates:
            raise DataError(f"label names must be unique{where}; repeated: {duplicates[:5]!r}")
        object.__setattr__(self, "_ids", {name: i for i, name in enumerate(self.names)})

    @classmethod
    def from_labels(cls, labels: Sequence[str], *, source: str = "") -> LabelMap:
        """The sorted unique labels: build it from the whole training set, never one client's."""
        return cls(names=tuple(sorted(set(labels))), source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> LabelMap:
        """A JSON list of label names, in the file's order (e.g. Banking77's ``categories.json``)."""
        file = expand_user(path, "the label file", DataError)
        if not file.is_file():
            raise DataError(f"label file {file} does not exist: pass a JSON file holding a list of label names")
        try:
            names = jsonsafe.load_file(
                file, what=f"label file {file}", max_bytes=MAX_LABEL_FILE_BYTES, max_depth=LABEL_FILE_DEPTH
            )
        except JsonInputError as err:
            raise DataError(f"{err}: it must hold a JSON list of label names") from None
        if not isinstance(names, list):
            raise DataError(f"label file {file} must hold a JSON list of label names, got a {type(names).__name__}")
        return cls(names=tuple(names), source=str(file))

    def __len__(self) -> int:
        return len(self.names)

    def id_of(self, name: str) -> int:
        """Class id of a label name."""
        if name not in self._ids:
            raise DataError(f"label {name!r} is not one of the {len(self)} labels{self._from()}")
        return self._ids[name]

    def name_of(self, label_id: int) -> str:
        """Label name of a class id."""
        if not 0 <= label_id < len(self.names):
            raise DataError(f"class id must be in [0, {len(self.names)}){self._from()}, got {label_id!r}")
        return self.names[label_id]

    def encode(self, labels: Sequence[str], *, source: str = "") -> list[int]:
        """Class ids of ``labels``; ``source`` (e.g. ``data.source``) names their file in errors."""
        unknown = Counter(label for label in labels if label not in self._ids)
        if unknown:
            raise DataError(
                f"{source or 'the data'} has {sum(unknown.values())} rows with labels not in the label map"
                f"{self._from()}: {sorted(unknown)[:5]!r}; build the map from the whole training set "
                "or from a categories file that lists every label"
            )
        return [self._ids[label] for label in labels]

    def _from(self) -> str:
        return f" of {self.source}" if self.source else ""
