"""What every Ray Train worker runs: assemble this rank's objects, wrap them in the DeepSpeed backend, and
run the one trainer and the one post-training evaluation of ``polar_vbll``.

There is no training step here. The worker builds the same objects as one process
(``polar_vbll.session.build_session``), loads a resumed checkpoint's weights *before* DeepSpeed wraps the
backbone, builds the :class:`~distributed.backend.DeepSpeedBackend`, starts the head-coordinator actor
(``distributed.head_actor``) from the checkpoint's head state, and hands everything to
:class:`polar_vbll.training.Trainer` and :func:`polar_vbll.runner.finish_run`. Checkpoints and the final
artifacts go through Ray Train's storage (``distributed.checkpoints``).

Failures: a run-time failure no retry can fix (a diverged loss, a head refit gone non-finite, replicas
that drifted apart) is detected on every rank at the same point; each rank records it with the
coordinator and returns, so the run ends without Ray Train restarting the group, and the driver raises one
clear error. Anything else (a killed worker, an exception on one rank) is left to Ray Train's restarts from
the latest checkpoint; a bad input recorded by an earlier group stops a restarted group at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from distributed.backend import DeepSpeedBackend
from distributed.checkpoints import RayCheckpoints
from distributed.config import DistConfig, check_batch_layout
from distributed.devices import worker_placement
from distributed.engine import deepspeed_config, local_parameter_bytes
from distributed.head_actor import CoordinatorClient
from distributed.loading import ShardedCheckpoint, load_backbone_zero3
from distributed.memory_guard import MIB, MemoryGuard
from distributed.sharding import check_shards
from polar_vbll.backbone import answer_head_weight
from polar_vbll.checkpoint import load_checkpoint
from polar_vbll.config import ModelConfig, RunConfig
from polar_vbll.errors import RunFailure, UserInputError
from polar_vbll.evaluation import Member
from polar_vbll.features import prefix_state_bytes
from polar_vbll.models import load_backbone, model_dir
from polar_vbll.peak import PhasePeaks
from polar_vbll.placement import Placement, resolved
from polar_vbll.protocols import StepHook
from polar_vbll.runner import finish_run, training_summary, zero_shot_for
from polar_vbll.session import build_session
from polar_vbll.tracking import RunLogger, TrackingTarget
from polar_vbll.training import Trainer, load_weights


def _memory_status() -> dict[str, int]:
    """Resident and peak resident memory of this process, in bytes (Linux /proc)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak_rss"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _node_id() -> str | None:
    """The Ray node this rank runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 (a report field only)
        return None


def _node_first(fn):
    """``fn()`` on each node's local rank 0 first, then on the others: the first call may convert the bundled
    model (or write the tiny one) into the node's cache, and two processes must not build it at once."""
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    done = fn() if first else None
    dist.barrier()
    return done if first else fn()


class BackboneLoad:
    """How this rank gets its backbone. Under ZeRO-3 with ``dist.sharded_load`` (the default) the model is
    built partitioned and each rank reads only its partition from the checkpoint
    (:func:`distributed.loading.load_backbone_zero3`); the LM head's answer rows and the frozen prefix's
    fingerprint are then read from the file (``checkpoint``). Otherwise every rank loads the whole model."""

    def __init__(self, cfg: RunConfig, dist_cfg: DistConfig, micro_batch: int) -> None:
        self.sharded = dist_cfg.zero_stage == 3 and dist_cfg.sharded_load
        self.ds_config = deepspeed_config(cfg, dist_cfg, micro_batch)
        self.checkpoint: ShardedCheckpoint | None = None

    def __call__(self, model_cfg: ModelConfig, placement: Placement | None = None):
        if not self.sharded:
            return _node_first(lambda: load_backbone(model_cfg, placement))
        _node_first(lambda: model_dir(model_cfg))  # converted or written once per node, before every rank reads
        model, tokenizer, self.checkpoint = load_backbone_zero3(model_cfg, self.ds_config)
        return model, tokenizer

    def head_rows(self, model, answer_ids):
        if self.checkpoint is not None:
            return self.checkpoint.answer_head_weight(model, answer_ids)
        return answer_head_weight(model, answer_ids)

    @property
    def fingerprint_chunks(self):
        return self.checkpoint.chunks if self.checkpoint is not None else None


