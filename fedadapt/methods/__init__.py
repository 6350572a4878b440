"""Adapter methods: each one a typed config that puts itself on a backbone, selected by name.

Importing this package registers the built-in methods (``registry.METHODS``). Every config here
validates without torch or PEFT, which are imported when a method is applied.
"""

from __future__ import annotations

# Imported for their registration (each module registers its configs), in the order METHODS lists them.
# isort: off
from fedadapt.methods import peft_methods, bitfit, bottleneck, composition, full, head  # noqa: F401

# isort: on
from fedadapt.methods.base import AppliedMethod, MethodConfig, config_to_dict, schema_method_dict
from fedadapt.methods.registry import METHODS, make_method_config, method_config_from_dict, register_method

__all__ = [
    "METHODS",
    "AppliedMethod",
    "MethodConfig",
    "config_to_dict",
    "make_method_config",
    "method_config_from_dict",
    "register_method",
    "schema_method_dict",
]
