"""Resuming on another number of workers, and across the two entry points (issue #25, part 3).

A run folder's checkpoints, whichever entry point wrote them (one process: ``checkpoint-<step>/``; Ray
Train workers: ``checkpoint_<time>/state/``), are one list ordered by step; the newest intact one is where
a rerun resumes, in one process or on any number of workers. Run end to end: 2 workers stopped after a
checkpoint and resumed on 1 worker and in one process, 1 worker resumed on 2, one process resumed on 2;
each resumed loss history (from the resume step on) and final adapter compared with an uninterrupted run
on the resuming side. The tolerances are those of ``tests/test_distributed.py``'s 1 vs 2 workers test
(2e-5): a global batch split over another number of ranks is summed in another order, nothing else
differs (docs/distributed.md, "Resuming on another number of workers", has the measured differences).
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from distributed.faults import Interrupted, StopAfter
from polar_vbll.checkpoint import (
    RAY_STATE_FILES,
    clear_run_checkpoints,
    rng_state,
    run_checkpoints,
    save_checkpoint,
)
from polar_vbll.config import RunConfig, load_config, packaged_config
from polar_vbll.training import LocalCheckpoints
from polar_vbll.training.trainer import restore_rng, resumed_seed
from tests.optional import for_entry

WORKERS = for_entry("polar-vbll train --workers")
STEPS, STOP = 6, 3  # checkpoint every 3 steps; stopped right after the step-3 checkpoint
SETTINGS = ["method=polar_vbll", "head.vbll.predictive=probit", f"train.steps={STEPS}",
            f"train.checkpoint_every={STOP}", "train.alternation=per_round", "train.round_steps=2"]  # fmt: skip
TOL = 2e-5


def _cfg(root: Path, name: str) -> RunConfig:
    return load_config(packaged_config("run", "tiny"), [f"output_dir={root}", f"name={name}", *SETTINGS])


# --------------------------------------------------------------------------------- the rule, no model
def _ray_folder(run: Path, stamp: str) -> Path:
    return run / f"checkpoint_2026-12-07_10-00-{stamp}" / "state"


def test_the_newest_checkpoint_of_a_run_folder_is_found_whichever_entry_point_wrote_it(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint-2", {"step": 2})
    save_checkpoint(_ray_folder(run, "00.000001"), {"step": 4})  # Ray's names sort by time, not by step
    save_checkpoint(run / "checkpoint-3", {"step": 3})
    (run / "checkpoint-9.tmp-x").mkdir()  # debris of an interrupted write: not a checkpoint
    (run / "checkpoint_2026-12-07_10-00-09.000000").mkdir()  # a Ray folder without state: not one either
    assert [p.relative_to(run).parts[0] for p in run_checkpoints(run)] == [
        "checkpoint-2", "checkpoint-3", "checkpoint_2026-12-07_10-00-00.000001"]  # fmt: skip
    store = LocalCheckpoints(run, keep=2)
    assert store.latest()["step"] == 4  # the workers' step 4 is newer than one process's step 3
    save_checkpoint(run / "checkpoint-4", {"step": 4, "again": True})  # the same step written later wins
    assert store.latest() == {"step": 4, "again": True}
    # a damaged newest one (its meta unreadable) is tried first and skipped, with a warning naming it
    save_checkpoint(_ray_folder(run, "05.000000"), {"step": 6})
    (_ray_folder(run, "05.000000") / "meta.json").write_text("{")
    with pytest.warns(UserWarning, match="resuming from the older intact"):
        assert store.latest() == {"step": 4, "again": True}


def test_a_fresh_start_removes_both_kinds_of_checkpoint_and_rays_resume_state(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint-2", {"step": 2})
    save_checkpoint(_ray_folder(run, "00.000000"), {"step": 4})
    for name in (*RAY_STATE_FILES, "trainer_state.json", "results.json"):
        (run / name).write_text("{}")
    assert clear_run_checkpoints(run) == 2
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]
    assert LocalCheckpoints(run, keep=2).latest() is None


def test_rank_r_continues_rank_rs_stream_and_a_new_rank_is_seeded_by_rank_and_step():
    streams = []
    for seed in (10, 11):  # the checkpoint of a 2-rank run: each rank's stream
        torch.manual_seed(seed)
        streams.append(rng_state())
    state = {"step": 3, "rng": streams[0], "rng_per_rank": streams}

    def draws(rank: int) -> torch.Tensor:
        torch.manual_seed(999)  # whatever the process held before
        restore_rng(state, rank, seed=0)
        return torch.rand(4)

    for rank, seed in ((0, 10), (1, 11), (2, resumed_seed(0, 2, 3))):
        torch.testing.assert_close(draws(rank), torch.rand(4, generator=torch.Generator().manual_seed(seed)),
                                   rtol=0, atol=0)  # fmt: skip
    assert len({resumed_seed(0, r, s) for r in range(8) for s in range(1, 50)} | set(range(8))) == 8 + 8 * 49


def test_a_global_batch_that_another_layout_cuts_differently_is_refused(tmp_path):
    """``train.batch_size`` above the training split is cut to a multiple of workers x grad_accum: a
    checkpoint whose steps took another number of examples than this layout's is refused in one line."""
    from polar_vbll.errors import CheckpointError
    from tests.test_alternating import _vbll_setup

    trainer = _vbll_setup(tmp_path / "a", steps=2, batch_size=30)
    assert trainer.batch_size == 24  # one process: the whole split of 24
    trainer.train_step()
    state = trainer.state_dict()
    _vbll_setup(tmp_path / "b", steps=2, batch_size=30).resume(state)  # the same layout resumes
    state["batch_size"] = 20  # what 5 workers take: 30 cut to the largest multiple of 5 within 24
    with pytest.raises(
        CheckpointError, match="took 20 examples each, this run's would take 24 .* --no-resume"
    ):
        _vbll_setup(tmp_path / "c", steps=2, batch_size=30).resume(state)


