"""Which settings produced a persisted thing, so that a rerun reuses it only under the same settings.

Everything reused on a rerun carries the settings that produced it: a checkpoint its whole run config
(resumed only when :func:`training_settings` match, otherwise refused naming the keys), a comparison's
records a :func:`digest` of their run config (rerun when it changed), a search its base config, space and
settings (refused when they changed). A results table never mixes settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from polar_vbll.config import DATASETS_PREFIXES, RunConfig
from polar_vbll.methods import METHODS
from polar_vbll.placement import effective_dtype
from polar_vbll.support import STIEFEL_OPTIM as _STIEFEL_OPTIM  # settings an adapter without U, V ignores

#: Head settings that act only when predicting (not on what is trained).
_PREDICTION_ONLY = ("head.vbll.predictive", "head.vbll.mc_samples", "head.vbll.mc_seed",
                    "head.vbll.allow_large_dense", "blob.eval_samples",
                    "polar_blob.eval_samples")  # fmt: skip


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def digest(value: Any) -> str:
    """sha256 (16 hex digits) of ``value`` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """``"key: old -> new; ..."`` for the keys whose values differ (at most ``limit`` shown)."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """What determines a trained model, as flat ``section.key`` values: the backbone, the training data,
    the method's adapter kind and the head kind it trains as, that adapter's settings, the optimizer, the
    schedule, and (for a head the eta-phase fits) the head's and the eta-phase's settings. Not in it: how
    the model is evaluated (evaluation data, predictive, post-hoc head), where it is written, and how the
    work is batched or cached (``eval_batch_size``, ``cache_frozen_prefix``, checkpointing), except the
    precision of cached prefix states, which the adapted blocks train on; and not where it runs
    (``model.device``: a run resumes on another device), but the backbone's dtype as ``auto`` resolves here."""
    method = METHODS[cfg.method]
    flat = flatten(cfg.model_dump(mode="json"))
    section = method.adapter_kind.section
    keep = ["model.", "data.task", "data.split_seed", "data.train_split", "data.train_limit", f"{section}.",
            "optim.", "train.steps", "train.batch_size", "train.seed"]  # fmt: skip
    if not method.trains:  # the adapter stays at init: only the backbone and the adapter's layout matter
        keep = ["model.", f"{section}."]
    else:
        keep += [f"head.{section}." for section in method.head_kind.settings]
        if method.head_kind.refitted:
            keep += ["train.alternation", "train.round_steps", "train.final_head_refit"]
        if cfg.data.task.startswith(DATASETS_PREFIXES):  # the column mapping; the split names decide the cut
            keep += ["data.columns.", "data.val_split", "data.eval_split"]
    out = {k: v for k, v in flat.items() if any(k == p or (p.endswith(".") and k.startswith(p)) for p in keep)}
    drop = _PREDICTION_ONLY + (() if method.adapter_kind.stiefel else _STIEFEL_OPTIM)
    out = {k: v for k, v in out.items() if k not in drop and k != "model.device"}  # a run resumes on any device
    if "model.dtype" in out:  # what the backbone computes in, with `auto` resolved as it resolves here
        out["model.dtype"] = effective_dtype(cfg.model)
    if method.trains and cfg.train.cache_frozen_prefix:  # the adapted blocks train on states of this precision
        out["train.prefix_cache_dtype"] = cfg.train.prefix_cache_dtype
    out["method.trains"] = method.trains
    out["method.adapter"] = method.adapter
    out["method.head"] = method.head_kind.training_kind
    return out
