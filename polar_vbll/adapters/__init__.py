"""PoLAR adapters: ``W = W0 + (alpha / r) U Theta V^T`` with U, V on Stiefel manifolds.

``config`` (what to adapt) / ``bank`` (where U, V live) / ``layer`` (the adapted linear) / ``model``
(injection, save / load, PEFT export), following PEFT's ``tuners/lora`` split.
"""

from polar_vbll.adapters.bank import SlotRequest, StiefelBank, group_key
from polar_vbll.adapters.config import FORMAT_VERSION, PolarConfig, polar_config_from_dict
from polar_vbll.adapters.layer import PolarLinear, stable_rank
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
    "PolarConfig",
    "PolarLinear",
    "PolarModel",
    "SlotRequest",
    "StiefelBank",
    "TargetLayer",
    "group_key",
    "inject_polar",
    "polar_config_from_dict",
    "select_targets",
    "stable_rank",
]
