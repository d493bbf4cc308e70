"""Distributed training end to end: Ray Train workers, DeepSpeed ZeRO-0/3, the head-coordinator actor,
checkpoints, a killed worker, the saved adapter. Each run is a real ``train_distributed`` call on 2 CPU
workers (gloo) with the tiny Llama and real ARC-Easy questions; it starts and stops its own local Ray.

Runs are shared between tests (module-scoped, computed on first use); timings on 2 cores are in
docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.optional import skip_module_unless

skip_module_unless("ray", "deepspeed")

from safetensors.torch import load_file  # noqa: E402

from distributed.config import DistConfig  # noqa: E402
from distributed.faults import CorruptOnce, KillCoordinatorOnce, KillOnce  # noqa: E402
from distributed.launch import DistributedRunError, train_distributed  # noqa: E402
from polar_vbll.config import (  # noqa: E402
    RunConfig,
    load_config,
    packaged_config,  # noqa: E402
)

VBLL = ["method=polar_vbll", "head.vbll.predictive=probit", "train.checkpoint_every=2"]
PER_ROUND = ["train.alternation=per_round", "train.round_steps=2"]
PER_STEP = ["train.alternation=per_step"]


def _cfg(root: Path, name: str, *extra: str) -> RunConfig:
    return load_config(packaged_config("run", "tiny"), [f"output_dir={root}", f"name={name}", *VBLL, *extra])


def _dist(stage: int, **kw: Any) -> DistConfig:
    """Fast reports (0.1 s health checks), replica checks every 2 steps, every ZeRO-3 parameter partitioned
    (the tiny model's are all below DeepSpeed's default persistence threshold)."""
    base = {"health_check_interval_s": 0.1, "sync_check_every": 2, "param_persistence_threshold": 0}
    return DistConfig(zero_stage=stage, **{**base, **kw})


def _reference(cfg: RunConfig) -> dict[str, Any]:
    """The single-process reference: ``polar_vbll.training.Trainer`` over the local backend on the same
    config, then the same evaluation (``polar_vbll.predictives.predict``) and the same adapter file."""
    from polar_vbll.features import FeatureSource
    from polar_vbll.models import load_backbone
    from polar_vbll.predictives import predict
    from polar_vbll.session import build_adapter, build_head, load_splits
    from polar_vbll.training import Trainer

    torch.manual_seed(cfg.train.seed)
    model, tok = load_backbone(cfg.model)
    polar = build_adapter(cfg, model)
    splits, answer_ids = load_splits(cfg, tok)
    head = build_head(cfg, model, answer_ids, n_train=len(splits["train"]))
    source = FeatureSource.for_config(polar.base_model, tok.pad_token_id, cfg.train)
    Trainer.local(cfg, polar, head, splits, cfg.run_dir(), source=source, progress=False).fit()
    polar.save_adapter(cfg.run_dir() / "adapter")
    bs = cfg.train.eval_batch_size
    return {
        "metrics": {s: predict(source, head, splits[s], bs, False).metrics() for s in ("eval", "validation")}
    }


class Runs:
    """Each run once per module, on first use; ``get(key) -> (results, run folder, seconds)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, tuple[dict[str, Any], Path, float]] = {}
        self.specs: dict[str, Callable[[], tuple[dict[str, Any], RunConfig]]] = {
            "z3w2": lambda: self._dist("z3w2", PER_ROUND, 2, _dist(3)),
            "z3w2_ckpt": lambda: self._dist(
                "z3w2_ckpt", [*PER_ROUND, "train.activation_checkpointing=true"], 2, _dist(3)
            ),
            "z3w2_coordinator_killed": lambda: self._dist(
                "z3w2_coordinator_killed", PER_ROUND, 2, _dist(3),
                [KillCoordinatorOnce(step=3, marker=str(root / "coordinator_killed"))],
            ),
            "z3w2_killed": lambda: self._dist(
                "z3w2_killed", PER_ROUND, 2, _dist(3), [KillOnce(rank=1, step=3, marker=str(root / "killed"))]
            ),
            "ref_round": lambda: self._ref("ref_round", PER_ROUND),
            "z0w2": lambda: self._dist("z0w2", PER_STEP, 2, _dist(0)),
            "z0w1": lambda: self._dist("z0w1", PER_STEP, 1, _dist(0, grad_accum=2)),
            "ref_step": lambda: self._ref("ref_step", PER_STEP),
        }

    def _dist(self, name, extra, workers, dist, hooks=()):
        cfg = _cfg(self.root, name, *extra)
        return train_distributed(cfg, workers=workers, dist=dist, hooks=hooks), cfg

    def _ref(self, name, extra):
        cfg = _cfg(self.root, name, *extra)
        return _reference(cfg), cfg

    def get(self, key: str) -> tuple[dict[str, Any], Path, float]:
        if key not in self.done:
            t = time.perf_counter()
            res, cfg = self.specs[key]()
            self.done[key] = (res, cfg.run_dir(), time.perf_counter() - t)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"))


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_model(a: dict, b: dict, run_a: Path, run_b: Path, atol: float) -> None:
    for split in ("eval", "validation"):
        for key in ("acc", "ece", "nll", "brier"):
            assert a["metrics"][split][key] == pytest.approx(b["metrics"][split][key], abs=atol), (split, key)
    ta, tb = _adapter(run_a), _adapter(run_b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


# ------------------------------------------------------------------------------------------- ZeRO-3


def test_zero3_two_workers_train_and_stay_bitwise_identical(runs):
    res, run_dir, _ = runs.get("z3w2")
    d, training = res["distributed"], res["training"]
    assert (d["zero_stage"], d["world_size"], training["steps"]) == (3, 2, 6)
    assert d["replica_digests"][0] == d["replica_digests"][1]
    assert training["orthogonality_error"] <= 1e-5
    assert all(h["orthogonality_error"] <= 1e-5 for h in training["history"])
    assert training["refits"] == 4  # head refitted before steps 0, 2, 4 and on the final adapters
    assert training["resumed_from_step"] is None
    assert d["sharded_load"] is True  # each rank read only its partition (tests/test_sharded_loading.py)
    for m in d["memory"]:  # ZeRO-3 holds half of the backbone on each of the two ranks
        assert m["local"] * 2 == pytest.approx(m["full"], rel=0.01)
        assert m["malloc_mmap_threshold"] == 131072  # reached the worker processes via the runtime env
    thetas = {k: v for k, v in _adapter(run_dir).items() if k.endswith("polar_theta")}
    assert thetas and all(v.shape == (4, 4) and v.abs().max() > 0 for v in thetas.values())


def test_zero3_saved_adapter_reproduces_the_workers_predictions(runs):
    """Saved under ZeRO-3 (Theta gathered collectively, written by rank 0): loaded into a fresh backbone in
    one process, with the saved head, it predicts what the workers predicted."""
    from polar_vbll.adapters import PolarModel
    from polar_vbll.features import FeatureSource
    from polar_vbll.models import load_backbone
    from polar_vbll.predictives import predict
    from polar_vbll.session import build_head, load_splits

    res, run_dir, _ = runs.get("z3w2")
    cfg = _cfg(run_dir.parent, "z3w2", *PER_ROUND)
    model, tok = load_backbone(cfg.model)
    polar = PolarModel.load_adapter(model, run_dir / "adapter")
    splits, answer_ids = load_splits(cfg, tok)
    head = build_head(cfg, model, answer_ids, n_train=len(splits["train"]))
    head.load_state_dict(load_file(str(run_dir / "head.safetensors")))
    source = FeatureSource.for_config(polar.base_model, tok.pad_token_id, cfg.train)
    mine = predict(source, head, splits["eval"], cfg.train.eval_batch_size, progress=False)
    workers = load_file(str(run_dir / "predictions.safetensors"))["eval_probs"]
    torch.testing.assert_close(mine.probs, workers, atol=1e-6, rtol=0)
    assert mine.metrics()["nll"] == pytest.approx(res["metrics"]["eval"]["nll"], abs=1e-6)
    assert json.loads((run_dir / "results.json").read_text())["training"]["steps"] == 6


def test_distributed_checkpoint_resumes_in_the_single_process_trainer(runs):
    """A consolidated checkpoint (Theta gathered, its AdamW moments reassembled) is a valid checkpoint of
    the one-process trainer too: the format does not depend on the stage or the number of workers."""
    from polar_vbll.checkpoint import load_checkpoint
    from polar_vbll.features import FeatureSource
    from polar_vbll.models import load_backbone
    from polar_vbll.session import build_adapter, build_head, load_splits
    from polar_vbll.training import Trainer

    _, run_dir, _ = runs.get("z3w2")
    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]  # Ray names them by time
    state = load_checkpoint(latest / "state")
    assert state["step"] == 6 and state["backend"]["world_size"] == 2
    cfg = _cfg(run_dir.parent, "z3w2", *PER_ROUND)
    model, tok = load_backbone(cfg.model)
    polar = build_adapter(cfg, model)
    splits, answer_ids = load_splits(cfg, tok)
    head = build_head(cfg, model, answer_ids, n_train=len(splits["train"]))
    source = FeatureSource.for_config(polar.base_model, tok.pad_token_id, cfg.train)
    trainer = Trainer.local(cfg, polar, head, splits, run_dir / "single", source=source, progress=False)
    trainer.resume(state)
    assert trainer.state.step == 6 and trainer.coordinator.refits == 4
    saved = _adapter(run_dir)
    for k, v in polar.adapter_state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_zero3_matches_the_single_process_trainer(runs):
    res, run_dir, _ = runs.get("z3w2")
    ref, ref_dir, _ = runs.get("ref_round")
    _assert_same_model(res, ref, run_dir, ref_dir, atol=2e-5)


