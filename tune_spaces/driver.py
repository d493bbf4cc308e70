"""The search driver behind ``polar-vbll tune``: Ray Tune over a search space, MLflow parent run.

The search algorithm (random, Optuna, HyperOpt) and the trial scheduler (ASHA, HyperBand, none) are Tune's
own (:mod:`tune_spaces.algorithms`); the space is a named one (:mod:`tune_spaces.spaces`) or a YAML file
(:mod:`tune_spaces.space_files`).

A search lives in one folder, ``<output_dir>/<name>/``: Ray Tune's experiment state, ``trials/<trial id>/``
(each trial's distributed run folder: params, checkpoints, adapter, head, results), ``mlflow/`` (the
embedded tracking store, unless ``MLFLOW_TRACKING_URI`` is set), ``search.json`` (the parent run's id),
``trials.md`` / ``trials.csv`` (every trial's searched values and metrics) and ``best_config.yaml`` (the
best trial's full run config, ready for ``polar-vbll train --config``). Each finished trial reports its
final model (config, adapter, head, results) to Tune as a checkpoint, in ``trial_<id>/checkpoint_000000/``,
so that ``tune.Tuner.restore(folder, ...).get_results().get_best_result(...).checkpoint`` reaches it.

Rerunning the same command resumes: Tune restores its experiment (unfinished and errored trials run again,
each resuming its own latest checkpoint) and the MLflow parent and child runs are reused.

Objective: validation NLL (lower is better), with ECE and accuracy reported beside it; trials report the
validation metrics every ``train.eval_every`` steps, which is what the scheduler compares. The best trial is
chosen among the trials that ran to the end (trials the scheduler stopped only when none did), by their
final validation NLL: the test split is never looked at to choose.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distributed.config import DistConfig
from distributed.launch import (
    WORKERS,
    first_error_line,
    prepare_run,
    ray_session,
    worker_env,
)
from distributed.launch import check_reachable as check_ray_address
from polar_vbll.config import RunConfig, check_plain_name, parse_config
from polar_vbll.errors import ConfigError, RunFailure
from polar_vbll.extras import require
from polar_vbll.files import read_json
from polar_vbll.locking import FolderLock
from polar_vbll.provenance import differences
from polar_vbll.support import EntryPoint, check_supported
from polar_vbll.tracking import (
    RunLogger,
    TrackingTarget,
    check_reachable,
    client_for,
    credentials_note,
    ensure_experiment,
    mask_secrets,
    mask_uri,
    resolve_store,
    strip_credentials,
)
from tune_spaces.algorithms import SCHEDULERS, SEARCHERS, check_searcher, make_scheduler, make_searcher
from tune_spaces.pbt import PBT_CHECKPOINTS_KEPT, PBT_FILE, make_pbt, mutations, run_pbt_trial
from tune_spaces.space_files import SpaceSource
from tune_spaces.spaces import ParamSpace, describe, get_space, resolve_space, searched_keys
from tune_spaces.trial import TAG_PARENT, TAG_ROLE, TAG_SEARCH, run_trial, trial_config

# get_space: the named spaces, kept importable from here (tests/test_faults.py)
__all__ = ["get_space", "run_search", "search_settings", "SearchSettings", "SearchOutcome", "SearchFailed"]

OBJECTIVE, MODE = "val_nll", "min"
#: Tune checkpoints kept per trial: each finished trial reports one (its final model).
TUNE_CHECKPOINTS_KEPT = 1
#: How a trial the scheduler stopped is shown.
STOPPED_BY = {"asha": "ASHA", "hyperband": "HyperBand", "none": "the scheduler", "pbt": "PBT"}
#: Metrics shown beside the searched values (``polar-vbll tune`` output, trials.md, ``polar-vbll runs``).
TABLE_METRICS = ("step", "val_nll", "val_ece", "val_acc", "test_nll", "test_ece", "test_acc")


class SearchFailed(RunFailure):
    """Every trial of a search failed; the message lists each trial's first error."""


