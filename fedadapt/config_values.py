"""Values read from configuration (scenarios, run configs, manifests, command lines): ranges and paths.

Numeric ranges: one ``Bound`` per key, so the check, its error and the docs agree.

A scenario's numbers size allocations (clients, messages, batches), loops (rounds, steps) and sleeps
(timeouts): every one has a finite range, NaN and infinity are never in it, and ``check`` names the
key, the value and the range, e.g. "scenario key 'num-clients' must be an integer in [1, 100000], got 0".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedadapt.errors import ConfigError, FedAdaptError


@dataclass(frozen=True)
class Bound:
    """The values a numeric key accepts: ``kind`` ints (bools refused) or finite floats (ints accepted too)
    from ``low`` to ``high``; an open end excludes that end ("(0, 86400]")."""

    kind: Literal["int", "float"]
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        )

    def contains(self, value: object) -> bool:
        """Whether ``value`` has the right type and lies in the range (never true for NaN or infinity)."""
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else int | float):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # ints are exact, however large
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        return above_low and below_high

    def check(self, key: str, value: object, *, where: str = "scenario key") -> None:
        """ConfigError naming ``key``, ``value`` and the range unless ``value`` is in it."""
        if not self.contains(value):
            what = "an integer" if self.kind == "int" else "a finite number"
            raise ConfigError(f"{where} {key!r} must be {what} in {self}, got {value!r}")


def _number(value: float) -> str:
    """1000000 and 86400 as written in TOML; small or fractional floats as Python prints them (1e-06, 0.5)."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


# Paths: ``Path("~someone/x").expanduser()`` raises RuntimeError when this machine has no user ``someone``
# (and ``~`` alone when there is no home), so a path in a scenario, a manifest or a run config would
# end in a traceback instead of the error of the thing that named it.


def expand_user(value: str | Path, what: str, error: type[FedAdaptError] = ConfigError) -> Path:
    """``Path(value).expanduser()``; ``error`` naming ``what`` (e.g. "scenario file x: data") if ``~`` has no home."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        home = str(value).split("/", 1)[0]
        raise error(
            f"{what} is {str(value)[:200]!r}, whose {home!r} is the home of no user on this machine; "
            "give the path without ~, or with the home of a user that exists here"
        ) from None