# ----------------------------------------------------------------------------- one process, no Ray
def _one_process_stopped(cfg: RunConfig, stop: int) -> None:
    """One process trained to ``stop`` (its checkpoint written), then interrupted (a hook raising)."""
    from polar_vbll.runner import local_backend
    from polar_vbll.session import build_session
    from polar_vbll.training import Trainer
    from polar_vbll.training.coordinator import LocalCoordinator

    session = build_session(cfg)
    store = LocalCheckpoints(cfg.run_dir(), cfg.train.keep_checkpoints)
    trainer = Trainer(cfg, session.adapter, session.head, session.splits, local_backend(session),
                      LocalCoordinator(session.head, cfg.head.fit), store, hooks=[StopAfter(stop)],
                      progress=False)  # fmt: skip
    with pytest.raises(Interrupted):
        trainer.fit()


def _one_process(cfg: RunConfig) -> dict[str, Any]:
    from polar_vbll.runner import run_method

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_method(cfg, zero_shot=False, progress=False).results


def _losses(results: dict[str, Any], after: int) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in results["training"]["history"] if h["step"] > after}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(
    resumed: dict, resumed_dir: Path, straight: dict, straight_dir: Path, atol: float
) -> float:
    """Same loss history after the resume step and the same final adapter, within ``atol``; returns the
    largest difference seen (losses and adapter entries)."""
    assert resumed["training"]["resumed_from_step"] == STOP and resumed["training"]["steps"] == STEPS
    a, b = _losses(resumed, STOP), _losses(straight, STOP)
    assert a.keys() == b.keys() and a
    worst = max(abs(a[s] - b[s]) for s in a)
    ta, tb = _adapter(resumed_dir), _adapter(straight_dir)
    assert ta.keys() == tb.keys()
    worst = max([worst, *((ta[k] - tb[k]).abs().max().item() for k in ta)])
    assert worst <= atol, worst
    return worst


def test_one_process_resumes_a_workers_checkpoint_of_its_run_folder(tmp_path):
    """A checkpoint in Ray Train's layout (``checkpoint_<time>/state``), as N workers leave it, is resumed by
    ``polar-vbll train`` in one process, and the rest of the run is the uninterrupted run's, bit for bit
    (the same backend on both sides: nothing is summed in another order)."""
    cfg = _cfg(tmp_path, "resumed")
    _one_process_stopped(cfg, STOP)
    run = cfg.run_dir()
    (run / "checkpoint_2026-12-07_10-00-00.000000").mkdir()
    (run / f"checkpoint-{STOP}").rename(run / "checkpoint_2026-12-07_10-00-00.000000" / "state")
    resumed = _one_process(cfg)
    straight_cfg = _cfg(tmp_path, "straight")
    straight = _one_process(straight_cfg)
    assert _assert_same_run(resumed, run, straight, straight_cfg.run_dir(), atol=0.0) == 0.0


