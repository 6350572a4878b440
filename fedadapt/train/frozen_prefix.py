"""The frozen prefix of a model: the embeddings and the lowest encoder layers, when nothing in them trains.

``frozen_prefix_depth`` finds it from the model itself, whatever the method: the number ``k`` of
lowest encoder layers that hold no trainable parameter. Bottleneck adapters with AdapterDrop leave
``drop_layers`` of them; PEFT methods restricted to the top layers (LoRA's ``layers_to_transform``)
as many as they skip; a model that trains only its head leaves all of them. Trainable embeddings,
virtual tokens (prompt and prefix tuning) or a trainable parameter whose place the encoder does not
show make it 0. Frozen modules inside the prefix (a stack's frozen lower adapters) are fine: in
eval mode they compute the same states on the same input every time.

Training runs the frozen prefix in eval mode (``eval_frozen_prefix``): a frozen feature extractor
with its dropout on only adds noise, and the prefix cache (``fedadapt.train.prefix_cache``) can
then compute its states once and give exactly what the full model computes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import peft
from torch import nn
from transformers import PretrainedConfig

from fedadapt.adapters.slots import find_slots
from fedadapt.errors import BackboneError, ConfigError
from fedadapt.model.adapter_model import AdapterModel
from fedadapt.model.backbone import SequenceClassifier
from fedadapt.model.freeze import tensor_digest


@dataclass(frozen=True)
class EncoderParts:
    """The pieces of a BERT-family classifier that the frozen prefix is cut from."""

    classifier: SequenceClassifier
    config: PretrainedConfig
    embeddings: nn.Module
    layers: nn.ModuleList
    pooler: nn.Module | None  # BERT's NSP pooler, when the backbone kept it


def encoder_parts(model: AdapterModel) -> EncoderParts:
    """The classifier under ``model``'s method (PEFT's wrapper unwrapped) and its encoder's pieces.

    ConfigError for methods that put virtual tokens before the input (no layer then sees the text
    alone); BackboneError for an encoder without BERT's ``embeddings`` and ``encoder.layer``.
    """
    module = model.module
    if isinstance(module, peft.PeftModel):
        if module.active_peft_config.is_prompt_learning:
            raise ConfigError(
                f"method {model.method.name!r} puts trainable virtual tokens before the input of every layer, "
                "so no layer can be cached; restrict an adapter method to the top layers instead (e.g. "
                "make_method_config('pfeiffer', drop_layers=3))"
            )
        module = module.get_base_model()  # LoRA and IA3 live inside the classifier's own layers
    if not isinstance(module, SequenceClassifier):
        raise ConfigError(
            f"method {model.method.name!r} wraps the classifier in a {type(module).__name__}; "
            "the frozen prefix is found only in fedadapt's SequenceClassifier"
        )
    backbone = module.backbone
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
        raise BackboneError(
            f"the frozen prefix needs a BERT-family encoder (embeddings, encoder.layer), got {type(backbone).__name__}"
        )
    pooler = getattr(backbone, "pooler", None)
    return EncoderParts(module, backbone.config, embeddings, layers, pooler if isinstance(pooler, nn.Module) else None)


def frozen_prefix_depth(model: AdapterModel) -> int:
    """How many of the lowest encoder layers hold nothing trainable: 0 to the number of layers.

    Read from the parameters that require grad now, so a model whose adapter is frozen for a while
    (personalization trains only the head) has a deeper prefix meanwhile. 0 whenever the embeddings
    train, virtual tokens are prepended, the encoder is not BERT-family, or a trainable parameter
    sits outside the embeddings, the layers, the pooler and the head (its effect could reach the prefix).
    """
    try:
        parts = encoder_parts(model)
    except (ConfigError, BackboneError):
        return 0
    trainable = {id(p) for p in model.module.parameters() if p.requires_grad}
    if any(id(p) in trainable for p in parts.embeddings.parameters()):
        return 0
    backbone_ids = {id(p) for p in parts.classifier.backbone.parameters()}
    placed = {id(p) for p in parts.layers.parameters()}
    placed |= {id(p) for p in parts.pooler.parameters()} if parts.pooler is not None else set()
    placed |= {id(p) for p in parts.classifier.parameters() if id(p) not in backbone_ids}  # the head
    if trainable - placed:
        return 0
    for index, layer in enumerate(parts.layers):
        if any(id(p) in trainable for p in layer.parameters()):
            return index
    return len(parts.layers)


def prefix_modules(parts: EncoderParts, frozen_layers: int) -> list[nn.Module]:
    """The embeddings and layers ``0..frozen_layers-1``."""
    return [parts.embeddings, *parts.layers[:frozen_layers]]


def eval_frozen_prefix(model: AdapterModel) -> int:
    """Put the frozen prefix in eval mode (no dropout) and return its depth; nothing changes when it is 0.

    Called by the training loop after ``model.train()``: the cached and the uncached path then
    compute the same states below the first trained layer.
    """
    depth = frozen_prefix_depth(model)
    if depth:
        for module in prefix_modules(encoder_parts(model), depth):
            module.eval()
    return depth


def prefix_fingerprint(model: AdapterModel, frozen_layers: int) -> str:
    """A digest of everything the states after layer ``frozen_layers - 1`` depend on besides the input.

    The backbone's fingerprint (its weights as loaded), plus the values of any other tensor in the
    prefix (a stack's frozen lower adapters, buffers) and how the adapter slots there are set up.
    """
    parts = encoder_parts(model)
    backbone = {id(p) for p in model.frozen.params.values()}
    digest = hashlib.sha256(f"backbone:{model.backbone.fingerprint}\n".encode())
    for index, module in enumerate(prefix_modules(parts, frozen_layers)):
        for name, param in module.named_parameters():
            if id(param) not in backbone:
                digest.update(f"{index}.{name}:{tensor_digest(name, param)}\n".encode())
        for name, buffer in module.named_buffers():
            digest.update(f"{index}.{name}:{tensor_digest(name, buffer)}\n".encode())
    for slot in find_slots(parts.classifier.backbone):
        if slot.layer < frozen_layers:
            digest.update(f"slot {slot.layer} {slot.position}: {slot.setup!r} dropped={slot.dropped}\n".encode())
    return digest.hexdigest()
