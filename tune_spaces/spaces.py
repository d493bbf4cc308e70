"""The search spaces: plain functions returning a Ray Tune ``param_space``.

Keys are dotted paths into :class:`polar_vbll.config.RunConfig` (``head.vbll.prior_scale``), so a sampled
trial config is applied exactly like ``--set`` overrides, shows up under the same names in MLflow, and a
best trial turns back into a ready-to-use YAML config. A space only names what it searches; everything
else comes from the base run config (``polar-vbll tune --config ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from polar_vbll.extras import require

require("tune_spaces.spaces")  # without Ray, importing the searches is one line naming the `dist` extra
from ray import tune  # noqa: E402

from tune_spaces.space_files import SpaceSource, load_space_file, looks_like_file  # noqa: E402

ParamSpace = dict[str, Any]


def priors() -> ParamSpace:
    """The head's priors: the weight prior's scale and the noise prior (inverse-Wishart scale, dof)."""
    return {
        "method": "polar_vbll",
        "head.vbll.prior_scale": tune.loguniform(0.05, 20.0),
        "head.vbll.wishart_scale": tune.loguniform(0.01, 10.0),
        "head.vbll.dof": tune.loguniform(0.5, 10.0),
    }


def ranks() -> ParamSpace:
    """The PoLAR rank and the rank of the head's low-rank-plus-diagonal covariance."""
    return {
        "method": "polar_vbll",
        "head.vbll.cov": "lowrank",
        "polar.r": tune.choice([2, 4, 8, 16]),
        "head.vbll.cov_rank": tune.choice([1, 2, 4, 8]),
    }


def optimization() -> ParamSpace:
    """Learning rates of the Stiefel factors and of Theta, and the landing field's lambda (searched together
    with the manifold strategy; lambda only acts under ``landing``). The head's eta-phase has no learning
    rate to search: it is fitted to convergence (``head.fit.optimizer: lbfgs``)."""
    return {
        "optim.lr_stiefel": tune.loguniform(1e-3, 2e-2),
        "optim.lr_theta": tune.loguniform(1e-3, 2e-2),
        "optim.method": tune.choice(["riemannian", "landing"]),
        "optim.landing_lambda": tune.loguniform(1e-3, 5e-2),
    }


def default() -> ParamSpace:
    """The combined search: the prior scale, both ranks and both adapter learning rates."""
    return {
        "method": "polar_vbll",
        "head.vbll.cov": "lowrank",
        "head.vbll.prior_scale": tune.loguniform(0.1, 10.0),
        "head.vbll.cov_rank": tune.choice([1, 4]),
        "polar.r": tune.choice([4, 8, 16]),
        "optim.lr_stiefel": tune.loguniform(1e-3, 1e-2),
        "optim.lr_theta": tune.loguniform(1e-3, 1e-2),
    }


SPACES: dict[str, Callable[[], ParamSpace]] = {
    "priors": priors,
    "ranks": ranks,
    "optimization": optimization,
    "default": default,
}


def space_names() -> list[str]:
    return sorted(SPACES)


def get_space(name: str) -> ParamSpace:
    """The param space called ``name``; an unknown name is refused with the list of valid ones."""
    from polar_vbll.errors import UserInputError

    if name not in SPACES:
        raise UserInputError(
            f"unknown search space {name!r}; valid spaces: {', '.join(space_names())} (or a YAML space file, "
            "e.g. --space tune_spaces/examples/quick.yaml)"
        )
    return SPACES[name]()


def is_searched(value: Any) -> bool:
    """Whether a space entry is searched (a ``ray.tune`` domain or a ``grid_search``), not a fixed value."""
    return isinstance(value, tune.search.sample.Domain) or (isinstance(value, dict) and set(value) == {"grid_search"})


def searched_keys(space: ParamSpace) -> list[str]:
    """The keys of ``space`` that are searched, in the space's order."""
    return [k for k, v in space.items() if is_searched(v)]


def resolve_space(spec: str) -> tuple[ParamSpace, SpaceSource]:
    """``--space``: a YAML file (:mod:`tune_spaces.space_files`) or a named space; refused in one line."""
    if looks_like_file(spec):
        return load_space_file(spec)
    return get_space(spec), SpaceSource(name=spec)


def describe(space: ParamSpace) -> dict[str, str]:
    """Each key's domain in words (``loguniform(0.05, 20)``, ``quniform(1, 5, 0.5)``, ``randint(1, 5)``,
    ``choice([2, 4])``, ``grid_search([2, 4])``, or the fixed value)."""
    sample = tune.search.sample
    out = {}
    for key, dom in space.items():
        if isinstance(dom, dict) and set(dom) == {"grid_search"}:
            out[key] = f"grid_search({list(dom['grid_search'])})"
        elif isinstance(dom, sample.Categorical):
            out[key] = f"choice({list(dom.categories)})"
        elif isinstance(dom, (sample.Float, sample.Integer)):
            sampler, q = dom.get_sampler(), None
            if isinstance(sampler, sample.Quantized):
                sampler, q = sampler.sampler, sampler.q
            log = isinstance(sampler, sample.LogUniform)
            if isinstance(dom, sample.Integer):
                kind = "lograndint" if log else "randint"
            else:
                kind = "loguniform" if log else "uniform"
            kind = f"q{kind}" if q is not None else kind
            bounds = f"{dom.lower:g}, {dom.upper:g}" + (f", {q:g}" if q is not None else "")
            out[key] = f"{kind}({bounds})"
        elif isinstance(dom, sample.Domain):
            out[key] = type(dom).__name__
        else:
            out[key] = repr(dom)
    return out
