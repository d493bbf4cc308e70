"""One trial of a search: its run config, its MLflow child run, and the distributed training it runs.

The trial function is the current Ray pattern (a Tune function trainable that builds and fits a Ray
Train run itself, with ``TuneReportCallback`` forwarding rank 0's reports to Tune), not the deprecated
``Tuner(trainer)``. A trial that is restarted after an interruption reuses its MLflow child run (found by
its trial-id tag) and resumes its Ray Train run from the latest checkpoint (same name, same storage).

A trial reports its final metrics to Tune itself, after its run folder is complete, with a Tune
``Checkpoint`` of its final model (:data:`CHECKPOINT_FILES` of its run folder: config, params, adapter,
head, results; not the training checkpoints, not the backbone), so that Tune's
``ResultGrid.get_best_result().checkpoint`` holds the best trial's adapter and head. The workers' own
final report is therefore not forwarded (:func:`forward_until_the_end`): a scheduler that stops a trial
on its last report would otherwise end it before its artifacts reach its run folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from distributed.config import DistConfig
from polar_vbll.config import RunConfig, parse_config
from polar_vbll.tracking import RunLogger, TrackingTarget, client_for

#: Tags that tie a child run to its search and trial (``polar-vbll runs`` reads them).
TAG_SEARCH, TAG_TRIAL, TAG_PARENT = "polar_vbll.search", "polar_vbll.trial_id", "mlflow.parentRunId"
TAG_ROLE = "polar_vbll.role"

#: What a trial's Tune checkpoint holds of its run folder: a saved run (``polar-vbll eval`` reads it).
CHECKPOINT_FILES = ("config.yaml", "params.json", "readout.json", "adapter", "head.safetensors", "results.json")


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a ``RunConfig`` dump) with each dotted ``params`` key set, as ``--set`` would."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def trial_config(base: dict[str, Any], params: dict[str, Any], name: str, output_dir: str) -> RunConfig:
    data = apply_params(base, params)
    data.update(name=name, output_dir=output_dir)
    return parse_config(data, f"trial {name}")


def open_child_run(
    tracking: dict[str, Any], trial_id: str, trial_name: str, cfg: RunConfig, params: dict[str, Any]
) -> TrackingTarget:
    """The trial's MLflow child run (reused when the trial is resumed), with every config value as a
    param and the searched values as a tag."""
    client = client_for(tracking["uri"])
    found = client.search_runs(
        [tracking["experiment_id"]],
        filter_string=f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`{TAG_PARENT}` = '{tracking['parent_run_id']}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return TrackingTarget(tracking["uri"], run_id)
    run = client.create_run(
        tracking["experiment_id"],
        run_name=trial_name,
        tags={
            TAG_PARENT: tracking["parent_run_id"],
            TAG_SEARCH: tracking["search"],
            TAG_TRIAL: trial_id,
            TAG_ROLE: "trial",
            "polar_vbll.searched": json.dumps(
                {k: v for k, v in params.items() if k in tracking.get("searched", params)},
                sort_keys=True,
                default=str,
            ),
        },
    )
    target = TrackingTarget(tracking["uri"], run.info.run_id)
    RunLogger(target).log_params(cfg.flat_params())
    return target


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], dist: dict[str, Any], tracking: dict[str, Any]
) -> None:
    """The Tune trainable: ``config`` is the sampled point of the search space (dotted keys). Under
    ``--scheduler pbt`` the trainable is :func:`tune_spaces.pbt.run_pbt_trial` (the trial trains in segments).

    A trial that fails, or that ASHA stops (Tune kills it mid-run), never gets here to close its MLflow
    run: the driver closes it afterwards from Tune's own record (FAILED with the error, or KILLED).
    """
    from ray import tune

    from distributed.launch import run_in_session

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = trial_config(base, config, name=trial_id, output_dir=str(Path(tracking["search_dir"]) / "trials"))
    target = open_child_run(tracking, trial_id, trial_name, cfg, config)
    results = run_in_session(
        cfg,
        DistConfig.model_validate(dist),
        resume=True,
        callbacks=[forward_until_the_end(cfg.train.steps)],
        tracking=target,
        entry_point="tune",
    )
    client_for(target.uri).set_terminated(target.run_id, "FINISHED")
    report_final_model(results, Path(cfg.output_dir) / cfg.name)


def forward_until_the_end(steps: int):
    """Ray Train's ``TuneReportCallback`` (rank 0's reports reach Tune's scheduler), less the reports at
    the last step (``step >= steps``): the trial reports those itself, with its model, once its run folder
    is complete (:func:`report_final_model`)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardUntilTheEnd(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and (metrics[0].get("step") or 0) >= steps:
                return
            super().after_report(run_context, metrics, checkpoint)

    return ForwardUntilTheEnd()


def report_final_model(results: dict[str, Any], run_dir: Path, extra: dict[str, Path] | None = None) -> None:
    """Report the trial's final metrics (what rank 0's last report held) with a Tune checkpoint of its
    final model (:data:`CHECKPOINT_FILES`, and ``extra``: name -> file or folder); Tune copies it into the
    trial's folder. The staging folder hard-links the files where it can, so only Tune's own copy is written."""
    from ray import tune

    from polar_vbll.results import flat_metrics

    summary = {"step": results["training"]["steps"], **flat_metrics(results)}
    with tempfile.TemporaryDirectory(prefix=".tune-checkpoint-", dir=run_dir) as staging:
        stage({**{name: run_dir / name for name in CHECKPOINT_FILES}, **(extra or {})}, Path(staging))
        tune.report(summary, checkpoint=tune.Checkpoint.from_directory(staging))


def stage(files: dict[str, Path], staging: Path) -> None:
    """Hard-link (else copy) each existing file or folder of ``files`` (name -> path) into ``staging``."""
    for name, src in files.items():
        dst = staging / name
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        elif src.is_file():
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)
