"""The method registry: built-in methods register themselves, a user's own method registers the same way,
and the registry itself imports none of the methods."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from fedadapt.errors import ConfigError
from fedadapt.methods import (
    METHODS,
    AppliedMethod,
    config_to_dict,
    make_method_config,
    method_config_from_dict,
    register_method,
)
from fedadapt.methods import registry as registry_module

BUILT_IN = {
    "lora": "peft_methods",
    "ffa-lora": "peft_methods",
    "ia3": "peft_methods",
    "prompt": "peft_methods",
    "prefix": "peft_methods",
    "bitfit": "bitfit",
    "houlsby": "bottleneck",
    "pfeiffer": "bottleneck",
    "parallel": "bottleneck",
    "stack": "composition",
    "fusion": "composition",
    "full": "full",
    "head": "head",
}


@pytest.fixture
def registry() -> Iterator[dict[str, type]]:
    """METHODS as it was before the test, whatever the test registers."""
    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


def test_every_built_in_method_is_registered_by_its_own_module_in_the_listed_order() -> None:
    assert [(name, cls.__module__) for name, cls in METHODS.items()] == [
        (name, f"fedadapt.methods.{module}") for name, module in BUILT_IN.items()
    ]


def test_the_registry_imports_none_of_the_methods() -> None:
    tree = ast.parse(Path(registry_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name and name.startswith("fedadapt")} <= {
        "fedadapt.errors",
        "fedadapt.methods.base",
    }


@dataclass(frozen=True)
class _HeadOnlyConfig:
    """A user's own method: train the classifier head and nothing else."""

    name: ClassVar[str] = "test-head-only"
    size_field: ClassVar[str | None] = None
    saves_peft_format: ClassVar[bool] = False
    label_smoothing: float = 0.0

    def apply(self, model):  # type: ignore[no-untyped-def]
        return AppliedMethod(module=model)


def test_a_method_of_ones_own_registers_like_the_built_in_ones(registry: dict[str, type]) -> None:
    assert register_method(_HeadOnlyConfig) is _HeadOnlyConfig  # usable as a class decorator
    assert registry["test-head-only"] is _HeadOnlyConfig
    config = make_method_config("test-head-only", label_smoothing=0.1)
    assert config == _HeadOnlyConfig(label_smoothing=0.1)
    assert method_config_from_dict(config_to_dict(config)) == config
    with pytest.raises(ConfigError, match="has no settings \\['r'\\]"):
        make_method_config("test-head-only", r=4)


def test_a_second_method_under_a_taken_name_is_refused(registry: dict[str, type]) -> None:
    @dataclass(frozen=True)
    class Impostor:
        name: ClassVar[str] = "lora"

    with pytest.raises(ConfigError, match="'lora' is already registered"):
        register_method(Impostor)
    assert registry["lora"].__name__ == "LoraConfig"
    assert register_method(registry["lora"]) is registry["lora"]  # registering the same class again: no change


def test_a_reloaded_module_registers_its_method_again(registry: dict[str, type]) -> None:
    register_method(_HeadOnlyConfig)

    @dataclass(frozen=True)
    class _HeadOnlyConfig_:  # what importlib.reload makes: a new class, same module and qualified name
        name: ClassVar[str] = "test-head-only"

    _HeadOnlyConfig_.__qualname__ = _HeadOnlyConfig.__qualname__
    assert register_method(_HeadOnlyConfig_) is _HeadOnlyConfig_
    assert registry["test-head-only"] is _HeadOnlyConfig_


def test_an_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="unknown method 'loraa'; choose one of \\['bitfit', 'ffa-lora'"):
        make_method_config("loraa")