#: What a search trial refuses (it is a distributed training: the same as ``train --workers``).
TRIAL = EntryPoint("a search trial (polar-vbll tune)", WORKERS.refused)


class SearchSettings(BaseModel):
    """How a search runs (not what a trial trains: that is the base ``RunConfig`` plus the space).

    ``space``: a named space or a YAML space file. ``searcher``: ``random`` (default), ``optuna`` or
    ``hyperopt`` (the ``tune`` extra). ``scheduler``: ``asha`` (default), ``hyperband``, ``pbt``
    (:mod:`tune_spaces.pbt`; with ``random`` only: PBT makes the later configurations itself) or ``none``.
    ``grace_steps`` (training steps) is ASHA's alone; ``reduction_factor`` ASHA's and HyperBand's;
    ``perturbation_steps`` PBT's (default ``train.eval_every``). Raises ``ValidationError`` (through
    :func:`search_settings`: a :class:`ConfigError`) for a bad value or a setting the scheduler ignores."""

    model_config = ConfigDict(extra="forbid")

    space: str
    trials: int = Field(4, gt=0, description="number of sampled configurations")
    concurrency: int | None = Field(
        None, gt=0, description="trials at once (default: as many as the CPUs hold, workers x cpus each)"
    )
    searcher: str = Field("random", description="search algorithm: random, optuna, hyperopt")
    scheduler: str = Field("asha", description="trial scheduler: asha, hyperband, pbt, none")
    grace_steps: int | None = Field(None, gt=0, description="ASHA: steps before a trial may be stopped")
    reduction_factor: int = Field(2, gt=1, description="ASHA, HyperBand: keep the best 1/factor at each rung")
    perturbation_steps: int | None = Field(None, gt=0, description="PBT: steps between exploits (train.eval_every)")
    seed: int = Field(0, ge=0, description="seed of the search algorithm")

    @model_validator(mode="after")
    def _fits_the_algorithms(self) -> SearchSettings:
        if self.searcher not in SEARCHERS:
            raise ValueError(f"searcher {self.searcher!r} is not one of {', '.join(SEARCHERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.scheduler == "pbt" and self.searcher != "random":
            raise ValueError(f"--scheduler pbt makes the later configurations itself (exploit and explore): use "
                             f"--search random, not {self.searcher}")  # fmt: skip
        if self.perturbation_steps is not None and self.scheduler != "pbt":
            raise ValueError(f"perturbation_steps is PBT's setting; --scheduler {self.scheduler} perturbs nothing")
        if self.grace_steps is not None and self.scheduler != "asha":
            raise ValueError(f"grace_steps is ASHA's setting; --scheduler {self.scheduler} has no grace period")
        if "reduction_factor" in self.model_fields_set and self.scheduler in ("none", "pbt"):
            raise ValueError(f"reduction_factor is ASHA's and HyperBand's setting; --scheduler {self.scheduler} "
                             "has no rungs")  # fmt: skip
        return self


def search_settings(**values: Any) -> SearchSettings:
    """Validate search settings, naming each bad one in a :class:`ConfigError` (exit 2 at the CLI)."""
    try:
        return SearchSettings(**values)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]  # fmt: skip
        if len(lines) == 1:
            raise ConfigError(f"invalid search settings: {lines[0].removeprefix('settings: ')}") from None
        raise ConfigError("invalid search settings:\n" + "\n".join(f"  {ln}" for ln in lines)) from None


@dataclass
class SearchOutcome:
    """What a finished search found."""

    folder: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_path: Path | None
    tracking_uri: str
    parent_run_id: str
    errors: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    best_checkpoint: str | None = None  # the best trial's Tune checkpoint (its final model), a path


