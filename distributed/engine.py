"""DeepSpeed around the frozen backbone; the Stiefel factors stay outside it.

What DeepSpeed gets (docs/design.md, "Distributed training"): a :class:`FeatureModel` whose only child is
the backbone with its ``PolarLinear`` layers, and the Euclidean trainables, the Thetas, with the AdamW that
``polar_vbll.training.build_theta_optimizer`` configures. The ``StiefelBank`` holding every U and V is *not* a
child of that module, so DeepSpeed never partitions, flattens, casts or clears it; the worker all-reduces
its gradients and steps it with ``polar_vbll``'s :class:`~polar_vbll.optim.StiefelOptimizer`.

Checkpoints are consolidated, not per rank: Theta is gathered (ZeRO-3 partitions it) and its AdamW
moments are reassembled into exactly the ``state_dict`` of a one-process ``torch.optim.AdamW`` over
``polar.theta_parameters()``. A distributed checkpoint is therefore independent of the stage and of the
number of workers, and the single-process :class:`polar_vbll.training.Trainer` over its local backend can resume it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from distributed.config import DistConfig
from polar_vbll.architecture import blocks_path
from polar_vbll.backbone import decoder_of
from polar_vbll.config import RunConfig, TrainConfig
from polar_vbll.features import EncodedSplit, FeatureSource, lowest_adapted_block
from polar_vbll.prefix_cache import prefix_fingerprint


def import_deepspeed():
    """Import DeepSpeed for this machine: the CPU accelerator when there is no GPU, no JIT build of the
    shared-memory communication op (30 s of g++ on first use; gloo does the work without it)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per collective
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
    return deepspeed


