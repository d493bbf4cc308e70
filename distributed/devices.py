"""Devices of a distributed run: which device each Ray Train worker uses, checked on the driver.

With ``--dist-set use_gpu=true`` each worker reserves one GPU and uses its local rank's device (Ray Train
makes the node's reserved GPUs visible to its workers and numbers them by local rank), nccl carries the
collectives, and the backbone runs in bfloat16 unless ``model.dtype`` says otherwise; without it the
workers are CPU processes (gloo) in float32. ``model.device`` must agree: ``auto`` fits both, ``cuda`` asks
for GPU workers, ``cpu`` for CPU workers, and ``cuda:N`` cannot be honoured (each worker's GPU is Ray's
choice). The driver may have no GPU at all: nothing here asks the driver's CUDA.
"""

from __future__ import annotations

import torch

from distributed.config import DistConfig
from polar_vbll.config import RunConfig
from polar_vbll.errors import ConfigError
from polar_vbll.placement import Placement, resolved


def check_worker_device(cfg: RunConfig, dist: DistConfig) -> None:
    """Refuse a ``model.device`` the workers cannot honour (:class:`ConfigError`, naming what to set)."""
    spec = cfg.model.device
    if spec.startswith("cuda:"):
        raise ConfigError(
            f"model.device={spec}: with --workers each worker uses its own GPU (its local rank's); "
            "use model.device=cuda (or auto) with --dist-set use_gpu=true"
        )
    if spec == "cuda" and not dist.use_gpu:
        raise ConfigError("model.device=cuda with --workers needs GPU workers: add --dist-set use_gpu=true")
    if spec == "cpu" and dist.use_gpu:
        raise ConfigError("model.device=cpu, but --dist-set use_gpu=true asks for GPU workers; drop one of them")


def worker_dtype(cfg: RunConfig, dist: DistConfig) -> str:
    """The backbone dtype of every worker: ``model.dtype``, with ``auto`` as bfloat16 on GPU workers
    (compute capability 8.0 or newer: set float32 for older GPUs) and float32 on CPU workers. Decided on the
    driver, so every worker and the driver's records agree."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if dist.use_gpu else "float32"


def driver_config(cfg: RunConfig, dist: DistConfig) -> RunConfig:
    """The config the workers receive and the run records: ``model.device`` checked against ``dist`` and
    ``model.dtype`` resolved as the workers will run it."""
    check_worker_device(cfg, dist)
    return resolved(cfg, Placement(torch.device("cuda" if dist.use_gpu else "cpu"), worker_dtype(cfg, dist)))


def worker_placement(cfg: RunConfig, dist: DistConfig) -> Placement:
    """This worker's placement (call it inside a Ray Train worker): its local rank's GPU, made the current
    CUDA device (nccl and DeepSpeed use it), or the CPU."""
    if not dist.use_gpu:
        return Placement(torch.device("cpu"), worker_dtype(cfg, dist))
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type != "cuda":
        raise ConfigError("--dist-set use_gpu=true, but this Ray Train worker sees no CUDA device")
    torch.cuda.set_device(device)
    return Placement(device, worker_dtype(cfg, dist))
