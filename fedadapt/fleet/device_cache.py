"""A device's local training from its frozen-prefix cache: the frozen lower layers run once, not every round.

When the method leaves the lowest k layers without trainable parameters (``frozen_prefix_depth``),
the device computes their states for its training examples once and keeps them in its state folder
(``DeviceContext.prefix_cache_dir``, a ``fedadapt.train.prefix_store.PrefixStore`` capped at
``PrefixCacheSettings.max_bytes``). Every later epoch of every later round runs only the top layers
and the head, in this process or the next one: simulation workers restart and deployment starts a
fresh process per message, the folder stays. The reply's metrics say whether the states were found
(``prefix-cache-hit``) and what finding or computing them cost (``prefix-cache-seconds``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedadapt.data.batching import EncodedTexts
from fedadapt.fleet.build import text_tokens
from fedadapt.fleet.device_data import DeviceContext
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.train.frozen_prefix import frozen_prefix_depth
from fedadapt.train.loop import TrainConfig, TrainResult, train_adapter
from fedadapt.train.prefix_cache import train_adapter_cached
from fedadapt.train.prefix_store import PrefixStore, prefix_key

Metrics = dict[str, float | int]


def train_on_device(
    device: DeviceContext, model: AdapterModel, texts: Sequence[str], train_set: EncodedTexts, config: TrainConfig
) -> tuple[TrainResult, Metrics]:
    """Train ``model`` on the device's ``train_set`` (encoded from ``texts``), through its prefix cache if it can.

    Returns the training result and the metrics the reply carries about the cache.
    """
    depth = frozen_prefix_depth(model)
    metrics: Metrics = {"prefix-layers": depth}
    settings = device.prefix_cache
    if depth == 0 or not settings.enabled:
        return train_adapter(model, train_set, config), metrics
    key = prefix_key(
        model, depth, texts, train_set.labels, text_tokens(model, device.scenario.max_length), settings.dtype
    )
    store = PrefixStore(device.prefix_cache_dir, settings.max_bytes)
    states, use = store.load_or_build(model, train_set, key, device=config.device)
    metrics |= {"prefix-cache-hit": int(use.hit), "prefix-cache-seconds": use.seconds}
    return train_adapter_cached(model, states, config), metrics
