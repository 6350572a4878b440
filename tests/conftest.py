"""Shared fixtures (tiny random BERT folders built on the spot: no network, seconds) and the suite's rules.

- A test that starts Flower must be marked ``slow`` (flower_starts.py watches every process started).
- ``FEDADAPT_TEST_TIME_SCALE`` (waiting.py) scales every pytest-timeout limit as it scales the waits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flower_starts import GUARD
from tiny_bert import write_tiny_bert
from transformers import BertTokenizerFast
from waiting import TIME_SCALE_VARIABLE, time_scale

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT folder laid out like a sentence-transformers model (mean pooling, normalize)."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-st"), sentence_transformers=True)


@pytest.fixture(scope="session")
def tiny_bert_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain BERT folder (no pooling declaration: CLS pooling)."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-plain"), sentence_transformers=False)


@pytest.fixture
def batch(tiny_bert: Path) -> dict[str, torch.Tensor]:
    """A padded batch of three texts of different lengths, with labels."""
    tokenizer = BertTokenizerFast.from_pretrained(tiny_bert)
    texts = ["my card has not arrived yet", "top up", "why is my transfer declined"]
    encoded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    encoded["labels"] = torch.tensor([0, 1, 2])
    return encoded


# --- the slow marker and the time scale -------------------------------------------------------------------------

sys.addaudithook(GUARD.audit)  # for the whole session: audit hooks cannot be removed
SLOW_FAMILIES = ("simulation", "deployment")  # markers that name a kind of Flower run: each implies slow


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if any(item.get_closest_marker(name) for name in SLOW_FAMILIES) and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(
            f"marked {' or '.join(SLOW_FAMILIES)} but not slow (add @pytest.mark.slow): {', '.join(unmarked)}"
        )
    _scale_timeouts(config, items)


def _scale_timeouts(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Multiply each test's pytest-timeout limit (its marker's, else the configured one) by the time scale.

    Only ever lengthened: these are the backstop behind the waits, and a scale below 1 (to see a wait's
    report quickly) must not kill the test before the wait can report.
    """
    try:
        scale = time_scale()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    if scale <= 1:
        return
    configured = config.getoption("timeout", None) or os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout")
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            if configured:
                item.add_marker(pytest.mark.timeout(float(configured) * scale), append=False)
            continue
        kwargs = dict(marker.kwargs)
        base = kwargs.pop("timeout", None) if not marker.args else marker.args[0]
        if base:
            item.add_marker(pytest.mark.timeout(float(base) * scale, *marker.args[1:], **kwargs), append=False)


def pytest_report_header(config: pytest.Config) -> str:
    return f"{TIME_SCALE_VARIABLE}={time_scale():g} (scales the waits on Flower processes and the test timeouts)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    GUARD.begin(item.nodeid)  # before setup: a module fixture started for this test counts for it
    try:
        return (yield)
    finally:
        GUARD.end()


@pytest.fixture(autouse=True)
def flower_only_in_slow_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that started Flower without ``@pytest.mark.slow`` (at teardown, naming the command)."""
    yield
    complaint = GUARD.complaint(request.node.nodeid, request.node.get_closest_marker("slow") is not None)
    if complaint:
        pytest.fail(complaint, pytrace=False)