@pytest.mark.slow  # over 20 s on 2 CPU cores (CI durations, 2026-12-07); -m slow runs it
def test_activation_checkpointing_under_zero3_trains_the_same_model(runs):
    """The adapted blocks recomputed in the backward (parameters gathered by ZeRO-3 again): the same
    metrics, replicas and adapter as without."""
    plain, plain_dir, _ = runs.get("z3w2")
    ckpt, ckpt_dir, _ = runs.get("z3w2_ckpt")
    assert ckpt["params"]["train.activation_checkpointing"] is True
    _assert_same_model(ckpt, plain, ckpt_dir, plain_dir, atol=1e-6)


# ------------------------------------------------------------------------- ZeRO-0, 1 vs 2 workers


def test_one_and_two_workers_give_the_same_result(runs):
    """Same config, same global batches: 2 workers x 1 micro-batch, 1 worker x 2 accumulated
    micro-batches and the single-process trainer agree (per-step alternation: the coordinator refits on
    every step's features)."""
    two, dir2, _ = runs.get("z0w2")
    one, dir1, _ = runs.get("z0w1")
    ref, dir_ref, _ = runs.get("ref_step")
    d2, d1 = two["distributed"], one["distributed"]
    assert (d2["world_size"], d1["world_size"], d2["zero_stage"]) == (2, 1, 0)
    assert two["training"]["refits"] == one["training"]["refits"] == 1 + 6  # a full fit, then one per step
    assert d2["replica_digests"][0] == d2["replica_digests"][1]
    assert two["training"]["orthogonality_error"] <= 1e-5 and one["training"]["orthogonality_error"] <= 1e-5
    for m in d2["memory"]:
        assert m["local"] == m["full"]  # ZeRO-0 replicates the backbone
    _assert_same_model(one, two, dir1, dir2, atol=2e-5)
    _assert_same_model(two, ref, dir2, dir_ref, atol=2e-5)