# ------------------------------------------------------------------------------------------ checking
def check_space(space: ParamSpace, base: dict[str, Any], name: str, where: str = "search space") -> None:
    """Every key names a real config field and every value is valid (each choice and grid value, the
    bounds of a numeric domain, then one draw), before Ray starts; a :class:`ConfigError` of one line naming
    ``where`` (the space or its file), the key and the value. Deterministic: the other keys sit at their first
    value (a numeric domain's lower bound) while one key's values are tried."""
    from ray.tune.search.sample import Categorical, Domain, Float, Integer

    def values(v: Any) -> list[Any]:
        if isinstance(v, dict) and set(v) == {"grid_search"}:
            return list(v["grid_search"])
        if isinstance(v, Categorical):
            return list(v.categories)
        if isinstance(v, Integer):  # the bounds first: a refusal names a bound, never a random draw
            return [v.lower, v.upper - 1, v.sample()]  # randint's upper bound is excluded
        if isinstance(v, Float):
            return [v.lower, v.upper, v.sample()]
        if isinstance(v, Domain):
            return [v.sample()]
        return [v]

    def check(params: dict[str, Any]) -> None:
        check_supported(trial_config(base, params, name, base["output_dir"]), TRIAL)

    sample = {k: values(v)[0] for k, v in space.items()}
    for key, value in space.items():
        for choice in values(value):  # every choice, not one draw
            try:
                check({**sample, key: choice})
            except ConfigError as exc:
                text = " ".join(str(exc).split())
                raise ConfigError(f"{where}: value {key}={choice!r} is not a valid run config: {text}") from None
    try:
        check(sample)
    except ConfigError as exc:
        raise ConfigError(f"{where} does not fit the run config: {' '.join(str(exc).split())}") from None


