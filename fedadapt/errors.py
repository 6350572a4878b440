"""Domain errors: each says what is wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterable


class FedAdaptError(Exception):
    """Base class of every error fedadapt raises on purpose."""


class ConfigError(FedAdaptError, ValueError):
    """A configuration value is out of range or unknown."""


class BackboneError(FedAdaptError):
    """The backbone cannot be loaded or is not usable for classification."""


class FrozenBackboneError(FedAdaptError):
    """A backbone weight requires grad or changed although it must stay frozen."""


class SchemaMismatch(FedAdaptError, ValueError):
    """Adapter state was produced for a different adapter schema."""


class StateError(FedAdaptError, ValueError):
    """Adapter state or a delta is malformed (names, shapes, dtypes, values or bytes)."""


class AdapterFolderError(FedAdaptError):
    """An adapter folder is missing files or does not match the backbone it is loaded onto."""


class DataError(FedAdaptError, ValueError):
    """A data set cannot be loaded, has missing or empty values, or cannot be partitioned as asked."""


class EmptyAggregateError(FedAdaptError, ValueError):
    """No client delta was accepted, so there is no mean to apply; ``rejected`` says why for each client."""

    def __init__(self, message: str, rejected: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.rejected = list(rejected)


class EnvelopeError(FedAdaptError):
    """An encrypted payload was rejected; ``reason`` is one of ``fedadapt.privacy.envelope.REASONS``.

    Messages never hold key material or plaintext.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __repr__(self) -> str:
        return f"EnvelopeError(reason={self.reason!r}, message={str(self)!r})"


class PayloadError(FedAdaptError, ValueError):
    """A secure-aggregation payload is malformed (bad framing, names or sizes); it is rejected whole."""


class SecAggError(FedAdaptError):
    """A secure-aggregation step cannot go on: a client refuses an inconsistent request, or the server
    cannot rebuild the sum (too many dropouts, an overflowing field). Never holds key material or values."""


class CheckpointAuthError(FedAdaptError):
    """A checkpoint cannot be shown to come from this server (no MAC, a wrong MAC, no key): resume refuses it."""


class JsonInputError(FedAdaptError, ValueError):
    """JSON from an untrusted source is too large, nested too deeply or not valid JSON; ``what`` names the source."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what


class ReplyError(FedAdaptError, ValueError):
    """A client's reply is malformed (missing or wrongly typed records, an oversize payload, bad metrics);
    the server leaves that client out of the round with this message as the reason."""


class NonFiniteDeltaError(StateError):
    """A delta holds NaN or inf, so it has no L2 norm to clip to: the sender is rejected with reason
    ``non-finite-delta`` (``fedadapt.privacy.dp.clipping``)."""

    reason = "non-finite-delta"


class AccountantStateError(FedAdaptError, ValueError):
    """A saved privacy-accountant state is malformed, out of range or made for another configuration
    (``fedadapt.privacy.dp.accounting``); the run refuses to resume from it rather than misreport ε."""