# ------------------------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint_and_finishes_identically(runs):
    straight, _, _ = runs.get("z3w2")
    killed, run_dir, _ = runs.get("z3w2_killed")
    assert (run_dir.parent / "killed").is_file()  # rank 1 really was SIGKILLed after step 3
    assert killed["training"]["resumed_from_step"] == 2  # ... and Ray Train restarted the group from step 2
    assert killed["metrics"] == straight["metrics"]
    # bitwise the same final state
    assert killed["distributed"]["replica_digests"] == straight["distributed"]["replica_digests"]
    assert [h["loss"] for h in killed["training"]["history"]] == [h["loss"] for h in straight["training"]["history"]]


@pytest.mark.slow
def test_a_killed_coordinator_is_restarted_and_the_run_finishes_identically(runs):
    """Ray restarts the head-coordinator actor; the worker group, restarted from its last checkpoint,
    hands it that checkpoint's head state: no traceback, no restart loop, the same final state."""
    straight, _, _ = runs.get("z3w2")
    killed, run_dir, _ = runs.get("z3w2_coordinator_killed")
    assert (run_dir.parent / "coordinator_killed").is_file()  # the actor really was killed after step 3
    assert killed["training"]["resumed_from_step"] == 2
    assert killed["metrics"] == straight["metrics"]
    assert killed["distributed"]["replica_digests"] == straight["distributed"]["replica_digests"]


