"""Warm starts: continue training from another run's checkpoint with other hyperparameters.

A resume (:func:`polar_vbll.training.schedule.check_resumable`) continues a run exactly and refuses any
changed training setting. A warm start takes a checkpoint's weights, head, optimizer moments, RNG states,
step and history, and continues with the current config's *hyperparameters*: what Population Based
Training does when a trial exploits a better one (Jaderberg et al. 2017, "exploit" then "explore"; the
``--scheduler pbt`` of ``polar-vbll tune``).

Only the settings of :data:`WARM_START_KEYS` may differ from the checkpoint's: learning rates and the other
optimizer settings, the head-fit and prior settings of the heads, adapter dropout. Everything that changes
what a checkpoint holds (rank, target modules, method, covariance kind, optimizer kind) or what the
schedule has done so far (steps, batch size, seed, refit rounds) is refused, naming the key. The optimizer
moments are kept; each optimizer's settings (learning rate, betas, eps, weight decay) become the current
config's (:func:`with_settings`); the learning-rate schedule is a pure function of the step, so the new
learning rate applies from the next step on.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

from polar_vbll.errors import CheckpointError

#: The training settings (``polar_vbll.provenance.training_settings`` keys, shell patterns) a warm start
#: may change: optimizer settings, the heads' fit and prior settings, adapter dropout.
WARM_START_KEYS: tuple[str, ...] = (
    "optim.lr_stiefel",
    "optim.lr_theta",
    "optim.landing_lambda",
    "optim.landing_safe_distance",
    "optim.betas",
    "optim.eps",
    "optim.theta_weight_decay",
    "optim.max_grad_norm",
    "optim.warmup_ratio",
    "optim.schedule",
    "head.linear.lr",
    "head.linear.prior_scale",
    "head.fit.lr",
    "head.fit.betas",
    "head.fit.max_iter",
    "head.fit.steps",
    "head.fit.tolerance",
    "head.fit.prior_rounds",
    "head.fit.prior_tolerance",
    "head.vbll.prior_scale",
    "head.vbll.dof",
    "head.vbll.wishart_scale",
    "head.vbll.elbo_samples",
    "*.dropout",
)


def warm_startable(key: str) -> bool:
    """Whether the config key ``key`` (dotted) may differ between a checkpoint and its warm start."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in WARM_START_KEYS)


def check_warm_start(saved: dict[str, Any], cfg) -> dict[str, list[Any]]:
    """The training settings that differ between the checkpoint's config ``saved`` (a ``RunConfig`` dump)
    and ``cfg``, as ``{key: [then, now]}``; raises :class:`CheckpointError` naming every differing key a
    warm start cannot change (:data:`WARM_START_KEYS`)."""
    from pydantic import ValidationError

    from polar_vbll.config import RunConfig
    from polar_vbll.provenance import training_settings

    try:
        old = training_settings(RunConfig.model_validate(saved))
    except ValidationError:
        raise CheckpointError(
            "the checkpoint to warm-start from was written by an older polar-vbll (its config does not validate now)"
        ) from None
    new = training_settings(cfg)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    fixed = [k for k in changed if not warm_startable(k)]
    if fixed:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in fixed)
        raise CheckpointError(
            f"cannot warm-start from a checkpoint written with other {shown}: a warm start changes only "
            "optimizer, head-fit and prior settings and dropout (polar_vbll.training.warm_start.WARM_START_KEYS)"
        )
    return changed


def optimizer_settings(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings of each parameter group of an optimizer ``state_dict`` (everything but ``params``)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in state.get("param_groups", [])]


def with_settings(saved: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """The optimizer ``state_dict`` ``saved`` (its moments and step counts) with the parameter-group
    settings of ``fresh`` (the same optimizer built from the current config). Raises
    :class:`CheckpointError` when the groups do not correspond (another optimizer)."""
    groups, settings = saved.get("param_groups", []), optimizer_settings(fresh)
    if len(groups) != len(settings):
        raise CheckpointError(
            f"cannot warm-start: the checkpoint's optimizer has {len(groups)} parameter groups, "
            f"this run's {len(settings)}"
        )
    out = copy.copy(saved)
    out["param_groups"] = [{**s, "params": g["params"]} for g, s in zip(groups, settings, strict=True)]
    return out
