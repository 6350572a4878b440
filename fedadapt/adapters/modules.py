"""Bottleneck adapter and AdapterFusion layers (plain torch modules, no injection logic).

Bottleneck adapter: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019.
AdapterFusion: Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", EACL 2021.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Nonlinearity = Literal["relu", "gelu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class BottleneckAdapter(nn.Module):
    """down-project d→r, nonlinearity, up-project r→d, times ``scaling``.

    Returns the *change* to add to the residual stream; ``up`` starts at zero, so the
    adapter is the identity at init.
    """

    def __init__(self, hidden_size: int, bottleneck: int, nonlinearity: Nonlinearity, scaling: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.activation = _ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, hidden_size)
        self.scaling = scaling
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(self.activation(self.down(hidden)))  # (B, T, H)


class FusionLayer(nn.Module):
    """Attention over N adapters' outputs at one position, queried by the sublayer output.

    Value starts as the identity, so the fused output starts as an average of the adapters'.
    """

    def __init__(self, hidden_size: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.temperature = temperature
        nn.init.normal_(self.query.weight, std=0.02)
        nn.init.normal_(self.key.weight, std=0.02)
        nn.init.zeros_(self.query.bias)
        nn.init.zeros_(self.key.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden_size))
            self.value.bias.zero_()

    def forward(self, hidden: torch.Tensor, adapter_outputs: torch.Tensor) -> torch.Tensor:
        # hidden (B, T, H); adapter_outputs (B, T, N, H)
        query = self.query(hidden)  # (B, T, H)
        keys = self.key(adapter_outputs)  # (B, T, N, H)
        scores = torch.einsum("bth,btnh->btn", query, keys) / self.temperature
        weights = scores.softmax(dim=-1)  # (B, T, N)
        return torch.einsum("btn,btnh->bth", weights, self.value(adapter_outputs))
