"""Ray Tune's own search algorithms and trial schedulers, as ``polar-vbll tune --search/--scheduler`` picks them.

Searchers: ``random`` (Tune's ``BasicVariantGenerator``: every domain, ``grid_search`` included; core
install), ``optuna`` (``OptunaSearch``: TPE) and ``hyperopt`` (``HyperOptSearch``: TPE), both from the
``tune`` extra, seeded with the search seed, limited to the search's concurrency by Tune's
``ConcurrencyLimiter``. Optuna and HyperOpt take a flat space of ``uniform``, ``loguniform``,
``quniform``, ``randint`` and ``choice`` domains; neither takes ``grid_search`` (Tune's converters refuse
it) and Optuna ignores the quantisation of ``qloguniform``: both are refused here, in one line, before
anything is written (:func:`check_searcher`).

Schedulers: ``asha`` (``ASHAScheduler``), ``hyperband`` (``HyperBandScheduler``: pauses trials at each
rung; a paused trial restarts from its own latest training checkpoint), ``none`` (``FIFOScheduler``: every
trial runs to the end), ``pbt`` (``PopulationBasedTraining``: :mod:`tune_spaces.pbt`, built there: it
needs the space). ASHA and HyperBand compare the reports the workers make every ``train.eval_every``
steps, PBT those of each segment's end; all with ``time_attr="step"``.
"""

from __future__ import annotations

from typing import Any

from polar_vbll.errors import ConfigError
from polar_vbll.extras import require

SEARCHERS = ("random", "optuna", "hyperopt")
SCHEDULERS = ("asha", "hyperband", "pbt", "none")

def check_searcher(searcher: str, space: dict[str, Any], where: str) -> None:
    """Refuse, in one :class:`ConfigError` line naming ``where`` (the space) and the key, a space the
    searcher cannot search: ``grid_search`` or a quantised log domain under Optuna, ``grid_search`` under
    HyperOpt, anything Tune's own converter refuses. ``random`` takes every domain."""
    if searcher == "random":
        return
    from ray.tune.search.sample import Domain, LogUniform, Quantized

    for key, value in space.items():
        if isinstance(value, dict) and set(value) == {"grid_search"}:
            raise ConfigError(
                f"{where}: {key}: --search {searcher} cannot search grid_search (a grid is every value, not a "
                "sample): use {choice: [...]} or --search random"
            )
        if searcher == "optuna" and isinstance(value, Domain):
            sampler = value.get_sampler()
            if isinstance(sampler, Quantized) and isinstance(sampler.sampler, LogUniform):
                raise ConfigError(
                    f"{where}: {key}: --search optuna ignores the quantisation of qloguniform: use loguniform, "
                    "quniform, or --search hyperopt / random"
                )
    converter = _searcher_class(searcher).convert_search_space
    try:
        converter(space)
    except Exception as exc:  # Tune's converter names what it cannot take
        raise ConfigError(f"{where}: --search {searcher} cannot search this space: {exc}") from None


def api_entry(searcher: str) -> str:
    """The :data:`polar_vbll.extras.ENTRIES` key of the API call that runs ``searcher``."""
    return f"tune_spaces.driver.run_search(searcher={searcher!r})"


def _searcher_class(searcher: str):
    require(api_entry(searcher))  # Optuna / HyperOpt: one line naming the `tune` extra
    if searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch


def make_searcher(searcher: str, seed: int, concurrency: int, metric: str, mode: str):
    """Tune's search algorithm for ``searcher``, seeded with ``seed``, at most ``concurrency`` trials at
    once; the space comes from the Tuner's ``param_space``. Raises ``MissingExtra`` (one line naming the
    ``tune`` extra) for optuna/hyperopt without it."""
    if searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)
    from ray.tune.search import ConcurrencyLimiter

    cls = _searcher_class(searcher)
    algo = (
        cls(metric=metric, mode=mode, seed=seed)
        if searcher == "optuna"
        else cls(metric=metric, mode=mode, random_state_seed=seed)
    )
    return ConcurrencyLimiter(algo, max_concurrent=concurrency)


def make_scheduler(scheduler: str, *, steps: int, grace_steps: int, reduction_factor: int):
    """Tune's trial scheduler for ``scheduler``, comparing the ``step`` reports of trials that train
    ``steps`` steps (ASHA: first rung at ``grace_steps``; ASHA and HyperBand keep the best
    1/``reduction_factor`` at each rung). ``pbt`` is :func:`tune_spaces.pbt.make_pbt`'s."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    if scheduler == "asha":
        return ASHAScheduler(
            time_attr="step",
            max_t=steps,
            grace_period=grace_steps,
            reduction_factor=reduction_factor,
            stop_last_trials=False,  # a trial that reaches the last step ends by itself, artifacts copied
        )
    if scheduler == "hyperband":
        return HyperBandScheduler(
            time_attr="step", max_t=steps, reduction_factor=reduction_factor, stop_last_trials=False
        )
    if scheduler == "none":
        return FIFOScheduler()
    if scheduler == "pbt":
        raise ConfigError("PBT is built by tune_spaces.pbt.make_pbt (it mutates the search space's keys)")
    raise ConfigError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