def deepspeed_config(cfg: RunConfig, dist: DistConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config for a run: ZeRO stage, micro-batch and accumulation, Theta clipping."""
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = dist.reduce_bucket_size
    if dist.zero_stage == 3:
        # CPU workers release every gathered block at once and gather nothing ahead (0: memory first; measured on
        # a 2B model at 4 workers: a run peak of 2,514 -> 1,873 MB per worker, bench/RESULTS.md); GPU workers keep
        # DeepSpeed's defaults, which overlap the gathers with compute
        lean = None if dist.use_gpu else 0
        for key, value in (("param_persistence_threshold", dist.param_persistence_threshold),
                           ("max_live_parameters", dist.max_live_parameters if dist.max_live_parameters is not None
                            else lean),
                           ("max_reuse_distance", dist.max_reuse_distance if dist.max_reuse_distance is not None
                            else lean),
                           ("prefetch_bucket_size", dist.prefetch_bucket_size if dist.prefetch_bucket_size is not None
                            else lean)):  # fmt: skip
            if value is not None:
                zero[f"stage3_{key}"] = value
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": dist.grad_accum,
        "zero_optimization": zero,
        # the client optimizer is torch's AdamW (the one the single-process trainer uses), fine under ZeRO
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(cfg.optim.max_grad_norm or 0.0),
        # DeepSpeed's bf16 mode only at ZeRO-3, where zero.Init partitions the frozen backbone in bfloat16. At
        # stages 0-2 it would wrap the client AdamW in its bf16 optimizer (a state_dict of another form) and
        # flatten the trainable Theta into bfloat16; the backbone is already loaded in model.dtype there, and
        # Theta, U, V and the head stay float32, as in one process
        "bf16": {"enabled": cfg.model.dtype == "bfloat16" and dist.zero_stage == 3},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class FeatureModel(nn.Module):
    """The module handed to DeepSpeed: the backbone is its one child, ``forward`` computes ``phi``.

    Every pass goes through the engine's forward (never around it), so DeepSpeed's start/end-of-forward
    hooks run; under ZeRO-3 they drive parameter gathering. ``forward(enc, idx)`` returns
    ``FeatureSource.features(enc, idx)``; ``forward(enc, None, prepare_batch_size=b)`` runs the frozen
    prefix over the split once (the cheap path; over its examples ``indices`` only, in at least
    ``min_batches`` batches: ``FeatureSource.prepare``) and returns an empty tensor.

    The :class:`FeatureSource` is attached *after* ``deepspeed.initialize``: on the cheap path it holds
    shallow copies of the decoder (``SplitDecoder`` views), which must copy the ZeRO-3 attributes that
    DeepSpeed sets on the decoder, not predate them.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self._source: FeatureSource | None = None

    def attach(self, source: FeatureSource) -> None:
        if source.model is not self.backbone:
            raise ValueError("the feature source must read the backbone this module wraps")
        object.__setattr__(self, "_source", source)  # not a module; keeps the bank out of the engine too

    @property
    def source(self) -> FeatureSource:
        if self._source is None:
            raise RuntimeError("FeatureModel: attach a FeatureSource after deepspeed.initialize")
        return self._source

    def forward(
        self, enc: EncodedSplit, idx: Sequence[int] | None, prepare_batch_size: int | None = None,
        use_disk: bool = True, indices: Sequence[int] | None = None, min_batches: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        if prepare_batch_size is not None:
            self.source.prepare(enc, prepare_batch_size, progress=False, use_disk=use_disk, indices=indices,
                                min_batches=min_batches)  # fmt: skip
            return torch.zeros(0)
        assert idx is not None
        return self.source.features(enc, list(idx))


def with_bucket_size(config: dict[str, Any], trainable: int) -> dict[str, Any]:
    """``config`` with ZeRO's gradient-reduction bucket sized to the ``trainable`` elements (Theta, or LoRA's
    A and B: thousands to millions) unless ``dist.reduce_bucket_size`` set it. DeepSpeed's default, 5e8
    elements, is a buffer of 1-2 GB per worker (allocated at stages 1-3 whatever the trainable size)."""
    zero = dict(config.get("zero_optimization", {}))
    if zero.get("stage", 0) == 0 or "reduce_bucket_size" in zero:
        return config
    zero["reduce_bucket_size"] = max(int(trainable), 1)
    return {**config, "zero_optimization": zero}


def build_engine(
    backbone: nn.Module,
    theta_optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    pad_id: int,
    train_cfg: TrainConfig,
    fingerprint_chunks: Callable[[torch.Tensor], Iterable[torch.Tensor]] | None = None,
    same_ids: bool = False,
):
    """``deepspeed.initialize`` over :class:`FeatureModel` with the Theta optimizer (a collective), then
    the feature source; returns ``(engine, source)``. The frozen prefix's weight hash (the disk cache's
    key) is taken before ``initialize``, while every rank still holds the whole weights (ZeRO-3
    partitions them), or, for a backbone loaded partitioned, from its checkpoint file through
    ``fingerprint_chunks`` (``ShardedCheckpoint.chunks``). Under ZeRO-3 the cheap path's prefix view looks
    token rows up from the embedding's partitions (``distributed.embedding``) instead of gathering it;
    ``same_ids``: every rank prepares the same examples (``data_split: replicate``), so the lookup skips
    all-gathering the ids."""
    deepspeed = import_deepspeed()
    fingerprint = None
    lowest = lowest_adapted_block(backbone)
    if train_cfg.cache_frozen_prefix and lowest:
        fingerprint = prefix_fingerprint(decoder_of(backbone), lowest, fingerprint_chunks, blocks_path(backbone))
    params = [p for g in theta_optimizer.param_groups for p in g["params"]]
    config = with_bucket_size(config, sum(p.numel() for p in params))
    module = FeatureModel(backbone)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=theta_optimizer, model_parameters=params, config=config
    )
    source = FeatureSource.for_config(backbone, pad_id, train_cfg, fingerprint=fingerprint)
    if source.split is not None:  # ZeRO-3: the prefix pass looks up rows, never gathers the embedding
        from distributed.embedding import install

        install(source.split.prefix, source.split.embedding_attr, same_ids)
    module.attach(source)
    return engine, source


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


@contextlib.contextmanager
def gathered(engine, params: Sequence[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full values of ``params`` on every rank inside the block (ZeRO-3 partitions them; other stages
    hold them whole). A collective: every rank must enter. With ``modifier_rank`` set, that rank's values
    are scattered back on exit."""
    if zero_stage(engine) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank):
            yield
    else:
        yield


def set_theta_lr(engine, lr: float) -> None:
    """The learning rate of the engine-owned AdamW (the worker applies the schedule itself)."""
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that does the arithmetic: the client optimizer itself at stage 0, the one DeepSpeed
    re-pointed at its flat fp32 partitions at stages 1-3."""
    return engine.optimizer if zero_stage(engine) == 0 else engine.optimizer.optimizer


def _flat_masters(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions the inner AdamW keys its state by (stages 1-3). Stage 3 empties the
    inner optimizer's ``params`` lists between steps, so they are read from the ZeRO optimizer."""
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # stage 3
    if flats is None:
        flats = zero.single_partition_of_fp32_groups  # stages 1-2
    return list(flats)


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def theta_optimizer_state(engine, params: Sequence[nn.Parameter]) -> dict[str, Any]:
    """The Theta AdamW state as ``torch.optim.AdamW(params).state_dict()`` holds it in one process.

    A collective at stages 1-3 (moments are gathered from their partitions): every rank must call it."""
    inner = _inner_optimizer(engine)
    if zero_stage(engine) == 0:
        # a deep copy: torch's state_dict aliases the live moments, which later steps update in place
        return copy.deepcopy(inner.state_dict())
    from deepspeed.utils import safe_get_full_optimizer_state

    flat_states = [s for s in inner.state.values() if s]
    group = {**_hyper(inner.param_groups[0]), "params": list(range(len(params)))}
    if not flat_states:
        return {"state": {}, "param_groups": [group]}
    step = flat_states[0]["step"]
    state = {}
    for i, p in enumerate(params):
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        state[i] = {
            "step": torch.as_tensor(step, dtype=torch.float32).clone().cpu(),
            **{
                key: safe_get_full_optimizer_state(p, key).detach().reshape(shape).cpu().clone()
                for key in ("exp_avg", "exp_avg_sq")
            },
        }
    return {"state": state, "param_groups": [group]}


def load_theta_optimizer_state(engine, params: Sequence[nn.Parameter], sd: dict[str, Any]) -> None:
    """Inverse of :func:`theta_optimizer_state` on a freshly initialised engine (every rank calls it with
    the same ``sd``). Creates the AdamW state entries DeepSpeed would only create at its first step."""
    inner = _inner_optimizer(engine)
    if zero_stage(engine) == 0:
        inner.load_state_dict(copy.deepcopy(sd))  # torch keeps (and steps) the given tensors
        return
    for g, saved in zip(inner.param_groups, sd["param_groups"], strict=False):
        g.update({k: v for k, v in saved.items() if k not in ("params", "lr")})
    state = {int(k): v for k, v in sd["state"].items()}
    if not state:
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    step = float(state[0]["step"])
    for flat in _flat_masters(engine):
        inner.state[flat] = {
            "step": torch.tensor(step, dtype=torch.float32),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    relink = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if relink is not None:  # stages 1-2 map each parameter onto the (now existing) flat state tensors
        relink()
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, state[i][key].reshape(-1).to(torch.float32), key)


def local_parameter_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of parameter storage this rank holds for ``module``: under ZeRO-3 its partitions
    (``ds_tensor``) plus whatever is materialised (persistent small parameters), otherwise the full
    tensors; ``full`` is what one unpartitioned copy would take."""
    local = full = 0
    for p in module.parameters():
        size = p.element_size()
        full += (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * size
        local += p.data.numel() * size
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None and p.data.numel() == 0:
            local += ds_tensor.numel() * ds_tensor.element_size()
    return {"local": local, "full": full}
