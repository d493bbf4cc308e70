"""The driver: start (or join) Ray, run the workers, collect the run folder.

``train_distributed(cfg, dist=DistConfig(workers=2))`` is what ``polar-vbll train --workers N`` calls.
Without an address (and without ``RAY_ADDRESS``) it starts a private local Ray instance sized to the run,
dashboard bound to 127.0.0.1, and shuts it down afterwards; with ``address="auto"`` /
``"ray://host:10001"`` / ``RAY_ADDRESS`` it joins that cluster. ``ray job submit -- polar-vbll train
--workers N ...`` runs the same command inside a job (Ray sets ``RAY_ADDRESS`` there; docs/distributed.md).

Before anything starts, :func:`prepare_run` refuses what the workers do not run (:data:`WORKERS`: one
line, exit 2) and fixes the config the workers receive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from distributed.config import DistConfig, check_adapter_stage, check_batch_layout, dist_config_from
from distributed.devices import driver_config
from distributed.worker import train_loop_per_worker
from polar_vbll.checkpoint import clear_run_checkpoints, load_checkpoint, newest_intact, run_checkpoints
from polar_vbll.config import RunConfig, check_output_folder, check_plain_name
from polar_vbll.errors import CheckpointError, RunFailure, UserInputError
from polar_vbll.extras import require
from polar_vbll.locking import FolderLock
from polar_vbll.methods import METHODS
from polar_vbll.protocols import StepHook
from polar_vbll.runner import training_key, write_run_params
from polar_vbll.session import tokenise_files, validate_inputs
from polar_vbll.support import EntryPoint, Refused, check_supported, unused_note
from polar_vbll.tracking import TrackingTarget, credentials_note
from polar_vbll.training import check_resumable

#: What a run folder receives from the final checkpoint (the artifacts rank 0 wrote).
ARTIFACTS = (
    "adapter", "adapter_peft", "head.safetensors", "predictions.safetensors", "results.json", "results.md",
    "reliability.png", "risk_coverage.png",
)  # fmt: skip


class DistributedRunError(RunFailure):
    """The distributed run failed for good (after Ray Train's retries, or at once for errors no retry can
    fix, e.g. diverged replicas); the message says why."""


def _runs_on_workers(method: str) -> bool:
    m = METHODS[method]
    return m.trains and m.predictive != "ensemble"


#: What ``polar-vbll train --workers`` (and every search trial) refuses; every other field is run.
WORKERS = EntryPoint(
    "polar-vbll train --workers",
    {
        "method": Refused(
            "zero_shot trains nothing to distribute and an ensemble trains its members one after another; "
            "run these with `polar-vbll train` (one process) or `polar-vbll compare`",
            allowed=_runs_on_workers,
        ),
        "train.compile": Refused(
            "torch.compile of blocks that DeepSpeed ZeRO-3 partitions and gathers is not supported here; "
            "compile one-process runs (polar-vbll train, compare)"
        ),
    },
)


def prepare_run(cfg: RunConfig, dist: DistConfig, entry: EntryPoint = WORKERS, kind: str = "run") -> RunConfig:
    """Everything checked before Ray starts (the fields ``entry`` refuses, the batch layout, the output
    folder, which must outlive a submitted job and must not hold another ``kind`` of output, the workers'
    device (``distributed.devices``), the data: every row read and validated), and the config the workers
    receive: ``output_dir`` made absolute (it is Ray Train's storage path), ``model.dtype`` resolved."""
    check_supported(cfg, entry)
    check_batch_layout(cfg, dist)
    check_adapter_stage(cfg, dist)
    check_output_folder(Path(cfg.output_dir) / cfg.name, "output_dir/name", kind)
    cfg = driver_config(cfg, dist)  # model.device checked for the workers, model.dtype as they will run it
    validate_inputs(cfg, device=False)  # a bad task name, data row or model path fails here, before Ray starts
    tokenise_files(cfg)  # a large file's token ids written once, memory-mapped by every worker on this node
    storage = cfg.output_dir if "://" in cfg.output_dir else str(Path(cfg.output_dir).expanduser().resolve())
    return cfg.model_copy(update={"output_dir": storage})


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, before any work, when a Ray address's host:port does not accept a connection
    (``UserInputError``); ``auto`` and ``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserInputError(f"--address {address!r}: expected host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserInputError(f"cannot reach a Ray cluster at {address} ({exc}); start one with `ray start "
                             "--head`, or check the address (docs/distributed.md)") from None  # fmt: skip


@contextlib.contextmanager
def ray_session(
    address: str | None, num_cpus: int, object_store_mb: int = 256, env: dict[str, str] | None = None,
    dashboard: bool = True,
) -> Iterator[bool]:
    """Join ``address`` / ``RAY_ADDRESS`` / an already initialised Ray, or start a local instance (its
    dashboard, unless ``dashboard`` is False, on 127.0.0.1) and shut it down on exit. Yields True when this
    call started Ray."""
    import ray

    if ray.is_initialized():
        yield False
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        check_reachable(target)  # a malformed or unreachable address: one line within seconds, never a hang
        # Inside a submitted job the job's runtime_env is already in os.environ, and Ray refuses a driver
        # runtime_env that repeats any of its keys: pass only what the job did not set.
        extra = {k: v for k, v in (env or {}).items() if k not in os.environ}
        ray.init(address=target, runtime_env={"env_vars": extra} if extra else None)
        try:
            yield False
        finally:
            ray.shutdown()
        return
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 1024 * 1024,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=True,
    )
    try:
        yield True
    finally:
        ray.shutdown()


def worker_env(dist: DistConfig) -> dict[str, str]:
    """Environment the workers need: the model cache, DeepSpeed's accelerator, Ray Train's report
    latency; passed through ``runtime_env`` so that it also reaches workers on other nodes. Never a
    credential or the tracking URI (Ray's job API shows a runtime_env to anyone who can reach the cluster)."""
    # never credentials: a runtime_env is shown by Ray's job API and dashboard. The tracking target (URI
    # without credentials, run id) travels in the loop config; a node authenticates with its own environment.
    keys = ("POLAR_VBLL_CACHE", "POLAR_VBLL_PREFIX_CACHE", "HF_HUB_OFFLINE")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    if not dist.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if dist.health_check_interval_s is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(dist.health_check_interval_s)
    if dist.zero_stage == 3 and dist.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(dist.malloc_mmap_threshold)
    return env


def clear_ray_state(run_dir: Path) -> int:
    """Remove a run folder's checkpoints, Ray Train's and one process's, and Ray Train's resume state
    (``--no-resume``: a fresh start that must not resume them); returns how many checkpoints there were.
    The run's other files are replaced by the new run as it writes them."""
    return clear_run_checkpoints(run_dir)


def _check_resume(run_dir: Path, cfg: RunConfig) -> None:
    """The checkpoint the workers would resume (the run folder's newest intact one, whichever entry point
    and number of workers wrote it: ``distributed.checkpoints.RayCheckpoints.latest``) must have been
    written with the same training settings; refused here, on the driver, before Ray starts."""
    state = newest_intact(run_checkpoints(run_dir), load_checkpoint)
    if state is not None:
        try:
            check_resumable(state.get("config", {}), cfg)
        except CheckpointError as exc:
            raise CheckpointError(f"{run_dir}: {exc}") from None


def dist_params(dist: DistConfig) -> dict[str, Any]:
    """The ``DistConfig`` as MLflow params (``dist.<field>``, as a search logs its trials' settings)."""
    return {f"dist.{k}": v for k, v in dist.model_dump(mode="json").items()}


def train_distributed(
    cfg: RunConfig,
    workers: int | None = None,
    address: str | None = None,
    dist: DistConfig | None = None,
    resume: bool = True,
    hooks: Sequence[StepHook] = (),
    object_store_mb: int = 256,
    track: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` on Ray Train workers; returns ``results.json``'s content (also written to
    ``<output_dir>/<name>/`` beside the adapter, the head and the predictions).

    ``track``: record the run in MLflow (the run folder's embedded store ``<run>/mlflow/``, or the server
    of ``MLFLOW_TRACKING_URI``; checked before Ray starts): params, metrics over steps, plots and artifacts
    from rank 0, the same layout as one-process runs and searches.

    The run name and ``output_dir`` are Ray Train's run name and storage path: rerunning the same config
    resumes from its latest checkpoint (``resume=False`` refuses to touch a folder that has one). On a
    multi-node cluster ``output_dir`` must be storage every node reaches (NFS, or a URI such as s3://...).
    """
    from polar_vbll.tracking import tracked

    require("distributed.launch.train_distributed")  # Ray and DeepSpeed: one line naming the `dist` extra
    dist = dist or DistConfig()
    if workers is not None:
        dist = dist_config_from({**dist.model_dump(), "workers": workers})
    check_plain_name(cfg.name)
    if target := address or os.environ.get("RAY_ADDRESS"):
        check_reachable(target)  # before any work: a bad address is one line in seconds
    cfg = prepare_run(cfg, dist)
    env = worker_env(dist)  # reaches the workers and Ray Train's controller through runtime_env
    num_cpus = max(1, int(round(dist.workers * dist.cpus_per_worker)))
    folder = Path(cfg.output_dir) / cfg.name if "://" not in cfg.output_dir else Path(cfg.name)
    print(f"run folder: {folder}", flush=True)
    if note := unused_note(cfg):
        print(note, flush=True)
    tags = {"polar_vbll.role": "run", "polar_vbll.method": cfg.method}
    lock = FolderLock(folder, "polar-vbll train --workers") if "://" not in cfg.output_dir else nullcontext()
    with (
        lock,  # one writer per run folder, taken before anything is written
        tracked(folder, "polar-vbll-runs", cfg.name, {**cfg.flat_params(), **dist_params(dist)}, tags,
                enabled=track, settings=training_key(cfg), fresh=not resume) as logger,
        ray_session(address, num_cpus=num_cpus, object_store_mb=object_store_mb, env=env),
    ):
        target = logger.target if logger is not None else None
        if target is not None and (note := credentials_note(target.uri)):
            print(note, flush=True)
        results = run_in_session(cfg, dist, resume=resume, hooks=hooks, tracking=target)
    print(f"run folder: {folder}", flush=True)
    return results


def run_in_session(
    cfg: RunConfig,
    dist: DistConfig,
    resume: bool = True,
    hooks: Sequence[StepHook] = (),
    callbacks: Sequence[Any] = (),
    tracking: TrackingTarget | None = None,
    entry_point: str = "train --workers",
) -> dict[str, Any]:
    """:func:`train_distributed` inside an existing Ray session (what a search trial runs): writes the run
    folder's params, fits, copies the final artifacts into the run folder, returns the final results."""
    return run_segment(cfg, dist, resume, hooks, callbacks, tracking, entry_point)[0]


def run_segment(
    cfg: RunConfig,
    dist: DistConfig,
    resume: bool = True,
    hooks: Sequence[StepHook] = (),
    callbacks: Sequence[Any] = (),
    tracking: TrackingTarget | None = None,
    entry_point: str = "train --workers",
    stop_at: int | None = None,
    warm_start: str | None = None,
):
    """:func:`run_in_session` for a part of a run (a PBT trial's, ``tune_spaces.pbt``): returns the
    results (for a run paused at ``stop_at``: its step and validation metrics) and the Ray Train
    checkpoint it ended with (``state/`` inside: ``polar_vbll.checkpoint``'s format).

    ``stop_at``: pause at that step with a checkpoint (``Trainer.fit(stop_at=...)``). ``warm_start``: a
    checkpoint state folder to warm-start from when the run folder has no checkpoint of its own
    (``polar_vbll.training.warm_start``; checked here, before Ray Train starts)."""
    from distributed.cluster import check_cluster, check_worker_memory

    cfg = prepare_run(cfg, dist)
    check_cluster(cfg, tracking.uri if tracking is not None else None)  # multi-node: shared storage, files, server
    check_worker_memory(dist.workers, dist.worker_memory_mb)  # a budget no node can give: refused, not pending
    storage = cfg.output_dir
    run_dir = Path(storage) / cfg.name if "://" not in storage else None
    if run_dir is not None:
        if not resume and (n := clear_ray_state(run_dir)):  # --no-resume starts over, as in one process
            print(f"starting over in {run_dir}: {n} old checkpoint(s) removed", flush=True)
        _check_resume(run_dir, cfg)  # before anything in the run folder is written
        if warm_start is not None and not run_checkpoints(run_dir):  # the run's own checkpoint comes first
            _check_warm_start(Path(warm_start), cfg)
        write_run_params(cfg, run_dir)
        (run_dir / "distributed.json").write_text(json.dumps(dist.model_dump(mode="json"), indent=2))

    segment = {"stop_at": stop_at, "warm_start": warm_start} if stop_at is not None or warm_start else None
    result = fit_run(cfg, dist, hooks, storage, callbacks, tracking, entry_point, segment)
    results = dict(result.metrics or {})
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            artifacts = Path(d) / "artifacts"
            if (artifacts / "results.json").is_file():
                results = json.loads((artifacts / "results.json").read_text())
            if run_dir is not None:
                _copy_artifacts(artifacts, run_dir)
    return results, result.checkpoint


def _check_warm_start(state_dir: Path, cfg: RunConfig) -> None:
    """The checkpoint a run warm-starts from must differ from ``cfg`` only in what a warm start may change
    (``polar_vbll.training.warm_start``); refused here, on the driver, before Ray Train starts."""
    from polar_vbll.training.warm_start import check_warm_start

    try:
        check_warm_start(load_checkpoint(state_dir).get("config", {}), cfg)
    except CheckpointError as exc:
        raise CheckpointError(f"{state_dir}: {exc}") from None


def fit_run(
    cfg: RunConfig,
    dist: DistConfig,
    hooks: Sequence[StepHook],
    storage: str,
    callbacks: Sequence[Any] = (),
    tracking: TrackingTarget | None = None,
    entry_point: str = "train --workers",
    segment: dict[str, Any] | None = None,
):
    """One Ray Train run of ``cfg`` (name = run name, resumed from its latest checkpoint in ``storage``).

    ``callbacks``: Ray Train user callbacks (a Tune trial passes ``TuneReportCallback`` so that the
    workers' reports reach Tune's scheduler); ``tracking``: the MLflow run rank 0 writes to; ``segment``:
    a pause step and a warm start (:func:`run_segment`, ``distributed.worker.run_worker``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distributed.head_actor import head_coordinator_actor

    coordinator = head_coordinator_actor().remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "dist": dist.model_dump(mode="json"),
            "coordinator": coordinator,
            "hooks": list(hooks),
            "tracking": dataclasses.asdict(tracking.shareable()) if tracking is not None else None,
            "entry_point": entry_point,
            "segment": segment,
        },
        scaling_config=ScalingConfig(
            num_workers=dist.workers,
            use_gpu=dist.use_gpu,
            resources_per_worker={
                "CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {}),
                **({"memory": dist.worker_memory_mb * 2**20} if dist.worker_memory_mb else {}),
            },  # fmt: skip
        ),
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(2, cfg.train.keep_checkpoints)),
            callbacks=list(callbacks) or None,
        ),
    )
    try:
        try:
            result = trainer.fit()
        except Exception as exc:
            fatal = _recorded_failure(coordinator)
            raise DistributedRunError(fatal or f"the distributed run failed: {first_error_line(str(exc))}") from exc
        fatal = _recorded_failure(coordinator)  # the workers end a run they cannot finish without an error
        if fatal:
            raise DistributedRunError(fatal)
        return result
    finally:
        ray.kill(coordinator)


def _recorded_failure(coordinator) -> str | None:
    """The failure the workers recorded with the coordinator actor, if it can still be asked."""
    import ray

    try:
        return ray.get(coordinator.fatal.remote(), timeout=30)
    except Exception:  # the actor itself died: nothing recorded can be read
        return None


def first_error_line(text: str) -> str:
    """The most telling line of a Ray error: the last ``SomeError: message`` line, else the first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Diverged", "Divergence", "Failure")) and " " not in head:
            return ln[:500]
    return (lines[0] if lines else "unknown error")[:500]


def _copy_artifacts(src: Path, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        s, d = src / name, run_dir / name
        if s.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(s, d)
        elif s.is_file():
            shutil.copy2(s, d)
