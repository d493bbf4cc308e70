"""Population Based Training (``polar-vbll tune --scheduler pbt``): Tune's ``PopulationBasedTraining`` over
trials that train in segments and continue from one another's checkpoints.

PBT (Jaderberg et al. 2017) trains a population; every ``perturbation_interval`` steps the worst quarter
of the trials *exploit* the best quarter (take a better trial's weights, optimizer moments and settings)
and *explore* (perturb the searched hyperparameters: x0.8 or x1.2 for a number, a neighbouring value for
a choice, or a fresh draw from the space with ``resample_probability``), then train on.

How it maps onto our runs:

- A trial trains in segments of ``perturbation_steps``: each segment is a Ray Train run of the trial's
  run folder that resumes the folder's own latest checkpoint and pauses at the segment's end
  (``Trainer.fit(stop_at=...)``) with a checkpoint and the validation metrics. The trial then reports
  those metrics to Tune with a Tune checkpoint of the training state (``state/``) and :data:`PBT_FILE`
  (which trial wrote it, at which step, with which settings, and the trial's lineage). The schedule (the
  learning-rate schedule, the batch order, the head's refit rounds) is the whole run's, so a trial that
  is not perturbed trains exactly as it would in one piece.
- A trial Tune restarts with another trial's checkpoint (an exploit) replaces its own training state by
  it and *warm-starts* (:mod:`polar_vbll.training.warm_start`): the donor's weights, moments, step and
  history, the new settings. Only settings a warm start may change are mutated (:func:`mutations`); the
  other searched keys are drawn once per trial and copied from the donor on an exploit, as Tune's PBT does.
- The trial's final report carries, besides its final model (``tune_spaces.trial.CHECKPOINT_FILES``),
  its training state, so that a trial exploited at the last step can take the donor's model as it is.

Synchronous PBT (``synch=True``): every trial pauses at each perturbation step until the population
reaches it, so exploits compare trials at the same step and a seeded search makes the same decisions.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from polar_vbll.checkpoint import run_checkpoints, saved_step
from polar_vbll.errors import ConfigError
from polar_vbll.training.warm_start import WARM_START_KEYS, warm_startable

#: What a PBT Tune checkpoint holds besides ``state/``: the trial that wrote it, its step and settings,
#: and its lineage (``[{"from_step", "trial", "params"}]``: whose settings trained which steps).
PBT_FILE = "pbt.json"
#: Where a trial keeps the training state it warm-starts from, inside its run folder.
WARM_START_DIR = "warm-start"
#: Tune checkpoints kept per trial under PBT (an exploited trial's donor must still have its checkpoint).
PBT_CHECKPOINTS_KEPT = 4
QUANTILE_FRACTION = 0.25
RESAMPLE_PROBABILITY = 0.25
#: Seconds a trial waits after a segment's report for synchronous PBT to pause it before it trains on.
PAUSE_WAIT_S = 60.0


def mutations(space: dict[str, Any], where: str) -> dict[str, Any]:
    """The searched keys of ``space`` PBT may change during training: those with a Tune domain (a number's
    range, a ``choice``) that a warm start may change (:data:`polar_vbll.training.warm_start.WARM_START_KEYS`).
    Raises :class:`ConfigError` (one line naming ``where``) when there is none."""
    from ray.tune.search.sample import Domain

    found = {k: v for k, v in space.items() if isinstance(v, Domain) and warm_startable(k)}
    if not found:
        searched = [k for k, v in space.items() if isinstance(v, Domain)]
        raise ConfigError(
            f"{where}: --scheduler pbt changes hyperparameters during training, and none of the searched keys "
            f"({', '.join(searched) or 'none'}) may change mid-run; search a learning rate or another of "
            f"{', '.join(WARM_START_KEYS[:4])}, ... (polar_vbll.training.warm_start), or use --scheduler asha"
        )
    return found


def make_pbt(space: dict[str, Any], where: str, *, interval: int, seed: int):
    """Tune's ``PopulationBasedTraining`` on the ``step`` reports, perturbing every ``interval`` steps,
    mutating :func:`mutations` of ``space``, synchronous. PBT draws its perturbations from Python's
    ``random``, which is seeded here with ``seed``."""
    from ray.tune.schedulers import PopulationBasedTraining

    random.seed(seed)
    return PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=interval,
        hyperparam_mutations=mutations(space, where),
        quantile_fraction=QUANTILE_FRACTION,
        resample_probability=RESAMPLE_PROBABILITY,
        synch=True,
    )


# ---------------------------------------------------------------------------------------------- trial
def own_step(run_dir: Path) -> int:
    """The step of the newest readable checkpoint of a run folder (0 without one)."""
    steps = [saved_step(p) for p in run_checkpoints(run_dir)]
    return int(max((s for s in steps if math.isfinite(s)), default=0))


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def adopt(checkpoint, run_dir: Path, trial_id: str, params: dict[str, Any]) -> tuple[str | None, int, list]:
    """What a (re)started PBT trial continues from: ``(warm-start state folder or None, step, lineage)``.

    No Tune checkpoint: the run folder's own checkpoints, if any (a fresh trial, or one Tune restarts after
    a failure). The trial's own checkpoint with its own settings (PBT paused it): its own Ray Train
    checkpoint, resumed exactly. Another trial's checkpoint, or its own with new settings (an exploit): the
    run folder's training state is replaced by the donor's, copied to :data:`WARM_START_DIR`, and warm-started.
    """
    from distributed.launch import clear_ray_state

    lineage_file = run_dir / PBT_FILE
    if checkpoint is None:
        lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else []
        return None, own_step(run_dir), lineage or [{"from_step": 0, "trial": trial_id, "params": params}]
    with checkpoint.as_directory() as d:
        info = json.loads((Path(d) / PBT_FILE).read_text())
        if info["trial"] == trial_id and _same(info["params"], params):
            return None, own_step(run_dir), info["lineage"]
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_ray_state(run_dir)  # its own checkpoints are another model's now
        dst = run_dir / WARM_START_DIR
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(Path(d) / "state", dst)
    lineage = [*info["lineage"], {"from_step": int(info["step"]), "trial": trial_id, "params": params,
                                  "exploited": info["trial"]}]  # fmt: skip
    lineage_file.write_text(json.dumps(lineage, indent=2, default=str))
    print(f"[pbt] trial {trial_id} continues trial {info['trial']}'s model from step {info['step']} "
          f"with {json.dumps(params, default=str)}", flush=True)  # fmt: skip
    return str(dst), int(info["step"]), lineage


def run_pbt_trial(config: dict[str, Any], *, base: dict[str, Any], dist: dict[str, Any], tracking: dict[str, Any],
                  interval: int) -> None:  # fmt: skip
    """The Tune trainable under PBT (``config``: the trial's current point of the space, dotted keys): train
    the trial's run in segments of ``interval`` steps, reporting each segment's validation metrics with a
    Tune checkpoint of its training state; then the final model (see the module docstring)."""
    from ray import tune

    from distributed.config import DistConfig
    from distributed.launch import run_segment
    from polar_vbll.tracking import client_for
    from tune_spaces.trial import open_child_run, report_final_model, trial_config

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = trial_config(base, config, name=trial_id, output_dir=str(Path(tracking["search_dir"]) / "trials"))
    run_dir = Path(cfg.output_dir) / cfg.name
    target = open_child_run(tracking, trial_id, trial_name, cfg, config)
    warm, step, lineage = adopt(tune.get_checkpoint(), run_dir, trial_id, config)
    client = client_for(target.uri)
    client.set_tag(target.run_id, "polar_vbll.pbt_lineage", json.dumps(lineage, default=str)[:5000])
    dist_cfg = DistConfig.model_validate(dist)
    steps = cfg.train.steps
    while (stop := (step // interval + 1) * interval) < steps:
        metrics, checkpoint = run_segment(cfg, dist_cfg, tracking=target, entry_point="tune", stop_at=stop,
                                          warm_start=warm)  # fmt: skip
        warm, step = None, int(metrics["step"])
        report = {"step": step, **{k: v for k, v in metrics.items() if k.startswith("val_")}}
        with checkpoint.as_directory() as d:
            _report(report, {"state": Path(d) / "state"}, run_dir, trial_id, config, lineage)
        # synchronous PBT pauses every trial at each perturbation step (Tune stops this actor and restarts it
        # later from the checkpoint just reported): wait for that rather than start a segment it would cut off
        time.sleep(PAUSE_WAIT_S)
    results, checkpoint = run_segment(cfg, dist_cfg, tracking=target, entry_point="tune", warm_start=warm)
    client.set_terminated(target.run_id, "FINISHED")
    with checkpoint.as_directory() as d:
        info = {"trial": trial_id, "step": results["training"]["steps"], "params": config, "lineage": lineage}
        (Path(d) / PBT_FILE).write_text(json.dumps(info, indent=2, default=str))
        report_final_model(results, run_dir, extra={"state": Path(d) / "state", PBT_FILE: Path(d) / PBT_FILE})


def _report(metrics: dict[str, Any], files: dict[str, Path], run_dir: Path, trial_id: str, params: dict[str, Any],
            lineage: list) -> None:  # fmt: skip
    from ray import tune

    from tune_spaces.trial import stage

    info = {"trial": trial_id, "step": metrics["step"], "params": params, "lineage": lineage}
    with tempfile.TemporaryDirectory(prefix=".tune-checkpoint-", dir=run_dir) as staging:
        stage(files, Path(staging))
        (Path(staging) / PBT_FILE).write_text(json.dumps(info, indent=2, default=str))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))
