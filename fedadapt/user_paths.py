"""Paths read from files and command lines, with ``~`` expanded without Python's RuntimeError.

``Path("~someone/x").expanduser()`` raises RuntimeError when this machine has no user ``someone``
(and ``~`` alone when there is no home), so a path in a scenario, a manifest or a run config would
end in a traceback instead of the error of the thing that named it.
"""

from __future__ import annotations

from pathlib import Path

from fedadapt.errors import ConfigError, FedAdaptError


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