def default_concurrency(dist: DistConfig, cpus: float | None = None) -> int:
    per_trial = dist.workers * dist.cpus_per_worker
    cpus = cpus if cpus is not None else float(os.cpu_count() or 1)
    return max(1, int(cpus // per_trial))


def _prepare_base(cfg: RunConfig, announce: bool = True) -> RunConfig:
    """The schedulers need intermediate validation: default ``train.eval_every`` to a quarter of the steps
    (said on stdout when ``announce``; :func:`run_search` says it after its checks)."""
    if cfg.train.eval_every == 0:
        every = max(1, cfg.train.steps // 4)
        if announce:
            print(_eval_note(every))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": every})})
    return cfg


def _eval_note(every: int) -> str:
    return f"[tune] train.eval_every was 0; validating every {every} steps so that the scheduler can compare trials"


# --------------------------------------------------------------------------------------- parent run
def _open_parent(
    folder: Path,
    name: str,
    settings: SearchSettings,
    space: ParamSpace,
    cfg: RunConfig,
    dist: DistConfig,
    concurrency: int,
    source: SpaceSource,
) -> dict[str, Any]:
    uri, artifacts = resolve_store(folder)
    check_reachable(uri)
    experiment_id = ensure_experiment(uri, f"polar-vbll-{name}", artifacts)
    record_path = folder / "search.json"
    client = client_for(uri)
    if record_path.is_file():
        record = read_json(record_path, "the search record", SEARCH_FIX)
        if record.get("tracking_uri") == mask_uri(uri):
            try:
                client.get_run(record["parent_run_id"])
                client.update_run(record["parent_run_id"], status="RUNNING")
                return {**record, "uri": uri, "experiment_id": experiment_id}
            except Exception:
                pass  # the store was replaced: start a new parent run
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={TAG_SEARCH: name, TAG_ROLE: "search", "polar_vbll.space": source.name},
    )
    logger = RunLogger(TrackingTarget(uri, run.info.run_id))
    used = algorithm_settings(cfg, settings, concurrency)
    logger.log_params(
        {
            **{f"search.{k}": v for k, v in settings.model_dump().items()},
            **used,
            "search.objective": f"{MODE} {OBJECTIVE}",
            **source.record(),
            **{f"space.{k}": v for k, v in describe(space).items()},
            **{f"dist.{k}": v for k, v in dist.model_dump(mode="json").items()},
            **{f"base.{k}": v for k, v in cfg.flat_params().items()},
        }
    )
    record = {"parent_run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": mask_uri(uri),
              "space": source.record(), "algorithms": used,
              "settings": search_provenance(cfg, settings, space, source)}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    return {**record, "uri": uri}


def algorithm_settings(cfg: RunConfig, settings: SearchSettings, concurrency: int) -> dict[str, Any]:
    """The settings the searcher and the scheduler run with, defaults resolved (params ``search.*_used``)."""
    used: dict[str, Any] = {"search.concurrency_used": concurrency, "search.max_steps": cfg.train.steps,
                            "search.tune_checkpoints_kept": TUNE_CHECKPOINTS_KEPT}  # fmt: skip
    if settings.scheduler == "asha":
        used["search.grace_steps_used"] = settings.grace_steps or cfg.train.eval_every
    if settings.scheduler == "pbt":
        used["search.perturbation_steps_used"] = settings.perturbation_steps or cfg.train.eval_every
        used["search.tune_checkpoints_kept"] = PBT_CHECKPOINTS_KEPT
    return used


def search_provenance(
    cfg: RunConfig, settings: SearchSettings, space: ParamSpace, source: SpaceSource | None = None
) -> dict[str, Any]:
    """What a search's trials depend on (flat): the base run config, the space (its domains, and for a
    file its sha256: an edited file is another search; where the file lies is not) and the search
    settings (all but how many trials run at once)."""
    base = {f"base.{k}": v for k, v in cfg.flat_params().items()}
    searched = {f"space.{k}": v for k, v in describe(space).items()}
    skip = ("concurrency", "space") if source is not None and source.is_file else ("concurrency",)
    how = {f"search.{k}": v for k, v in settings.model_dump().items() if k not in skip}
    if source is not None and source.is_file:
        how["space.sha256"] = source.sha256
    return {**base, **searched, **how}


#: What to do about a damaged search.json.
SEARCH_FIX = "start a new search under another name (--name), or delete the folder to start this one afresh"


def check_same_search(
    folder: Path, cfg: RunConfig, settings: SearchSettings, space: ParamSpace, source: SpaceSource | None = None
) -> None:
    """A rerun resumes a search only with the settings it was started with (base config, space and its
    file's content, searcher, scheduler and their settings); otherwise exit 2 naming what changed and how
    to start a new one (its trials would mix two searches)."""
    record_path = folder / "search.json"
    if not record_path.is_file():
        return
    old = read_json(record_path, "the search record", SEARCH_FIX).get("settings")
    new = search_provenance(cfg, settings, space, source)
    if old is not None:  # a setting added since the search started, left unset, is the search's own
        new = {k: v for k, v in new.items() if k in old or v is not None}
    if old is not None and old != json.loads(json.dumps(new, default=str)):
        raise ConfigError(
            f"the search in {folder} was started with other settings: {differences(old, new)}; rerun it with "
            "the same settings to resume it, or start a new search under another name (--name)"
        )


# --------------------------------------------------------------------------------------------- search
def run_search(
    cfg: RunConfig,
    settings: SearchSettings,
    dist: DistConfig | None = None,
    address: str | None = None,
    object_store_mb: int = 256,
) -> SearchOutcome:
    """Run (or resume) the search ``cfg.name`` over ``settings.space``; see the module docstring.

    Everything is checked before anything is written: the extras (``MissingExtra``), the space (a named
    one or a YAML file: ``UserInputError`` / ``ConfigError``, one line naming the file and key), that the
    searcher takes it, the scheduler's steps, and that a resumed search has its own settings."""
    require("tune_spaces.driver.run_search")  # Ray, DeepSpeed, MLflow: one line naming the extras
    if settings.searcher != "random":
        require(f"tune_spaces.driver.run_search(searcher={settings.searcher!r})")  # Optuna / HyperOpt: `tune`
    dist = dist or DistConfig()
    check_plain_name(cfg.name, "the search name")
    if target := address or os.environ.get("RAY_ADDRESS"):
        check_ray_address(target)  # before any work: a bad address is one line in seconds
    space, source = resolve_space(settings.space)
    where = f"space file {source.path}" if source.is_file else f"search space {source.name!r}"
    check_searcher(settings.searcher, space, where)
    given = prepare_run(cfg, dist, TRIAL, kind="search")
    cfg = _prepare_base(given, announce=False)
    if settings.grace_steps is not None and settings.grace_steps > cfg.train.steps:
        raise ConfigError(f"--grace-steps {settings.grace_steps} is more than train.steps ({cfg.train.steps}): "
                          "no trial could be stopped")  # fmt: skip
    if settings.scheduler == "pbt":
        interval = settings.perturbation_steps or cfg.train.eval_every
        if interval >= cfg.train.steps:
            raise ConfigError(f"--perturbation-steps {interval} is not below train.steps ({cfg.train.steps}): "
                              "PBT would never perturb a trial")  # fmt: skip
        mutations(space, where)  # one line when no searched key may change during training
    folder = Path(cfg.output_dir).expanduser().resolve() / cfg.name
    base = cfg.model_dump(mode="json")
    check_space(space, base, cfg.name, where)
    check_same_search(folder, cfg, settings, space, source)
    if cfg.train.eval_every != given.train.eval_every:
        print(_eval_note(cfg.train.eval_every))  # after the checks: a refused search prints its one line only
    with FolderLock(folder, "polar-vbll tune"):  # one writer per search folder, taken before anything is written
        return _search(cfg, settings, dist, space, source, folder, base, address, object_store_mb)


def _search(cfg: RunConfig, settings: SearchSettings, dist: DistConfig, space: ParamSpace, source: SpaceSource,
            folder: Path, base, address: str | None, object_store_mb: int) -> SearchOutcome:  # fmt: skip
    concurrency = settings.concurrency or default_concurrency(dist)
    parent = _open_parent(folder, cfg.name, settings, space, cfg, dist, concurrency, source)
    if note := credentials_note(parent["uri"]):
        print(note, flush=True)
    tracking = {
        "uri": strip_credentials(parent["uri"]),  # trials authenticate with their node's environment
        "experiment_id": parent["experiment_id"],
        "parent_run_id": parent["parent_run_id"],
        "search": cfg.name,
        "search_dir": str(folder),
        "searched": sorted(searched_keys(space)),
    }
    # Tune checks that every report carries the objective; checkpoint-only reports do not.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune's JSON/CSV result files are kept (its ResultGrid reads them); its TensorBoard logger is not:
    # MLflow is the record, and TensorBoard warns on every non-scalar field of the final report.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    num_cpus = max(1, int(round(concurrency * dist.workers * dist.cpus_per_worker)))
    status = "FAILED"
    try:
        with ray_session(address, num_cpus=num_cpus, object_store_mb=object_store_mb, env=worker_env(dist)):
            grid = _tune(cfg, settings, space, dist, base, tracking, folder, concurrency)
        rows, errors, configs, checkpoints = _rows(grid, space, cfg.train.steps, STOPPED_BY[settings.scheduler])
        if grid.num_terminated + grid.num_errors < settings.trials:
            # Ctrl-C / SIGTERM: Tune saved its state and returned. Leave the runs open for the resume.
            status = "KILLED"
            for row in rows:
                if row["status"].startswith("stopped early by"):
                    row["status"] = f"unfinished (interrupted, or stopped by {STOPPED_BY[settings.scheduler]})"
            return SearchOutcome(
                folder, rows, None, None, parent["uri"], parent["parent_run_id"], errors, interrupted=True
            )
        _close_children(tracking, rows, errors)
        outcome = _finish(cfg, folder, rows, errors, parent, base, configs, checkpoints)
        status = "FINISHED"
        return outcome
    finally:
        client_for(parent["uri"]).set_terminated(parent["parent_run_id"], status)


def _tune(cfg, settings, space, dist, base, tracking, folder: Path, concurrency: int):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    interval = (settings.perturbation_steps or cfg.train.eval_every) if settings.scheduler == "pbt" else None
    trial, extra = (run_trial, {}) if interval is None else (run_pbt_trial, {"interval": interval})
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base, dist=dist.model_dump(mode="json"), tracking=tracking, **extra),
        {"cpu": 0, "memory": 64 * 1024 * 1024},  # the trial only drives; its Train workers hold the CPUs
    )
    if tune.Tuner.can_restore(str(folder)):
        print(f"[tune] resuming the search in {folder}")
        tuner = tune.Tuner.restore(
            str(folder), trainable=trainable, param_space=space, resume_unfinished=True, resume_errored=True
        )
    else:
        if interval is not None:
            scheduler = make_pbt(space, f"search space {settings.space!r}", interval=interval, seed=settings.seed)
        else:
            scheduler = make_scheduler(
                settings.scheduler,
                steps=cfg.train.steps,
                grace_steps=settings.grace_steps or cfg.train.eval_every,
                reduction_factor=settings.reduction_factor,
            )
        searcher = make_searcher(settings.searcher, settings.seed, concurrency, OBJECTIVE, MODE)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode=MODE,
                scheduler=scheduler,
                num_samples=settings.trials,
                search_alg=searcher,
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=str(folder.parent),
                verbose=1,
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
                # each finished trial reports one checkpoint, its final model (tune_spaces.trial)
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=PBT_CHECKPOINTS_KEPT if interval is not None else TUNE_CHECKPOINTS_KEPT
                ),
            ),
        )
    return tuner.fit()