@pytest.mark.slow
def test_diverged_replica_stops_the_run_naming_the_parameter(tmp_path):
    cfg = _cfg(tmp_path, "corrupt", *PER_ROUND)
    dist = _dist(0, sync_check_every=1, max_failures=1)
    hook = CorruptOnce(rank=1, step=1, marker=str(tmp_path / "corrupted"))  # checkpoints every 2 steps
    with pytest.raises(DistributedRunError) as err:
        train_distributed(cfg, workers=2, dist=dist, hooks=[hook])
    msg = str(err.value)  # corrupted after step 1's check, caught by step 2's, before any checkpoint
    assert msg.startswith("ReplicaDivergence: replicas diverged after step 2: rank 1 differs from rank 0 in")
    named = msg[msg.index("[") :]
    assert "polar_bank.polar_groups.n128_r4" in named  # the nudged factor group ...
    assert "n32_r4" not in named and "n64_r4" not in named and "polar_theta" not in named  # ... alone
    assert not list((tmp_path / "corrupt").glob("checkpoint_*"))  # nothing diverged was saved


# --------------------------------------------------------------------- every method on the same loop
def _one_process(cfg: RunConfig) -> dict[str, Any]:
    from polar_vbll.runner import run_method

    return run_method(cfg, progress=False).results


@pytest.mark.slow  # over 20 s on 2 CPU cores (CI durations, 2026-12-07); -m slow runs it
def test_lora_with_a_posthoc_laplace_head_on_workers_equals_one_process(tmp_path):
    """The method registry reaches the workers: a LoRA adapter under ZeRO-3 and the post-hoc last-layer
    Laplace head, fitted on the gathered training features, predict what one process predicts."""
    from polar_vbll.results import RunResults

    cfg = _cfg(tmp_path, "lap", "method=laplace", "train.checkpoint_every=0")
    res = train_distributed(cfg, workers=2, dist=_dist(3))
    ref = _one_process(_cfg(tmp_path, "lap_ref", "method=laplace", "train.checkpoint_every=0"))
    RunResults.model_validate(json.loads((tmp_path / "lap" / "results.json").read_text()))
    assert res["entry_point"] == "train --workers" and res["method"] == "laplace"
    assert res["distributed"]["replica_digests"][0] == res["distributed"]["replica_digests"][1]
    for split in ("eval", "validation", "zero_shot"):
        for key in ("acc", "ece", "nll", "brier"):
            assert res["metrics"][split][key] == pytest.approx(ref["metrics"][split][key], abs=2e-5), (split, key)
    lap_nll, det_nll = res["metrics"]["eval"]["nll"], res["training"]["history"][-1]["loss"]
    assert lap_nll != pytest.approx(det_nll, abs=1e-9)  # the Laplace head, not the deterministic one


