"""The adapter layout a swappable graph is built for, and what keeps another adapter from fitting it.

A swappable ``backbone.onnx`` bakes in everything but the per-user tensors: the backbone
weights, the method's structure (LoRA's targets and alpha/r, FFA-LoRA's frozen A, a bottleneck's
placement), the pooling, and the tensors' names and shapes. An adapter can join the bundle
only if all of these match; its label names may differ (they are recorded per adapter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Layout = dict[str, Any]
MAX_LISTED = 3  # tensor names listed per kind of difference; the count says the rest


def layout_of(adapter_manifest: Mapping[str, Any]) -> Layout:
    """The layout an adapter folder's manifest (fedadapt_adapter.json) describes."""
    schema, backbone = adapter_manifest["schema"], adapter_manifest["backbone"]
    return {
        "method": dict(schema["method"]),
        "extras": dict(schema.get("extras", {})),
        "backbone_fingerprint": backbone["fingerprint"],
        "pooling": dict(backbone["pooling"]),
        "num_labels": int(backbone["num_labels"]),
        # Roles and parts (shared/personal) do not change the graph: names, shapes and dtypes do.
        "tensors": [{"name": t["name"], "shape": list(t["shape"]), "dtype": t["dtype"]} for t in schema["tensors"]],
    }


def layout_differences(bundle: Mapping[str, Any], adapter: Mapping[str, Any]) -> list[str]:
    """One line per way ``adapter``'s layout differs from ``bundle``'s; empty when it fits."""
    lines = _dict_differences("method", bundle.get("method", {}), adapter["method"])
    lines += _dict_differences("method extra", bundle.get("extras", {}), adapter["extras"])
    lines += _dict_differences("pooling", bundle.get("pooling", {}), adapter["pooling"])
    for key, what in (("backbone_fingerprint", "backbone fingerprint"), ("num_labels", "number of labels")):
        if bundle.get(key) != adapter[key]:
            lines.append(f"{what}: bundle {bundle.get(key)!r}, adapter {adapter[key]!r}")
    return lines + _tensor_differences(bundle.get("tensors", []), adapter["tensors"])


def _dict_differences(what: str, bundle: Mapping[str, Any], adapter: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(bundle) | set(adapter))
    return [
        f"{what} {key}: bundle {bundle.get(key, '(none)')!r}, adapter {adapter.get(key, '(none)')!r}"
        for key in keys
        if bundle.get(key) != adapter.get(key)
    ]


def _tensor_differences(bundle: list[dict[str, Any]], adapter: list[dict[str, Any]]) -> list[str]:
    ours, theirs = {t["name"]: t for t in bundle}, {t["name"]: t for t in adapter}
    lines = []
    for label, names in (
        ("tensors only the bundle has", sorted(set(ours) - set(theirs))),
        ("tensors only the adapter has", sorted(set(theirs) - set(ours))),
    ):
        if names:
            lines.append(f"{label} ({len(names)}): {', '.join(names[:MAX_LISTED])}{_more(names)}")
    changed = [
        f"{name} {_spec(ours[name])} vs {_spec(theirs[name])}"
        for name in sorted(set(ours) & set(theirs))
        if _spec(ours[name]) != _spec(theirs[name])
    ]
    if changed:
        lines.append(f"tensor shapes or dtypes, bundle vs adapter ({len(changed)}): {'; '.join(changed[:MAX_LISTED])}")
    return lines


def _spec(tensor: Mapping[str, Any]) -> str:
    return f"{tensor['dtype']}{list(tensor['shape'])}"


def _more(names: list[str]) -> str:
    return f", … ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
