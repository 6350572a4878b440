"""Field arithmetic of SecAgg+: encode a delta as integers mod 2**bits, mask it, decode the sum.

A client's vector is ``[n·q₁, …, n·q_L, n, c]``: its delta clipped to ±clipping_range and
stochastically quantized to integers in [0, quantization_range] (``quantize``), each
multiplied by its example count ``n``, then ``n`` itself and ``c``, the number of values that hit
the clipping range. Summed over clients, the last two entries give the FedAvg weight total and
the clipped count without either being sent in the clear; the weighted mean is
``dequantize(Σ n·q / Σ n)``. Masks are added mod 2**bits.

Masks come from AES-256-CTR keyed with a 32-byte seed (``cryptography``), not from Flower's
``pseudo_rand_gen``: that one folds the seed to 32 bits and seeds NumPy's Mersenne Twister, so
a mask could be found by trying 2**32 seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedadapt.errors import SecAggError
from fedadapt.privacy.config import PrivacyConfig

SEED_SIZE = 32
EXTRA_ENTRIES = 2  # the example count and the clipped count follow the values
_ZERO_NONCE = bytes(16)  # every seed keys exactly one mask: a fixed counter block is safe


def field_dtype(config: PrivacyConfig) -> np.dtype:
    """uint32 or uint64, little-endian: arithmetic in it is arithmetic mod 2**modulus_bits."""
    return np.dtype("<u4") if config.modulus_bits == 32 else np.dtype("<u8")


def mask(seed: bytes, length: int, config: PrivacyConfig) -> np.ndarray:
    """``length`` uniform field elements from the keystream of AES-256-CTR under ``seed``."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"a mask seed is {SEED_SIZE} bytes, got {len(seed)}")
    dtype = field_dtype(config)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=dtype).copy()


@dataclass(frozen=True)
class Encoded:
    """A client's field vector before masking, and how many of its values were clipped."""

    vector: np.ndarray
    clipped: int


def encode(delta: np.ndarray, num_examples: int, config: PrivacyConfig) -> Encoded:
    """``[n·quantize(clip(delta)), n, clipped]`` in the field (``delta`` is a flat float array)."""
    values = np.asarray(delta, dtype=np.float64).ravel()
    if not np.isfinite(values).all():
        raise SecAggError("the delta holds NaN or inf values: it cannot be encoded (and is not sent)")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise SecAggError(f"the example count must be a positive int, got {num_examples!r}")
    if num_examples * config.quantization_range >= 2**config.modulus_bits:
        raise SecAggError(
            f"{num_examples} examples times quantization-range {config.quantization_range} reach the modulus "
            f"2**{config.modulus_bits}: raise modulus-bits to 64 or lower quantization-range"
        )
    clipped = int(np.count_nonzero(np.abs(values) > config.clipping_range))
    levels = quantize(values, config)
    dtype = field_dtype(config)
    vector = np.empty(values.size + EXTRA_ENTRIES, dtype=dtype)
    # levels are in [0, quantization_range]; n·level stays below the modulus (checked on the sum)
    np.multiply(levels.astype(dtype), dtype.type(num_examples), out=vector[:-EXTRA_ENTRIES])
    vector[-2] = num_examples
    vector[-1] = clipped
    return Encoded(vector, clipped)


@dataclass(frozen=True)
class DecodedSum:
    """The weighted mean of the round's deltas and the two totals carried beside it."""

    mean: np.ndarray  # float64, flat
    total_examples: int
    clipped: int


def decode_sum(total: np.ndarray, config: PrivacyConfig) -> DecodedSum:
    """The FedAvg mean from an unmasked sum of encoded vectors; SecAggError if the field may have wrapped."""
    total_examples, clipped = int(total[-2]), int(total[-1])
    if total_examples < 1:
        raise SecAggError("the unmasked sum carries no examples: the round's masks did not cancel")
    bound = total_examples * config.quantization_range
    if bound >= 2**config.modulus_bits:
        raise SecAggError(
            f"the round's {total_examples} examples times quantization-range {config.quantization_range} reach "
            f"2**{config.modulus_bits}: the sum may have wrapped around the modulus. Raise modulus-bits to 64 or "
            "lower quantization-range"
        )
    levels = total[:-EXTRA_ENTRIES].astype(np.float64) / total_examples
    return DecodedSum(dequantize(levels, config), total_examples, clipped)


def quantize(values: np.ndarray, config: PrivacyConfig) -> np.ndarray:
    """Levels in [0, quantization_range] (int64): ``values`` clipped, mapped linearly, rounded stochastically.

    A value between two levels rounds up with probability equal to its distance from the lower one, so
    the expected level is exact and the mean of many clients carries no rounding bias (Flower's
    ``quantize`` does the same). The coin flips come from NumPy's global generator, as in Flower:
    they need no secrecy, and a test can seed it to replay a client's encoding.
    """
    scale = config.quantization_range / (2 * config.clipping_range)
    scaled = (np.clip(values, -config.clipping_range, config.clipping_range) + config.clipping_range) * scale
    floor = np.floor(scaled)
    levels = floor.astype(np.int64) + (np.random.random_sample(scaled.shape) < scaled - floor)
    return np.minimum(levels, config.quantization_range)  # float rounding at the top may not pass the last level


def dequantize(levels: np.ndarray, config: PrivacyConfig) -> np.ndarray:
    """The float64 values of (possibly fractional, e.g. averaged) ``levels``: the inverse map of ``quantize``."""
    return np.asarray(levels, dtype=np.float64) * config.quantization_step - config.clipping_range