def run_worker(
    cfg: RunConfig,
    dist_cfg: DistConfig,
    coordinator: CoordinatorClient,
    store: RayCheckpoints,
    hooks: list[StepHook] | tuple[StepHook, ...] = (),
    tracking: TrackingTarget | None = None,
    entry_point: str = "train --workers",
    segment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One rank of a distributed run (every rank calls it; each step is a collective): train, evaluate,
    write the final checkpoint with the artifacts; returns ``results.json``'s content (the same on every
    rank).

    ``segment`` (a search trial under PBT, ``tune_spaces.trial``): ``warm_start``, the folder of a
    checkpoint state to warm-start from when the run has no checkpoint of its own
    (:mod:`polar_vbll.training.warm_start`), and ``stop_at``, a step to pause at with a checkpoint (no
    evaluation then: the returned dict is the step and the validation metrics)."""
    segment = segment or {}
    t0 = time.perf_counter()
    before_load = _memory_status().get("rss", 0)
    phases = PhasePeaks()  # the peak RSS of each phase below: load, DeepSpeed's init, zero-shot, training
    rank = dist.get_rank()
    guard = None  # dist.worker_memory_mb: this rank's budget, watched from here to the end
    if dist_cfg.worker_memory_mb is not None:
        guard = MemoryGuard(dist_cfg.worker_memory_mb * MIB, rank, coordinator.record_fatal).start()
        guard.phase = "the backbone's load"
    try:
        return _run_worker(cfg, dist_cfg, coordinator, store, hooks, tracking, entry_point, segment, t0,
                           before_load, phases, guard)  # fmt: skip
    finally:
        if guard is not None:
            guard.stop()


def _run_worker(cfg, dist_cfg, coordinator, store, hooks, tracking, entry_point, segment, t0, before_load,
                phases: PhasePeaks, guard: MemoryGuard | None) -> dict[str, Any]:  # fmt: skip
    """:func:`run_worker`'s body, every phase's peak checked against the budget (``guard``) at its end."""

    def mark(name: str, following: str) -> None:
        peak = phases.mark(name)
        if guard is not None:
            guard.check(peak)
            guard.phase = following

    rank, world = dist.get_rank(), dist.get_world_size()
    placement = worker_placement(cfg, dist_cfg)  # this rank's GPU (made current) or the CPU
    cfg = resolved(cfg, placement)
    micro = check_batch_layout(cfg, dist_cfg, world)
    loader = BackboneLoad(cfg, dist_cfg, micro)
    session = build_session(cfg, load=loader, rank=rank, head_rows=loader.head_rows, placement=placement,
                            memory_check=False)  # fmt: skip
    if dist_cfg.data_split == "shard":
        check_shards(len(session.splits["train"]), world)  # every rank, before any collective
    state, warm = store.latest(), False
    if state is None and segment.get("warm_start"):
        state, warm = load_checkpoint(segment["warm_start"]), True
    if state is not None:
        load_weights(session.adapter, session.head, state, cfg, warm=warm)  # before DeepSpeed keeps master copies
    mark("load", "DeepSpeed's init")
    adapter = session.adapter
    backend = DeepSpeedBackend(
        cfg, dist_cfg, adapter.base_model, adapter.theta_parameters(), session.tokenizer.pad_token_id, micro,
        loader.fingerprint_chunks,
    )  # fmt: skip
    mark("deepspeed_init", "the zero-shot evaluation")
    # bytes: the parameters this rank holds (``local``, ``full``), RSS before the backbone loads, and RSS and
    # its peak after DeepSpeed's init; ``peak_rss_run`` (below) is the peak over training too, ``phases`` the
    # peak of each phase
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    memory = {"rank": rank, "node": _node_id(), "malloc_mmap_threshold": int(threshold) if threshold else None,
              **local_parameter_bytes(adapter.base_model),
              "rss_before_load": before_load, **_memory_status(), "peak_rss": phases.peak}  # fmt: skip
    coordinator.start(session.head if rank == 0 else None, cfg.head.fit, state["coordinator"] if state else None,
                      warm)  # fmt: skip
    logger = RunLogger(tracking) if tracking is not None and rank == 0 else None  # only rank 0 logs
    trainer = Trainer(
        cfg, adapter, session.head, session.splits, backend, coordinator, store,
        tracker=logger, hooks=hooks, progress=False,
    )  # fmt: skip
    timings = {"load_s": time.perf_counter() - t0}
    if state is not None:
        trainer.restore(state, warm=warm)
        note_data_split(state, dist_cfg, rank)
    t = time.perf_counter()
    trainer.state.zero_shot = zero_shot_for(session, backend, state, progress=False, one_process=False)
    trainer.state.zero_shot_split = session.splits["eval"].fingerprint()
    timings["zero_shot_eval_s"] = time.perf_counter() - t
    mark("zero_shot", "the training split's prefix pass")
    trainer.prepare_train_split()
    mark("train_prefix", "training")
    t = time.perf_counter()
    trainer.fit(checkpoint_at_end=False, stop_at=segment.get("stop_at"))  # the final checkpoint: with the artifacts
    timings["train_s"] = time.perf_counter() - t
    if not trainer.finished:  # a paused segment: its checkpoint is written, the run goes on elsewhere
        trainer.verify(f"at step {trainer.state.step}")
        last = trainer.state.history[-1] if trainer.state.history else {}
        return {"step": trainer.state.step, **{k: v for k, v in last.items() if k.startswith("val_")}}
    digest = trainer.verify("at the end of training")
    mark("train", "the final evaluation")
    memory.update(peak_rss_run=phases.peak, phases=phases.phases, phases_reset=phases.resettable,
                  prefix_states=prefix_state_bytes(session.splits.values()))  # fmt: skip
    training = training_summary(trainer)
    for enc in session.splits.values():  # the evaluation's prefix passes, done now to record what each rank holds
        backend.prepare(enc, cfg.train.eval_batch_size)
    prefix = prefix_record(backend, session.splits, rank)
    distributed = {
        "world_size": world,
        "zero_stage": dist_cfg.zero_stage,
        "sharded_load": loader.sharded,
        "data_split": dist_cfg.data_split,
        "memory": backend.all_gather_object(memory),
        "replica_digests": backend.all_gather_object(digest),
        "prefix": backend.all_gather_object(prefix),
    }
    timings["prefix_s"] = max(p["train_seconds"] for p in distributed["prefix"])  # the slowest rank's
    outcome = finish_run(
        cfg, entry_point, session, backend, store, trainer, [Member(session.head)], [training],
        trainer.state.zero_shot, timings, tracker=logger, distributed=distributed, progress=False, t0=t0,
    )  # fmt: skip
    return outcome.results


def prefix_record(backend: DeepSpeedBackend, splits: dict, rank: int) -> dict[str, Any]:
    """This rank's cached frozen prefix after training: per split, the examples whose states it holds
    (``data_split: shard``: its own shard) and their bytes, and the seconds its training split's prefix pass
    took (a disk-cache hit: the read)."""
    held = {name: enc.prepared() for name, enc in splits.items()}
    nbytes = {name: prefix_state_bytes([enc]) for name, enc in splits.items()}
    return {"rank": rank, "examples": held, "bytes": nbytes,
            "train_seconds": backend.prefix_seconds.get(splits["train"].name, 0.0)}  # fmt: skip


def note_data_split(state: dict[str, Any], dist_cfg: DistConfig, rank: int) -> None:
    """A resume under another ``data_split`` than the checkpoint's steps were taken with is allowed: the
    steps from here on follow this run's rule (docs/distributed.md, "Resuming on another number of
    workers"); rank 0 says so in one line. A one-process checkpoint counts as ``replicate``."""
    before = (state.get("backend") or {}).get("data_split", "replicate")
    if rank == 0 and before != dist_cfg.data_split:
        print(f"note: the checkpoint's {state['step']} steps took their batches with data_split={before}; from "
              f"step {state['step']} on they follow data_split={dist_cfg.data_split}", flush=True)  # fmt: skip