def _rows(grid, space: ParamSpace, steps: int, stopper: str = "ASHA"):
    """Per trial: its table row (searched values, status, metrics), its first error line, every value of
    the space it ran with (the constant entries too, e.g. a space's ``method``) and the path of its Tune
    checkpoint (its final model; None for a trial that did not finish)."""
    searched = searched_keys(space)
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    configs: dict[str, dict] = {}
    checkpoints: dict[str, str | None] = {}
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = m.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        configs[trial_id] = dict(result.config or {})
        checkpoints[trial_id] = result.checkpoint.path if result.checkpoint is not None else None
        row: dict[str, Any] = {"trial": trial_id}
        row.update({k: result.config.get(k) for k in searched})
        row.update({k: m.get(k) for k in TABLE_METRICS})
        if result.error is not None:
            text = str(result.error).strip()
            errors[trial_id] = mask_secrets(first_error_line(text))
            row["status"] = "error"
        else:
            row["status"] = "completed" if (m.get("step") or 0) >= steps else f"stopped early by {stopper}"
        rows.append(row)
    return rows, errors, configs, checkpoints


def _close_children(tracking: dict[str, Any], rows: list[dict[str, Any]], errors: dict[str, str]) -> None:
    """Trials that failed or that ASHA stopped (killed mid-step) leave their MLflow runs RUNNING: close
    them from Tune's record (FAILED with the first error line, or KILLED), saying why in a tag."""
    client = client_for(tracking["uri"])
    status_of = {r["trial"]: r["status"] for r in rows}
    for run in client.search_runs(
        [tracking["experiment_id"]], filter_string=f"tags.`{TAG_PARENT}` = '{tracking['parent_run_id']}'"
    ):
        if run.info.status != "RUNNING":
            continue
        trial = run.data.tags.get("polar_vbll.trial_id", "")
        why = status_of.get(trial, "interrupted")
        client.set_tag(run.info.run_id, "polar_vbll.end", why)
        if why == "error":
            client.set_tag(run.info.run_id, "polar_vbll.error", errors.get(trial, "")[:5000])
        status = {"completed": "FINISHED", "error": "FAILED"}.get(why, "KILLED")
        client.set_terminated(run.info.run_id, status)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    def ok(r):
        v = r.get(OBJECTIVE)
        return r["status"] != "error" and isinstance(v, (int, float)) and math.isfinite(v)

    finished = [r for r in rows if ok(r) and r["status"] == "completed"]
    pool = finished or [r for r in rows if ok(r)]
    return min(pool, key=lambda r: r[OBJECTIVE]) if pool else None


