"""A global head fitted in one round from the fleet's class prototypes: the federated nearest-class-mean classifier.

Each device sends, in place of a trained delta, its class-mean statistic: row c of the head's weight holds the
sum of the pooled embeddings of its examples of class c, divided by its example count (bias zero). Weighted
FedAvg of those statistics is the whole fleet's per-class sum over its example count; under differential
privacy every device's statistic is clipped and noised like any delta, and it suits DP far better than local
training does: it is one round, so the whole privacy budget goes to it, and the noise on a class's summed
embeddings is small against ~100 examples' worth of signal (docs/privacy.md, "Benchmark"). The server turns the
aggregate into a head (``prototype_head``): each row, optionally projected onto a public subspace, scaled to a
fixed norm, so that the logits are ``scale`` · cos(embedding, prototype) for normalized embeddings. That is FedNCM
(Legate et al., "Guiding the last layer in federated learning with pre-trained models", NeurIPS 2023); later
rounds, if the scenario has any, train from it as from any head.

The public subspace ``label-names``: the span of the backbone's embeddings of the class names ("card_arrival"
→ "card arrival"). The names are public (they define the task), so projecting onto their span is
post-processing: it costs no privacy and drops the DP noise outside that ≤ K-dimensional span, which for
Banking77's 77 intents in MiniLM's 384 dimensions is four fifths of it. Useless for names that say nothing
("LABEL_3"): leave ``prototype-basis = "none"`` there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedadapt.data.batching import EncodedTexts, batch_indices, collate, encode_texts
from fedadapt.delta.state import AdapterSchema, Part, State, TensorSpec, check_state
from fedadapt.errors import ConfigError, DataError
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.device import select_device

PROTOTYPE_SCALE = 16.0  # logits = 16 · cosine: a usual cosine-classifier scale; argmax does not depend on it
_BASIS_RANK_TOLERANCE = 1e-6  # singular values below this share of the largest do not span the basis


def head_specs(schema: AdapterSchema, part: Part = "shared") -> tuple[TensorSpec, TensorSpec]:
    """The head's (K, H) weight and (K,) bias in ``part``; ConfigError if that part has no such head."""
    heads = [s for s in schema.specs(part) if s.role == "head"]
    weights = [s for s in heads if len(s.shape) == 2]
    biases = [s for s in heads if len(s.shape) == 1]
    if len(weights) != 1 or len(biases) != 1 or biases[0].shape[0] != weights[0].shape[0]:
        raise ConfigError(
            f"a prototype head needs one linear head (weight and bias) in the {part} part; this schema's head "
            f"tensors are {[(s.name, s.shape) for s in heads]}"
        )
    return weights[0], biases[0]


@torch.no_grad()
def pooled_features(
    model: AdapterModel, data: EncodedTexts, batch_size: int = 64, device: str = "auto"
) -> torch.Tensor:
    """(N, H) float32: the pooled embeddings the head sees, in data order, in eval mode (no dropout)."""
    target = select_device(device)
    classifier = model.backbone.model
    captured: list[torch.Tensor] = []
    hook = classifier.pooler.register_forward_hook(lambda _m, _args, out: captured.append(out.detach().float().cpu()))
    try:
        model.to(target).eval()
        for idx in batch_indices(len(data), batch_size, None):
            model(**{k: v.to(target) for k, v in collate(data, idx).items() if k != "labels"})
    finally:
        hook.remove()
    return torch.cat(captured) if captured else torch.zeros(0, classifier.config.hidden_size)


def class_mean_statistic(model: AdapterModel, data: EncodedTexts, batch_size: int = 64, device: str = "auto") -> State:
    """What a device sends in a prototype round, as a shared-part state: head weight Σⱼ e_{yⱼ} fⱼᵀ / n, all else 0.

    fⱼ is example j's pooled embedding and n the device's example count, so that the example-weighted FedAvg
    of the fleet's statistics is the fleet's per-class embedding sum / its example total.
    """
    if len(data) == 0:
        raise DataError("a prototype round needs training examples, and this device has none")
    weight_spec, _ = head_specs(model.schema)
    features = pooled_features(model, data, batch_size, device).double()
    labels = torch.tensor(data.labels, dtype=torch.long)
    sums = torch.zeros(weight_spec.shape, dtype=torch.float64).index_add_(0, labels, features)
    statistic = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in model.schema.specs("shared")}
    statistic[weight_spec.name] = (sums / len(data)).to(getattr(torch, weight_spec.dtype))
    return statistic


def label_name_basis(model: AdapterModel, names: Sequence[str], max_length: int = 64) -> torch.Tensor:
    """(k, H) orthonormal rows spanning the backbone's pooled embeddings of the class names (k ≤ K)."""
    texts = [name.replace("_", " ").replace("-", " ").strip() or name for name in names]
    data = encode_texts(model.backbone.tokenizer, texts, [0] * len(texts), max_length)
    embeddings = pooled_features(model, data).double()
    _, singular, right = torch.linalg.svd(embeddings, full_matrices=False)
    keep = singular > singular[0] * _BASIS_RANK_TOLERANCE
    return right[keep]


def prototype_head(
    class_sums: torch.Tensor, basis: torch.Tensor | None = None, scale: float = PROTOTYPE_SCALE
) -> torch.Tensor:
    """(K, H) head weight: each row of ``class_sums`` (projected onto ``basis``'s span) scaled to norm ``scale``.

    A class whose row is all zero (no device had an example of it) keeps a zero row: its logit is 0.
    """
    rows = class_sums.double()
    if basis is not None:
        rows = rows @ basis.T.double() @ basis.double()
    norms = rows.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, rows / norms.clamp(min=torch.finfo(torch.float64).tiny) * scale, 0.0)


class PrototypeHeadStep:
    """The server's step in a prototype round: the head from the round's mean statistic, the rest unchanged.

    It stands in for the server optimizer for that one round (same ``schema_id``, ``part`` and ``step``): a
    class-mean statistic is no gradient, so neither a server learning rate nor a momentum applies to it.
    """

    def __init__(self, schema: AdapterSchema, basis: torch.Tensor | None, scale: float = PROTOTYPE_SCALE) -> None:
        self.schema_id = schema.schema_id
        self.part: Part = "shared"
        self.specs = schema.specs("shared")
        self.weight, self.bias = head_specs(schema)
        self.basis, self.scale = basis, scale

    def step(self, global_state: Mapping[str, torch.Tensor], mean_statistic: Mapping[str, torch.Tensor]) -> State:
        check_state(global_state, self.specs, what="global state")
        check_state(mean_statistic, self.specs, what="mean class statistic")
        new = dict(global_state)
        head = prototype_head(mean_statistic[self.weight.name], self.basis, self.scale)
        new[self.weight.name] = head.to(getattr(torch, self.weight.dtype))
        new[self.bias.name] = torch.zeros(self.bias.shape, dtype=getattr(torch, self.bias.dtype))
        return new
