"""Loading text-classification data from files, folders and saved data sets; the label map."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedadapt.data.dataset import TextDataset
from fedadapt.data.label_map import LabelMap
from fedadapt.data.readers import load_text_dataset
from fedadapt.errors import DataError

BANKING77 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "banking77"


def write_json_lines(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


RECORDS: list[dict[str, object]] = [
    {"text": "where is my card", "label": "card_arrival", "user_id": "u1"},
    {"text": "send money", "label": "transfer", "user_id": "u2"},
]


def test_csv_with_crlf_and_quoted_line_breaks(tmp_path: Path) -> None:
    file = tmp_path / "data.csv"
    file.write_bytes(
        b'text,category\r\nplain text,a\r\n"two\r\nlines, and a comma",b\r\n"she said ""hi""\nthen left",a\r\n'
    )
    data = load_text_dataset(file)
    assert data.texts == ("plain text", "two\r\nlines, and a comma", 'she said "hi"\nthen left')
    assert data.labels == ("a", "b", "a")
    assert data.user_ids is None
    assert data.source == str(file)


def test_csv_row_with_extra_field_names_line(tmp_path: Path) -> None:
    file = tmp_path / "data.csv"
    file.write_text("text,label\nok,a\nnot, quoted,b\n")
    with pytest.raises(DataError, match=r"data\.csv line 3 has 3 fields"):
        load_text_dataset(file)


def test_json_list_json_lines_and_jsonl(tmp_path: Path) -> None:
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(RECORDS, indent=2))
    as_lines = write_json_lines(tmp_path / "lines.json", RECORDS)
    as_jsonl = write_json_lines(tmp_path / "lines.jsonl", RECORDS)
    for file in (as_list, as_lines, as_jsonl):
        data = load_text_dataset(file)
        assert data.texts == ("where is my card", "send money")
        assert data.labels == ("card_arrival", "transfer")
        assert data.user_ids == ("u1", "u2")


def test_integer_json_labels_become_strings(tmp_path: Path) -> None:
    file = write_json_lines(tmp_path / "d.jsonl", [{"sentence": "a b", "label": 3}, {"sentence": "c", "label": 0}])
    assert load_text_dataset(file).labels == ("3", "0")


def test_column_detection_and_overrides(tmp_path: Path) -> None:
    only_other = write_json_lines(tmp_path / "a.jsonl", [{"utterance": "hi", "tag": "greet", "client_id": 7}])
    data = load_text_dataset(only_other)
    assert (data.texts, data.labels, data.user_ids) == (("hi",), ("greet",), ("7",))
    named = write_json_lines(tmp_path / "b.jsonl", [{"body": "hi", "text": "x", "intent": "i", "y": "greet"}])
    data = load_text_dataset(named, text_column="body", label_column="y")
    assert (data.texts, data.labels) == (("hi",), ("greet",))
    assert load_text_dataset(named).labels == ("i",)


def test_folder_with_train_and_test_files(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\ntrain one,a\ntrain two,b\n")
    write_json_lines(tmp_path / "test.jsonl", [{"text": "test one", "label": "a"}])
    assert load_text_dataset(tmp_path).texts == ("train one", "train two")
    assert load_text_dataset(tmp_path, split="train").source == str(tmp_path / "train.csv")
    assert load_text_dataset(tmp_path, split="test").texts == ("test one",)
    with pytest.raises(DataError, match="split must be one of"):
        load_text_dataset(tmp_path, split="validation")
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(DataError, match=r"has no test file: expected one of test\.csv"):
        load_text_dataset(tmp_path, split="test")


def test_saved_hugging_face_dataset_with_class_labels(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict({"sentence": ["bad", "good", "fine"], "label": [0, 1, 1]}, features=features)
    test = datasets.Dataset.from_dict({"sentence": ["meh"], "label": [0]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))
    train.save_to_disk(str(tmp_path / "single"))

    data = load_text_dataset(tmp_path / "dict")
    assert data.texts == ("bad", "good", "fine")
    assert data.labels == ("neg", "pos", "pos")
    assert load_text_dataset(tmp_path / "dict", split="test").labels == ("neg",)
    assert load_text_dataset(tmp_path / "single").labels == ("neg", "pos", "pos")
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are \['test', 'train'\]"):
        load_text_dataset(tmp_path / "dict", split="validation")


def test_hub_id_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'someone/data' is no local file or folder.*OfflineModeIsEnabled"):
        load_text_dataset("someone/data")


@pytest.mark.skipif(not BANKING77.is_dir(), reason=f"Banking77 is not checked out at {BANKING77}")
def test_banking77_loads_as_is() -> None:
    train = load_text_dataset(BANKING77, split="train")
    test = load_text_dataset(BANKING77, split="test")
    labels = LabelMap.from_file(BANKING77 / "categories.json")
    assert (len(train), len(test), len(labels)) == (10003, 3080, 77)
    assert set(train.labels) == set(test.labels) == set(labels.names)
    counts = Counter(train.labels)
    assert (min(counts.values()), max(counts.values())) == (35, 187)
    assert set(Counter(test.labels).values()) == {40}
    assert len(labels.encode(test.labels, source=test.source)) == 3080
    assert any("\n" in text for text in train.texts)  # quoted fields with line breaks survive


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("data.txt", "text,label\na,b\n", "unsupported extension '.txt'"),
        ("data.csv", "", "is empty"),
        ("data.csv", "text,label\r\n", "has no rows"),
        ("data.json", "[]", "has no rows"),
        ("data.jsonl", '{"text": "a", "label": "b"}\n{"text": \n', "line 2 is not a JSON object"),
        ("data.csv", "body,label,extra\na,b,c\n", r"no text column: expected one of \['text', 'sentence'"),
        ("data.csv", "text,a,b\nx,1,2\n", "no label column"),
        ("data.csv", "text,label\n  ,a\nok,b\n,c\n", "2 of 3 rows have an empty text in column 'text'"),
        ("data.csv", "text,label\nok,\n", "1 of 1 rows have an empty label"),
    ],
)
def test_bad_files_raise_data_error_naming_the_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        load_text_dataset(file)
    assert str(file) in str(caught.value)


def test_missing_named_column_lists_the_columns(tmp_path: Path) -> None:
    file = tmp_path / "data.csv"
    file.write_text("text,label\na,b\n")
    with pytest.raises(DataError, match=r"data\.csv has no label column 'intent'; its columns are \['text', 'label'\]"):
        load_text_dataset(file, label_column="intent")


def test_missing_path_and_split_on_a_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv does not exist"):
        load_text_dataset(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="missing-folder does not exist"):
        load_text_dataset(tmp_path / "missing-folder")
    file = tmp_path / "data.csv"
    file.write_text("text,label\na,b\n")
    with pytest.raises(DataError, match="single file, so split='test' does not apply"):
        load_text_dataset(file, split="test")


def test_label_map_round_trip() -> None:
    labels = LabelMap.from_labels(["b", "a", "c", "a"])
    assert labels.names == ("a", "b", "c")
    assert [labels.name_of(labels.id_of(name)) for name in labels.names] == ["a", "b", "c"]
    assert labels.encode(["c", "a", "c"]) == [2, 0, 2]
    with pytest.raises(DataError, match=r"class id must be in \[0, 3\)"):
        labels.name_of(3)
    with pytest.raises(DataError, match="repeated: \\['x'\\]"):
        LabelMap(names=("x", "y", "x"))


def test_unknown_label_names_label_and_file(tmp_path: Path) -> None:
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps(["card_lost", "top_up"]))
    labels = LabelMap.from_file(categories)
    assert labels.names == ("card_lost", "top_up")
    data = TextDataset(texts=("x", "y"), labels=("card_lost", "refund"), source="clients/test.csv")
    with pytest.raises(DataError, match=r"clients/test\.csv has 1 rows with labels not in the label map of .*"):
        labels.encode(data.labels, source=data.source)
    with pytest.raises(DataError, match=r"\['refund'\]"):
        labels.encode(data.labels, source=data.source)
    with pytest.raises(DataError, match="label 'refund' is not one of the 2 labels"):
        labels.id_of("refund")


def test_label_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"label file .*missing\.json does not exist"):
        LabelMap.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(DataError, match=r"bad\.json must hold a JSON list of label names, got a dict"):
        LabelMap.from_file(bad)


def test_text_dataset_rejects_unequal_columns() -> None:
    with pytest.raises(DataError, match="unequal length"):
        TextDataset(texts=("a", "b"), labels=("x",))