@pytest.mark.slow
def test_mc_dropout_predictive_runs_on_workers(tmp_path):
    """MC dropout on workers: 10 stochastic passes per example (adapter dropout on), not one."""
    cfg = _cfg(tmp_path, "mcd", "method=mc_dropout", "train.checkpoint_every=0")
    res = train_distributed(cfg, workers=2, dist=_dist(0))
    assert res["passes_per_example"] == 10
    probs = load_file(str(tmp_path / "mcd" / "predictions.safetensors"))["eval_probs"]
    assert probs.shape[0] == 32 and torch.allclose(probs.sum(-1), torch.ones(32), atol=1e-5)


@pytest.mark.slow  # over 20 s on 2 CPU cores (CI durations, 2026-12-07); -m slow runs it
def test_a_head_refit_gone_non_finite_ends_the_run_without_a_restart(tmp_path):
    """A failure no retry can fix (the eta-phase diverges) stops every rank at the same point: the run
    ends with one clear error naming the eta-phase and the setting to lower, and Ray Train never restarts
    the group (the error comes from the record the workers left, not from a failed fit)."""
    cfg = _cfg(tmp_path, "nan_head", *PER_ROUND, "head.fit.optimizer=adam", "head.fit.lr=1e30",
               "head.vbll.noise_init=1e-30")  # fmt: skip
    t0 = time.perf_counter()
    with pytest.raises(DistributedRunError) as err:
        train_distributed(cfg, workers=2, dist=_dist(0, max_failures=2))
    msg = str(err.value)
    assert msg.startswith("HeadFitDiverged: ") and "head refit 0" in msg and "head.fit.lr" in msg, msg
    assert err.value.__cause__ is None  # the workers returned; Ray Train saw no failure to retry
    assert time.perf_counter() - t0 < 120


def test_no_ray_instance_is_left_running(runs):
    import ray

    runs.get("z3w2")
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------ ray job submit


@pytest.mark.slow
def test_ray_job_submit_entrypoint():
    """The documented `ray job submit` path, with docker/runtime_env.yaml, against a separately started
    head node (token auth on, as Ray 2.60 sets it up by default)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    tmp = Path(tempfile.mkdtemp(prefix="rj"))  # short: Ray's socket paths live under --temp-dir
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={tmp}", "--object-store-memory=200000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        cmd = [
            ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}",
            "--runtime-env=docker/runtime_env.yaml", "--",  # uploads this checkout as working_dir
            str(Path(sys.executable).parent / "polar-vbll"), "train", "--config", "tiny", "--workers", "2",
            "--zero-stage", "3", "--no-track", "--set", f"output_dir={tmp / 'runs'}", "--set", "name=job",
        ]  # fmt: skip
        repo = Path(__file__).resolve().parents[1]

        def submit() -> subprocess.CompletedProcess:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=repo)

        out = _retry(submit, 20)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert '"step": 6' in out.stdout and "run folder:" in out.stdout
        assert (tmp / "runs" / "job" / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        head.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _retry(fn, tries: int):
    """``ray job submit`` fails until the head's job agent is up; retry that, not a failed job."""
    for _ in range(tries):
        out = fn()
        if out.returncode == 0 or "Job '" in out.stdout:
            return out
        time.sleep(3)
    return out