def best_trial_config(cfg: RunConfig, folder: Path, trial: str, params: dict[str, Any], base) -> RunConfig:
    """The complete config the best trial trained with, renamed ``<search>-best`` in ``output_dir``: its run
    folder's ``config.yaml`` (what it trained, ``model.dtype`` resolved), else the base with every value
    of the space it ran with (searched and constant alike)."""
    saved = folder / "trials" / trial / "config.yaml"
    if saved.is_file():
        data = yaml.safe_load(saved.read_text())
    else:
        data = trial_config(base, params, "best", cfg.output_dir).model_dump(mode="json")
    data.update(name=f"{cfg.name}-best", output_dir=cfg.output_dir)
    return parse_config(data, f"the best trial {trial}")


def _finish(cfg: RunConfig, folder: Path, rows, errors, parent, base, configs, checkpoints) -> SearchOutcome:
    if rows and len(errors) == len(rows):
        lines = "\n".join(f"  trial {t}: {e}" for t, e in sorted(errors.items()))
        raise SearchFailed(f"all {len(rows)} trials of search {cfg.name!r} failed:\n{lines}")
    rows.sort(key=lambda r: (r.get(OBJECTIVE) is None, r.get(OBJECTIVE) or 0.0))
    table_md = folder / "trials.md"
    table_md.write_text(format_trials(rows) + "\n")
    with (folder / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    best = _best(rows)
    best_path = best_checkpoint = None
    logger = RunLogger(TrackingTarget(parent["uri"], parent["parent_run_id"]))
    if best is not None:
        searched = {k: v for k, v in best.items() if k not in ("trial", "status", *TABLE_METRICS)}
        best_cfg = best_trial_config(cfg, folder, best["trial"], {**searched, **configs.get(best["trial"], {})}, base)
        best_path = folder / "best_config.yaml"
        header = (
            f"# Best trial {best['trial']} of search {cfg.name!r} ({OBJECTIVE} = {best[OBJECTIVE]:.4f}; "
            f"chosen on validation).\n# Train it: polar-vbll train --config {best_path}\n"
        ) + pbt_schedule_note(folder / "trials" / best["trial"])
        best_path.write_text(header + yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False))
        logger.log_metrics({f"best_{k}": v for k, v in best.items() if k in TABLE_METRICS and v is not None})
        best_checkpoint = checkpoints.get(best["trial"])
        logger.set_tags({"polar_vbll.best_trial": best["trial"], "polar_vbll.best_checkpoint": str(best_checkpoint)})
        logger.log_artifact(best_path)
    for path in (table_md, folder / "trials.csv"):
        logger.log_artifact(path)
    return SearchOutcome(folder, rows, best, best_path, parent["uri"], parent["parent_run_id"], errors,
                         best_checkpoint=best_checkpoint)  # fmt: skip


def pbt_schedule_note(run_dir: Path) -> str:
    """Under PBT, the best trial's schedule as comment lines (its lineage, ``tune_spaces.pbt.PBT_FILE``):
    the settings below are the last ones only; empty for other schedulers."""
    path = run_dir / PBT_FILE
    if not path.is_file():
        return ""
    lines = ["# PBT trained this model with a schedule; the settings below are its last ones. The schedule:"]
    for part in json.loads(path.read_text()):
        took = f", taking trial {part['exploited']}'s model" if part.get("exploited") else ""
        lines.append(f"#   from step {part['from_step']}, trial {part['trial']}{took}: "
                     f"{json.dumps(part['params'], default=str)}")  # fmt: skip
    return "\n".join(lines) + "\n"


def format_trials(rows: list[dict[str, Any]]) -> str:
    """The trials as a Markdown table (searched values, status, metrics)."""
    if not rows:
        return "(no trials)"
    return markdown_table(list(rows[0]), [[_fmt(r.get(c)) for c in rows[0]] for r in rows])


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