# ------------------------------------------------------------------------------------ Ray workers
class Runs:
    """Each run once per module, on first use: ``get(key) -> (results, run folder)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, tuple[dict[str, Any], Path]] = {}
        self.seconds: dict[str, float] = {}

    def _workers(self, name: str, workers: int, stop: int | None = None) -> dict[str, Any]:
        from distributed.config import DistConfig
        from distributed.launch import DistributedRunError, train_distributed

        dist = DistConfig(workers=workers, zero_stage=3, health_check_interval_s=0.1, sync_check_every=2,
                          param_persistence_threshold=0)  # fmt: skip
        cfg = _cfg(self.root, name)
        if stop is None:
            return train_distributed(cfg, dist=dist)
        with pytest.raises(DistributedRunError, match="stopped after step"):
            train_distributed(cfg, dist=dist, hooks=[StopAfter(stop)])
        return {}

    def get(self, key: str) -> tuple[dict[str, Any], Path]:
        if key in self.done:
            return self.done[key]
        t = time.perf_counter()
        name = key
        if key == "w2_stopped":
            res = self._workers(key, 2, stop=STOP)
            shutil.copytree(self.root / key, self.root / "w2_stopped_copy")  # for the one-process resume
        elif key == "w1_stopped":
            res = self._workers(key, 1, stop=STOP)
        elif key == "p_stopped":
            _one_process_stopped(_cfg(self.root, key), STOP)
            res = {}
        elif key in ("w2_to_w1", "w1_to_w2", "p_to_w2"):
            stopped = {"w2_to_w1": "w2_stopped", "w1_to_w2": "w1_stopped", "p_to_w2": "p_stopped"}[key]
            self.get(stopped)
            name = stopped
            res = self._workers(stopped, 1 if key == "w2_to_w1" else 2)  # the same run folder, resumed
        elif key == "w2_to_p":
            self.get("w2_stopped")
            name = "w2_stopped_copy"
            res = _one_process(_cfg(self.root, name))
        elif key in ("w1", "w2"):
            res = self._workers(key, int(key[1]))
        else:  # "p": one process, uninterrupted
            res = _one_process(_cfg(self.root, key))
        self.done[key] = (res, self.root / name)
        self.seconds[key] = time.perf_counter() - t
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("resume"))


def _report(runs: Runs, resumed: str, straight: str, worst: float) -> None:
    print(f"{resumed} vs {straight}: largest difference {worst:.3g} "
          f"({runs.seconds[resumed]:.0f} s + {runs.seconds[straight]:.0f} s)")  # fmt: skip


@WORKERS
@pytest.mark.slow
def test_two_workers_resumed_on_one_worker_continue_as_one_worker_would(runs):
    res, run = runs.get("w2_to_w1")
    ref, ref_run = runs.get("w1")
    assert res["distributed"]["world_size"] == 1
    _report(runs, "w2_to_w1", "w1", _assert_same_run(res, run, ref, ref_run, TOL))
    assert res["training"]["refits"] == ref["training"]["refits"]


@WORKERS
@pytest.mark.slow
def test_one_worker_resumed_on_two_workers_continues_as_two_workers_would(runs):
    res, run = runs.get("w1_to_w2")
    ref, ref_run = runs.get("w2")
    assert res["distributed"]["world_size"] == 2
    assert res["distributed"]["replica_digests"][0] == res["distributed"]["replica_digests"][1]
    _report(runs, "w1_to_w2", "w2", _assert_same_run(res, run, ref, ref_run, TOL))


@WORKERS
@pytest.mark.slow
def test_two_workers_resumed_in_one_process_continue_as_one_process_would(runs):
    res, run = runs.get("w2_to_p")
    ref, ref_run = runs.get("p")
    _report(runs, "w2_to_p", "p", _assert_same_run(res, run, ref, ref_run, TOL))


@WORKERS
@pytest.mark.slow
def test_one_process_resumed_on_two_workers_continues_as_two_workers_would(runs):
    res, run = runs.get("p_to_w2")
    ref, ref_run = runs.get("w2")
    _report(runs, "p_to_w2", "w2", _assert_same_run(res, run, ref, ref_run, TOL))


@WORKERS
@pytest.mark.slow
def test_changed_training_settings_are_still_refused_across_entry_points(runs):
    """The settings check reads the same newest checkpoint the resume would (here one process's): a
    changed learning rate is refused on the driver, before Ray starts."""
    from distributed.launch import train_distributed
    from polar_vbll.errors import CheckpointError

    runs.get("p_stopped")
    cfg = load_config(packaged_config("run", "tiny"),
                      [f"output_dir={runs.root}", "name=p_stopped", *SETTINGS, "optim.lr_theta=0.123"])  # fmt: skip
    with pytest.raises(CheckpointError, match="other training settings"):
        train_distributed(cfg, workers=2)
