"""The methods a comparison can run, each a set of overrides on one shared base config.

Sharing the base (backbone, adapted blocks, rank, steps, batch) is what makes the comparison fair: a
method differs from another only in what its overrides say. ``ensemble`` is the one composite: it trains
``members`` LoRA-MLE adapters with different seeds and averages their predictions.
"""

from __future__ import annotations

import copy
from typing import Any

#: name -> (overrides of the base config, short description)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "zero_shot": ({}, "the backbone as shipped: answer-letter logits, no training"),
    "lora_mle": ({"adapter_kind": "lora"}, "LoRA (peft), frozen answer-row head, cross-entropy"),
    "lora_map": (
        {"adapter_kind": "lora", "optim": {"theta_weight_decay": 0.1}},
        "LoRA with AdamW weight decay (a Gaussian prior's MAP)",
    ),
    "polar_mle": ({"adapter_kind": "polar"}, "PoLAR adapters, frozen answer-row head"),
    "mc_dropout": (
        {"adapter_kind": "lora", "lora": {"dropout": 0.1}, "eval": {"predictive": "mc_dropout"}},
        "LoRA trained with adapter dropout 0.1; 10 dropout passes at test time",
    ),
    "ensemble": (
        {"adapter_kind": "lora", "eval": {"ensemble_members": 3}},
        "3 LoRA-MLE adapters from different seeds, probabilities averaged",
    ),
    "laplace": (
        {"adapter_kind": "lora", "head": {"laplace": "full"}},
        "LoRA-MLE plus post-hoc last-layer Laplace (prior precision by marginal likelihood)",
    ),
    "vbll_lora": ({"adapter_kind": "lora", "head": {"kind": "vbll"}}, "VBLL head on LoRA (is PoLAR needed?)"),
    "polar_vbll": ({"adapter_kind": "polar", "head": {"kind": "vbll"}}, "PoLAR adapters + VBLL head (ours)"),
}

LABELS = {
    "zero_shot": "zero-shot",
    "lora_mle": "LoRA-MLE",
    "lora_map": "LoRA-MAP",
    "polar_mle": "PoLAR-MLE",
    "mc_dropout": "MC dropout",
    "ensemble": "Deep ensemble",
    "laplace": "LL-Laplace",
    "vbll_lora": "LoRA-VBLL",
    "polar_vbll": "PoLAR-VBLL",
}


def deep_merge(base: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by each override (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for over in overrides:
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def method_config(
    base: dict[str, Any], method: str, extra: dict[str, Any] | None, task: str, seed: int
) -> dict[str, Any]:
    """The config mapping of one (method, task, seed): base, then the method, then the user's per-method
    overrides, then the task and the seed (training order, adapter init, head init all follow the seed)."""
    overrides, _ = METHODS[method]
    per_run = {
        "data": {"task": task},
        "train": {"seed": seed},
        "adapter": {"init_seed": seed},
        "lora": {"init_seed": seed},
        "head": {"vbll": {"init_seed": seed}, "fit": {"seed": seed}},
    }
    return deep_merge(base, overrides, extra or {}, per_run)
