"""Which tests start Flower, seen as it happens: every test that does must carry ``@pytest.mark.slow``.

``scripts/test`` runs ``-m "not slow"`` first and ``-m slow`` after it. A test that starts a SuperLink,
SuperNode, ``flwr``, Ray or ``fedadapt serve|simulate|node`` without the marker would slow the fast set
down unnoticed, so conftest.py installs ``FlowerStarts.audit`` as an audit hook: Python raises a
``subprocess.Popen`` audit event for every process started, from the test or from the library code it
calls, and a test that started Flower without the marker fails at teardown, naming the command.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FLOWER_PROGRAMS = frozenset(
    {
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flower-simulation",
        "flwr",
        "flwr-serverapp",
        "flwr-clientapp",
        "flwr-simulation",
        "raylet",  # Ray, as Flower's simulation engine starts it
        "gcs_server",
    }
)
FEDADAPT_FLOWER_COMMANDS = frozenset({"serve", "simulate", "node"})  # the CLI commands that start Flower


def flower_command(args: Any) -> str | None:
    """The command line if ``args`` (as given to Popen) starts a Flower process, else None."""
    if isinstance(args, (str, bytes, os.PathLike)):
        parts = [os.fsdecode(args)]
    elif isinstance(args, Sequence):
        parts = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return None
    if not parts:
        return None
    line = " ".join(parts)
    if Path(parts[0]).name in FLOWER_PROGRAMS:
        return line
    # `fedadapt serve ...` or `python -m fedadapt.cli serve ...`: the first word that is not an option.
    if Path(parts[0]).name == "fedadapt":
        rest = parts[1:]
    elif "-m" in parts and parts.index("-m") + 1 < len(parts) and parts[parts.index("-m") + 1] == "fedadapt.cli":
        rest = parts[parts.index("-m") + 2 :]
    else:
        return None
    command = next((word for word in rest if not word.startswith("-")), None)
    return line if command in FEDADAPT_FLOWER_COMMANDS else None


class FlowerStarts:
    """The Flower processes started while the current test ran (setup, call and teardown)."""

    def __init__(self) -> None:
        self.test: str | None = None
        self.started: list[str] = []

    def begin(self, nodeid: str) -> None:
        self.test, self.started = nodeid, []

    def end(self) -> None:
        self.test = None

    def take(self) -> list[str]:
        started, self.started = self.started, []
        return started

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        """An audit hook (sys.addaudithook): note a Flower process started during a test."""
        if event != "subprocess.Popen" or self.test is None:
            return
        command = flower_command(args[1]) or flower_command(args[0])
        if command is not None:
            self.started.append(command)

    def complaint(self, nodeid: str, marked_slow: bool) -> str | None:
        """Why the test fails, when it started Flower without ``@pytest.mark.slow``; None when it is fine."""
        if marked_slow or not self.started:
            return None
        shown = self.started[0] if len(self.started[0]) <= 200 else self.started[0][:197] + "..."
        return (
            f"{nodeid} started Flower ({len(self.started)} process(es), the first: {shown}) but is not marked "
            "slow: add @pytest.mark.slow (or pytestmark = pytest.mark.slow for a whole module) so that "
            '`scripts/test` runs it in the slow set, after `-m "not slow"`'
        )


GUARD = FlowerStarts()
