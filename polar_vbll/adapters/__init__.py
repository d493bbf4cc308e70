"""Adapter kinds: PoLAR (``W0 + (alpha / r) U Theta V^T``, U and V on Stiefel manifolds) and LoRA (peft).

``config`` (what to adapt, per kind) / ``bank`` (where U, V live) / ``layer`` (the PoLAR linear) /
``model`` (PoLAR injection, save / load, PEFT export) / ``lora`` (the LoRA kind on peft) / ``dropout``
(adapter dropout and seeded randomness), following PEFT's ``tuners/lora`` split. Both kinds expose the
same interface, :class:`polar_vbll.protocols.AdapterModel`; the registry of kinds is
``polar_vbll.methods.ADAPTERS``.
"""

from polar_vbll.adapters.bank import SlotRequest, StiefelBank, group_key
from polar_vbll.adapters.config import (
    FORMAT_VERSION,
    LoraConfig,
    PolarConfig,
    TargetConfig,
    lora_config_from_dict,
    polar_config_from_dict,
)
from polar_vbll.adapters.dropout import adapter_dropout, seeded_rng, set_adapter_dropout
from polar_vbll.adapters.layer import PolarLinear, stable_rank
from polar_vbll.adapters.lora import LoraAdapter, inject_lora
from polar_vbll.adapters.model import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PolarModel,
    TargetLayer,
    inject_polar,
    select_targets,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "FORMAT_VERSION",
    "LoraAdapter",
    "LoraConfig",
    "PolarConfig",
    "PolarLinear",
    "PolarModel",
    "SlotRequest",
    "StiefelBank",
    "TargetConfig",
    "TargetLayer",
    "adapter_dropout",
    "group_key",
    "inject_lora",
    "inject_polar",
    "lora_config_from_dict",
    "polar_config_from_dict",
    "seeded_rng",
    "select_targets",
    "set_adapter_dropout",
    "stable_rank",
]
