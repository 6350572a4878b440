"""How client updates are protected: a scenario's ``[privacy]`` table, typed and validated.

- ``none``: deltas travel as plain bytes (Flower's transport may still use TLS).
- ``aead``: every client payload is sealed to the server's X25519 key (``fedadapt.privacy.envelope``):
  hidden from the network and bound to run, round, sender and schema, but the server sees each delta.
- ``secagg+``: SecAgg+ (Bell et al., CCS 2020; ``fedadapt.privacy.secagg``) inside the same envelopes:
  the server learns only the sum of the round's deltas, even when some clients drop out.

The SecAgg+ parameters trade privacy against dropout tolerance and precision; see docs/privacy.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from fedadapt.config_values import Bound
from fedadapt.errors import ConfigError
from fedadapt.privacy.dp.config import DpConfig

PrivacyMode = Literal["none", "aead", "secagg+"]
MODES: tuple[PrivacyMode, ...] = ("none", "aead", "secagg+")
MODULUS_BITS = (32, 64)  # masked vectors are uint32 or uint64: the modulus is 2**bits, reductions are free
MAX_QUANTIZATION_RANGE = 2**31 - 1  # Flower's quantize produces int32
# The range of every numeric [privacy] key (modulus-bits is one of MODULUS_BITS). Each share costs a key
# agreement per pair, so num-shares ends at 1000; a clipping range outside [1e-6, 1e6] is a typo, not a choice.
PRIVACY_BOUNDS: dict[str, Bound] = {
    "num-shares": Bound("int", 2, 1000),
    "reconstruction-threshold": Bound("int", 2, 1000),
    "clipping-range": Bound("float", 1e-6, 1e6),
    "quantization-range": Bound("int", 2, MAX_QUANTIZATION_RANGE),
}


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``[privacy]`` table of a scenario (keys in kebab-case: ``num-shares``).

    ``num_shares``: how many parties hold a share of each client's secrets (itself and
    ``num_shares - 1`` neighbours); more shares tolerate more dropouts but cost more key
    agreements. ``reconstruction_threshold``: shares needed to rebuild a secret; a client's
    neighbourhood may lose at most ``num_shares - threshold`` members before the round fails,
    and it must be more than half of ``num_shares`` so that no split of the clients can hand the
    server both secrets of one client. ``clipping_range``: each delta value is clipped to
    ±this before quantization (clipped values are counted and reported). ``quantization_range``:
    integer levels over [-clipping_range, clipping_range]; the mean's error per value is at most
    2·clipping_range / quantization_range. ``modulus_bits``: the field is the integers mod
    2**bits; the round's example count times ``quantization_range`` must stay below it.
    ``assume_honest_server``: the protection against a malicious server needs
    ``reconstruction_threshold >= num_shares - 1`` (docs/privacy.md, threat model); lower thresholds
    tolerate more dropouts but are accepted only when this says the server is trusted to follow
    the protocol.
    """

    mode: str = "none"
    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 1.0
    quantization_range: int = 2**16
    modulus_bits: int = 32
    assume_honest_server: bool = False
    dp: DpConfig | None = None  # the [privacy.dp] table: client-level differential privacy (fedadapt.privacy.dp)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"privacy mode must be one of {MODES}, got {self.mode!r}")
        for key, bound in PRIVACY_BOUNDS.items():
            bound.check(f"privacy.{key}", getattr(self, key.replace("-", "_")))
        if self.reconstruction_threshold > self.num_shares:
            raise ConfigError(
                f"privacy reconstruction-threshold ({self.reconstruction_threshold}) cannot exceed num-shares "
                f"({self.num_shares}): a secret split into {self.num_shares} shares could never be rebuilt"
            )
        if 2 * self.reconstruction_threshold <= self.num_shares:
            raise ConfigError(
                f"privacy reconstruction-threshold ({self.reconstruction_threshold}) must be more than half of "
                f"num-shares ({self.num_shares}), or a server that tells two halves of a neighbourhood different "
                f"stories could rebuild both secrets of a client; use at least {self.num_shares // 2 + 1}"
            )
        if self.modulus_bits not in MODULUS_BITS or isinstance(self.modulus_bits, bool):
            raise ConfigError(f"privacy modulus-bits must be one of {MODULUS_BITS}, got {self.modulus_bits!r}")
        if not isinstance(self.assume_honest_server, bool):
            raise ConfigError(f"privacy assume-honest-server must be true or false, got {self.assume_honest_server!r}")
        if self.dp is not None and not isinstance(self.dp, DpConfig):
            raise ConfigError(f"privacy dp must be a DpConfig, got {type(self.dp).__name__}")
        if self.dp is not None and self.dp.mode == "distributed" and not self.secure_aggregation:
            raise ConfigError(
                f'privacy.dp mode = "distributed" needs mode = "secagg+" (got {self.mode!r}): each device adds only '
                "its share of the noise, so only a secure sum hides its delta; use secagg+, or central DP"
            )
        if self.dp is not None and self.dp.sampling == "poisson":
            raise ConfigError(
                'privacy.dp sampling = "poisson" is not what the round loop does: it samples a fixed number of the '
                'connected devices without replacement; use sampling = "fixed-size" (the default)'
            )
        if self.quantization_range >= 2**self.modulus_bits:
            raise ConfigError(
                f"privacy quantization-range ({self.quantization_range}) must be below the modulus "
                f"2**{self.modulus_bits}"
            )

    @property
    def sealed(self) -> bool:
        """Whether client payloads travel in authenticated envelopes (needs the server's key pair)."""
        return self.mode != "none"

    @property
    def secure_aggregation(self) -> bool:
        return self.mode == "secagg+"

    @property
    def quantization_step(self) -> float:
        """Width of one quantization level: the bound on the error of each value of the mean."""
        return 2 * self.clipping_range / self.quantization_range

    def check_fleet(self, sample_size: int) -> None:
        """Refuse parameters the round's size cannot satisfy (called with the scenario)."""
        if not self.secure_aggregation:
            return
        if sample_size < 2:
            raise ConfigError("secagg+ needs at least 2 clients per round: the sum of one client's delta is that delta")
        if self.num_shares > sample_size:
            raise ConfigError(
                f"privacy num-shares ({self.num_shares}) cannot exceed the clients sampled per round "
                f"({sample_size}): each share goes to a different client"
            )
        if self.num_shares < sample_size and self.num_shares % 2 == 0:
            raise ConfigError(
                f"privacy num-shares must be odd when smaller than the clients per round ({sample_size}): each "
                f"client shares with (num-shares - 1) / 2 neighbours on either side of a ring; got {self.num_shares}"
            )
        # Not only on sparse rings: a client cannot see how many clients a round really has, so a server may
        # sample more than num-shares and hand out lists of its choosing even when the scenario says "every pair".
        if self.reconstruction_threshold < self.num_shares - 1 and not self.assume_honest_server:
            raise ConfigError(
                f"privacy reconstruction-threshold {self.reconstruction_threshold} with num-shares {self.num_shares} "
                f"does not hold against a malicious server (it needs at least num-shares - 1 = "
                f"{self.num_shares - 1}; see docs/privacy.md). Raise the threshold, or set assume-honest-server = "
                "true if the server is trusted to follow the protocol"
            )


def _key(name: str) -> str:
    return name.replace("_", "-")


PRIVACY_KEYS: tuple[str, ...] = tuple(_key(f.name) for f in dataclasses.fields(PrivacyConfig))