def test_no_credential_reaches_the_runtime_environment(monkeypatch):
    """MLFLOW_TRACKING_URI with a password (and the password variables) set on the driver: the workers'
    runtime environment, read back through Ray's state API, holds the model cache and no credential."""
    from ray.util.state import list_jobs

    from distributed.launch import ray_session, worker_env

    secret = "s3cret-pw-4711"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{secret}@127.0.0.1:1/")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    monkeypatch.setenv("POLAR_VBLL_CACHE", os.environ.get("POLAR_VBLL_CACHE", "/tmp/polar-vbll-cache"))
    env = worker_env(DistConfig())
    assert "MLFLOW_TRACKING_URI" not in env and secret not in json.dumps(env)
    with ray_session(None, num_cpus=1, env=env):
        jobs = list_jobs(detail=True)
    envs = [json.dumps(getattr(j, "runtime_env", None) or {}) for j in jobs]
    assert any("POLAR_VBLL_CACHE" in e for e in envs)  # the readback sees what was passed
    assert not any(secret in e for e in envs)


@pytest.mark.slow  # over 20 s on 2 CPU cores (CI durations, 2026-12-07); -m slow runs it
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_backbone_under_deepspeed_keeps_the_stiefel_factors_and_the_head_in_fp32(tmp_path, stage):
    """model.dtype bfloat16 on 2 CPU workers at every kind of ZeRO stage (0: whole replicas; 2: optimizer
    state partitioned; 3: DeepSpeed's bf16 mode, the backbone partitioned in bfloat16): the run finishes with a
    finite loss (stage 0 used to fail at the final replica check, reading DeepSpeed's bf16 optimizer as torch's
    AdamW), U, V and Theta stay float32 and U, V orthonormal, the head is float32, the dtype is in the params."""
    cfg = _cfg(tmp_path, "bf16", "model.dtype=bfloat16")
    res = train_distributed(cfg, workers=2, dist=_dist(stage))
    assert res["params"]["model.dtype"] == "bfloat16"
    assert res["training"]["loss"] is not None and math.isfinite(res["training"]["loss"])
    assert res["training"]["orthogonality_error"] < 1e-5
    adapter = load_file(str(cfg.run_dir() / "adapter" / "adapter_model.safetensors"))
    groups = [v for k, v in adapter.items() if ".polar_groups." in k or "theta" in k.lower()]
    assert any("theta" in k.lower() for k in adapter) and groups
    assert all(v.dtype == torch.float32 for v in groups)
    head = load_file(str(cfg.run_dir() / "head.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in head.items() if v.is_floating_point())


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_intact_one_on_workers(tmp_path):
    """Distributed resume behaves like one process (issue #21, item 6): the latest Ray checkpoint truncated,
    the rerun resumes from the older intact one with a warning (the driver's check and every worker agree),
    and trains the remaining steps."""
    cfg = _cfg(tmp_path, "fallback", "train.steps=4", "train.checkpoint_every=2")
    first = train_distributed(cfg, workers=2, dist=_dist(3))
    assert first["training"]["steps"] == 4
    run = tmp_path / "fallback"
    found = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(found) == 2
    state = found[-1] / "state" / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # the newest one truncated
    with pytest.warns(UserWarning, match="resuming from the older intact"):
        again = train_distributed(cfg, workers=2, dist=_dist(3))
    assert again["training"]["resumed_from_step"] == 2 and again["training"]["steps"] == 4


@pytest.mark.slow
def test_no_resume_on_workers_starts_over_replacing_the_old_checkpoints(tmp_path, capsys):
    """``--no-resume`` on a folder with Ray checkpoints starts over (as the README says and one process
    does), even with other training settings, instead of being refused."""
    cfg = _cfg(tmp_path, "over", "train.steps=2")
    train_distributed(cfg, workers=2, dist=_dist(3))
    other = _cfg(tmp_path, "over", "train.steps=2", "optim.lr_theta=0.01")
    res = train_distributed(other, workers=2, dist=_dist(3), resume=False)
    assert "starting over in" in capsys.readouterr().out
    assert res["training"]["resumed_from_step"] is None and res["params"]["optim.lr_theta"] == 0.01
    assert len([p for p in (tmp_path / "over").glob("checkpoint_*") if p.is_dir()]) == 1