def local_run_dir(cfg: RunConfig) -> Path | None:
    """The run folder when Ray Train's storage is a path (where one process could have written too), else
    None (a URI: only Ray Train's own checkpoints are there)."""
    return None if "://" in cfg.output_dir else cfg.run_dir()


class RunAborted(RunFailure):
    """A restarted worker group found an unrecoverable error recorded by the previous one."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``).

    ``config``: ``cfg`` (a ``RunConfig`` dump), ``dist`` (a ``DistConfig`` dump), ``coordinator`` (the
    head-coordinator actor handle), optional ``hooks``, ``tracking`` (the MLflow run rank 0 writes to) and
    ``entry_point``. Resumes from the newest checkpoint of the run folder (``RayCheckpoints.latest``: what a
    restarted worker group gets after a failure, or what an earlier run wrote on any number of workers or in
    one process).
    """
    import ray.train

    from polar_vbll.config import parse_config

    ctx = ray.train.get_context()
    client = CoordinatorClient(config["coordinator"], ctx.get_world_rank(), ctx.get_world_size())
    if client.fatal():
        return  # an earlier group recorded a failure no restart can fix; the driver reports it
    tracking = config.get("tracking")
    try:
        cfg = parse_config(config["cfg"], "the distributed run's config")
        dist_cfg = DistConfig.model_validate(config["dist"])
        store = RayCheckpoints(ctx.get_world_rank(), local_run_dir(cfg))
        run_worker(
            cfg, dist_cfg, client, store, config.get("hooks") or (),
            TrackingTarget(**tracking) if tracking else None, config.get("entry_point", "train --workers"),
            config.get("segment"),
        )  # fmt: skip
    except RunFailure as exc:  # raised on every rank at the same point: end the run, no restart
        client.record_fatal(f"{type(exc).__name__}: {exc}")
        return
    except UserInputError as exc:  # may be one rank's (a file missing on one node): let Ray end the group
        client.record_fatal(f"{type(exc).__name__}: {exc}")
        raise
    dist.barrier()
