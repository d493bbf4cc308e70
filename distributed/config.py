"""How a run is spread over workers: the settings that are not part of the method.

Kept apart from :class:`polar_vbll.config.RunConfig` on purpose: the same ``RunConfig`` must give the same
model with 1 worker, 2 workers or one process, so nothing here may change the math (only how it is
computed and checkpointed). It is still recorded in every distributed checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polar_vbll.config import RunConfig
from polar_vbll.errors import ConfigError


class DistConfig(BaseModel):
    """Workers, DeepSpeed ZeRO stage, replica checks, fault tolerance."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    workers: int = Field(2, gt=0, description="Ray Train workers (data-parallel ranks)")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        3, description="DeepSpeed ZeRO stage for the backbone; only 3 saves memory on a frozen backbone"
    )
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step on each worker")
    sync_check_every: int = Field(
        10, ge=0, description="compare adapter checksums across ranks every N steps (0: only at the end)"
    )
    max_failures: int = Field(2, ge=-1, description="worker-group restarts Ray Train may do (-1: forever)")
    param_persistence_threshold: int | None = Field(
        None,
        ge=0,
        description="ZeRO-3: parameters with fewer elements stay unpartitioned (None: DeepSpeed's 1e5)",
    )
    reduce_bucket_size: int | None = Field(
        None,
        gt=0,
        description="ZeRO 1-3: elements of the gradient-reduction bucket (DeepSpeed's reduce_bucket_size); None: the "
        "trainable parameters' count, one bucket for all (DeepSpeed's own default, 5e8, allocates a 1-2 GB buffer "
        "per worker for a few thousand trainable elements)",
    )
    max_live_parameters: int | None = Field(
        None,
        ge=0,
        description="ZeRO-3: gathered parameters (elements) a worker may keep live at once "
        "(stage3_max_live_parameters; None: 0 on CPU workers, each block released after use; DeepSpeed's 1e9 on GPUs)",
    )
    max_reuse_distance: int | None = Field(
        None,
        ge=0,
        description="ZeRO-3: a gathered parameter needed again within this many elements is kept instead of "
        "released (stage3_max_reuse_distance; None: 0 on CPU workers; DeepSpeed's 1e9 on GPUs)",
    )
    prefetch_bucket_size: int | None = Field(
        None,
        ge=0,
        description="ZeRO-3: elements gathered ahead of the forward (stage3_prefetch_bucket_size; None: 0, no "
        "prefetch, on CPU workers; DeepSpeed's 5e7 on GPUs)",
    )
    sharded_load: bool = Field(
        True,
        description="ZeRO-3: build the backbone partitioned (zero.Init) and read each rank's partition straight "
        "from the safetensors files, in model.dtype (distributed.loading); false: every worker loads the whole "
        "model first and DeepSpeed partitions it (peak memory: the whole model on every worker)",
    )
    malloc_mmap_threshold: int | None = Field(
        131072,
        ge=0,
        description="ZeRO-3 workers' glibc M_MMAP_THRESHOLD (MALLOC_MMAP_THRESHOLD_, bytes): larger allocations "
        "go back to the OS when freed, so a worker's resident memory follows what it holds while gathered "
        "blocks come and go every forward; None: glibc's adaptive threshold, which keeps freed gathers resident "
        "(measured: bench/zero_memory.py)",
    )
    worker_memory_mb: int | None = Field(
        None,
        gt=0,
        description="each worker's memory budget in MiB: Ray reserves it per worker (its memory resource; a cluster "
        "whose nodes cannot hold the workers is refused before the run) and each worker enforces it on its own peak "
        "resident memory, ending the run in one line (rank, phase, peak) when over (distributed.memory_guard); "
        "None: no budget",
    )
    data_split: Literal["replicate", "shard"] = Field(
        "replicate",
        description="[choice] which examples a rank holds and trains on. replicate: every rank prepares the "
        "cached frozen prefix of the whole split and takes its slice of the one-process global batch (N "
        "workers train exactly the one-process model); shard: rank r prepares and keeps the states of its own "
        "contiguous shard of every split only and draws its slice of each step's batch from that shard "
        "(distributed.sharding.shard_step_micro_batches; 1/N of the prefix pass and its memory per rank, "
        "another batch order than one process beyond 1 worker; docs/distributed.md)",
    )
    use_gpu: bool = Field(False, description="one GPU per worker (nccl); CPU workers use gloo")
    cpus_per_worker: float = Field(1.0, gt=0)
    health_check_interval_s: float | None = Field(
        None, gt=0, description="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (each report blocks about this long)"
    )


def check_batch_layout(cfg: RunConfig, dist: DistConfig, workers: int | None = None) -> int:
    """The per-worker micro-batch size; refuses a global batch that does not split evenly.

    Every rank must see an equal slice of every global batch (``polar_vbll.training.batch_indices``), so that
    averaging the ranks' gradients gives exactly the one-process gradient of the same global batch.
    """
    w = workers if workers is not None else dist.workers
    parts = w * dist.grad_accum
    if cfg.train.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} does not split into {w} workers x {dist.grad_accum} "
            f"micro-batches; choose a multiple of {parts}"
        )
    return cfg.train.batch_size // parts


def check_adapter_stage(cfg: RunConfig, dist: DistConfig) -> None:
    """An adapter that steps its posterior in place after the theta step (BLoB, ``AdapterKind.posterior_step``)
    runs at ZeRO stage 0 only: at stages 1-3 DeepSpeed keeps the master copy of ``A`` in its optimizer's
    partitions and would overwrite the in-place step. Refused before Ray starts, naming the flag."""
    from polar_vbll.methods import METHODS

    kind = METHODS[cfg.method].adapter_kind
    if kind.posterior_step and dist.zero_stage != 0:
        raise ConfigError(
            f"{cfg.method} on workers runs at --zero-stage 0 only (got {dist.zero_stage}): {kind.label}'s second "
            "optimizer steps the adapter's posterior in place, and ZeRO stages 1-3 keep its master copy in "
            "DeepSpeed's optimizer partitions; pass --zero-stage 0"
        )


def dist_config_from(data: dict[str, Any] | None, overrides: list[str] | None = None) -> DistConfig:
    """Validate a mapping plus ``key=value`` overrides (YAML values) as a :class:`DistConfig`."""
    merged = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"distributed override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        merged[key.strip()] = yaml.safe_load(raw)
    try:
        return DistConfig.model_validate(merged)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']} (got {e.get('input')!r})"
                 for e in exc.errors()]  # fmt: skip
        flag = {"workers": "--workers", "zero_stage": "--zero-stage"}
        if len(lines) == 1:  # one line: name the flag the value came from
            key = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else ""
            raise ConfigError(f"invalid distributed setting {flag.get(key, '--dist-set ' + key)}: {lines[0]}") from None
        raise ConfigError("invalid distributed config:\n" + "\n".join(f"  {ln}" for ln in lines)) from None
