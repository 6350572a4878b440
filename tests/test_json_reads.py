"""One JSON reader (issue 17): every JSON file or payload the project reads goes through ``fedadapt.jsonsafe``.

The stdlib parsers recurse once per nesting level, so ``[[[[...]]]]`` a few thousand deep raised RecursionError,
which no caller caught, from the data reader, the label map, the pooling settings, a device's kept split, the
gateway's signatures and the runner's metrics. The AST test keeps the rule; the others attack each reader.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fedadapt.data import readers as data_module
from fedadapt.data.dataset import TextDataset
from fedadapt.data.label_map import MAX_LABEL_FILE_BYTES, MAX_LABELS, LabelMap
from fedadapt.data.partition import ClientSplit
from fedadapt.data.readers import load_text_dataset
from fedadapt.errors import ConfigError, DataError
from fedadapt.fleet.device_data import cached_device_data, device_data_path
from fedadapt.model.pooling import read_sentence_transformers_pooling

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("fedadapt", "clients", "server", "deploy", "simulations", "export")
# (file, module) pairs allowed to call a parser: the bounded JSON reader, and the scenario loader's TOML parse,
# which bounds the file's size and turns the parser's RecursionError into a ConfigError.
ALLOWED = {("fedadapt/jsonsafe.py", "json"), ("fedadapt/fleet/scenario_file.py", "tomllib")}
PARSERS = {"json": {"load", "loads", "JSONDecoder"}, "tomllib": {"load", "loads"}}
DEEP = 50_000  # far past the interpreter's recursion limit


def _deep(opening: str = "[", closing: str = "]") -> str:
    return opening * DEEP + closing * DEEP


# --- the rule ------------------------------------------------------------------------------------------------


def _parser_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each use of a stdlib JSON/TOML parser: ``json.loads``, ``from json import load``, ..."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> parser module
    functions: dict[str, str] = {}  # local name -> "module.function"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in PARSERS:
                    modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in PARSERS:
            for alias in node.names:
                if alias.name in PARSERS[node.module] or alias.name == "*":
                    functions[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            if node.attr in PARSERS[module]:
                uses.append((node.lineno, f"{module}.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in functions:
            uses.append((node.lineno, functions[node.id]))
    for name, what in functions.items():
        if what.endswith(".*"):
            uses.append((0, f"from {what.split('.')[0]} import * (brings {name})"))
    return uses


def _python_files() -> list[Path]:
    return sorted(f for folder in SCANNED for f in (PROJECT_ROOT / folder).rglob("*.py"))


def test_the_rule_finds_every_spelling() -> None:
    source = (
        "import json\nimport json as j\nfrom json import loads as parse\nimport tomllib\n"
        "a = json.loads(b)\nc = j.load(f)\nd = parse(e)\ng = tomllib.loads(h)\nk = json.JSONDecoder\n"
        "json.dumps(x)\n"
    )
    assert sorted(what for _, what in _parser_uses(source)) == [
        "json.JSONDecoder", "json.load", "json.loads", "json.loads", "tomllib.loads",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "file", _python_files(), ids=lambda f: str(f.relative_to(PROJECT_ROOT))
)  # fmt: skip
def test_no_module_parses_json_but_jsonsafe(file: Path) -> None:
    """Fails for export/* and fedadapt/checkpoint/folder.py until their own conversions (issue 17) land."""
    relative = file.relative_to(PROJECT_ROOT).as_posix()
    uses = [
        f"line {line}: {what}"
        for line, what in _parser_uses(file.read_text(encoding="utf-8"))
        if (relative, what.split(".")[0]) not in ALLOWED
    ]
    assert not uses, f"{relative} parses JSON/TOML itself ({uses}): use fedadapt.jsonsafe.loads/load_file"


# --- data files -----------------------------------------------------------------------------------------------


def test_a_deeply_nested_jsonl_line_is_a_data_error(tmp_path: Path) -> None:
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "a", "label": "b"}\n{"text": "c", "label": ' + _deep() + "}\n")
    with pytest.raises(DataError, match=r"data\.jsonl line 2 is not a JSON object \(JSON nested 50001 levels"):
        load_text_dataset(file)


def test_an_oversized_jsonl_line_is_a_data_error(tmp_path: Path) -> None:
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "' + "a" * (2 * 1024 * 1024) + '", "label": "b"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl line 1 is not a JSON object \(2097\d+ bytes of JSON, more"):
        load_text_dataset(file)


def test_a_deeply_nested_json_records_file_is_a_data_error(tmp_path: Path) -> None:
    file = tmp_path / "data.json"
    file.write_text('[{"text": "a", "label": ' + _deep('{"x": ', "}").replace("}}", "1}}", 1) + "}]")
    with pytest.raises(DataError, match=r"data\.json: JSON nested \d+ levels deep, more than the 8 allowed"):
        load_text_dataset(file)


def test_records_nested_to_the_limit_still_load(tmp_path: Path) -> None:
    file = tmp_path / "data.json"
    nested = "[" * 6 + "1" + "]" * 6  # 2 levels for the file's array and row object, 6 for a value
    file.write_text(f'[{{"text": "a", "label": "b", "extra": {nested}}}, {{"text": "c", "label": "d"}}]')
    assert load_text_dataset(file).labels == ("b", "d")


def test_an_oversized_data_file_is_refused_before_it_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_module, "MAX_DATA_FILE_BYTES", 1000)
    file = tmp_path / "data.csv"
    file.write_text("text,label\n" + "some text,a\n" * 100)
    with pytest.raises(DataError, match=r"data\.csv is larger than the 1000 bytes .* save_to_disk"):
        load_text_dataset(file)


# --- label files ----------------------------------------------------------------------------------------------


def test_a_deeply_nested_label_file_is_a_data_error(tmp_path: Path) -> None:
    file = tmp_path / "labels.json"
    file.write_text(_deep())
    with pytest.raises(DataError, match=r"label file .*labels\.json: JSON nested 50000 levels deep"):
        LabelMap.from_file(file)


def test_a_huge_label_file_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    file = tmp_path / "labels.json"
    names = [f"label-{i:07d}" for i in range(MAX_LABEL_FILE_BYTES // 12)]
    file.write_text(json.dumps(names))
    assert file.stat().st_size > MAX_LABEL_FILE_BYTES
    with pytest.raises(DataError, match=rf"labels\.json: more than the {MAX_LABEL_FILE_BYTES} bytes"):
        LabelMap.from_file(file)


def test_a_label_map_of_too_many_names_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "labels.json"
    file.write_text(json.dumps([str(i) for i in range(MAX_LABELS + 1)]))  # small enough in bytes
    with pytest.raises(DataError, match=rf"at most {MAX_LABELS} labels \(from .*labels\.json\), got {MAX_LABELS + 1}"):
        LabelMap.from_file(file)


def test_the_banking77_label_file_still_loads() -> None:
    file = PROJECT_ROOT.parent / "shared" / "data" / "banking77" / "categories.json"
    if not file.is_file():
        pytest.skip("no ../shared/data/banking77")
    assert len(LabelMap.from_file(file)) == 77


# --- a backbone's pooling settings ----------------------------------------------------------------------------


def _pooling_folder(tmp_path: Path, config: str, modules: str | None = None) -> Path:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(config)
    if modules is not None:
        (tmp_path / "modules.json").write_text(modules)
    return tmp_path


def test_a_deeply_nested_pooling_config_is_a_config_error(tmp_path: Path) -> None:
    folder = _pooling_folder(tmp_path, '{"pooling_mode_mean_tokens": ' + _deep() + "}")
    with pytest.raises(ConfigError, match=r"config\.json: JSON nested 50001 levels deep.*settings are damaged"):
        read_sentence_transformers_pooling(folder)


@pytest.mark.parametrize(
    ("config", "modules", "message"),
    [
        ("[]", None, r"config\.json must hold a JSON object of settings, got a list"),
        ('{"pooling_mode_mean_tokens": true}', _deep(), r"modules\.json: JSON nested 50000 levels deep"),
        ('{"pooling_mode_mean_tokens": true}', '["x"]', r"modules\.json must hold a JSON list of module objects"),
        ('{"pooling_mode_mean_tokens": tru', None, r"config\.json: not valid JSON"),
    ],
)
def test_damaged_pooling_settings_are_config_errors(
    tmp_path: Path, config: str, modules: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read_sentence_transformers_pooling(_pooling_folder(tmp_path, config, modules))


def test_sentence_transformers_settings_still_read(tmp_path: Path) -> None:
    modules = (
        '[{"type": "sentence_transformers.models.Transformer"}, {"type": "sentence_transformers.models.Normalize"}]'
    )
    config = read_sentence_transformers_pooling(
        _pooling_folder(tmp_path, '{"pooling_mode_mean_tokens": true}', modules)
    )
    assert config is not None and (config.mode, config.normalize) == ("mean", True)


# --- files the project wrote itself, read back ----------------------------------------------------------------


def test_a_deeply_nested_device_data_file_is_split_again(tmp_path: Path) -> None:
    """A damaged data-<id>.json on a device is recomputed, not a crash of every later round."""
    device_data_path(tmp_path, 0).write_text(_deep())
    data = TextDataset(texts=("a", "b"), labels=("x", "y"))
    split = ClientSplit(0, data.subset([0]), data.subset([1]), (0,), (1,))
    calls = []

    def compute() -> tuple[LabelMap, ClientSplit]:
        calls.append(1)
        return LabelMap(("x", "y")), split

    assert cached_device_data({"data": "synthetic"}, 0, tmp_path, compute) == (LabelMap(("x", "y")), split)
    assert calls == [1]
    assert cached_device_data({"data": "synthetic"}, 0, tmp_path, compute)[1] == split and calls == [1]


def test_a_deeply_nested_gateway_signature_file_is_a_value_error(tmp_path: Path) -> None:
    from deploy import gateway

    file = tmp_path / "verifications.json"
    file.write_text(_deep('{"a": ', "}").replace("}}", "1}}", 1))
    with pytest.raises(ValueError, match=r"verifications\.json: JSON nested 50000 levels deep"):
        gateway.load_verifications(file)


def test_a_deeply_nested_metrics_file_reads_as_not_yet_written(tmp_path: Path) -> None:
    from simulations.runner import read_metrics

    file = tmp_path / "metrics.json"
    file.write_text(_deep())
    assert read_metrics(file) == {}
    file.write_text('{"rounds": [{"round": 1}], "complete": true}')
    assert read_metrics(file) == {"rounds": [{"round": 1}], "complete": True}
    file.write_text("[1]")
    assert read_metrics(file) == {}
