"""The DeepSpeed backend: one rank of N data-parallel Ray Train workers, for the one trainer of
``polar_vbll.training``.

What it does differently from the one-process ``LocalBackend`` (docs/design.md, "Distributed training"):

- features go through the DeepSpeed engine's forward (ZeRO-3 gathers the partitioned backbone there);
  this rank computes its slice of each global batch (``distributed.sharding``), in ``grad_accum``
  micro-batches; with ``data_split: shard`` it prepares the cached frozen prefix of its own shard of each
  split only (in as many batches as the largest shard's, for ZeRO-3's collective gathers) and draws its
  slice of every step from that shard (``shard_step_micro_batches``);
- ``backward`` is ``engine.backward``; the Euclidean step (Theta, or LoRA's A and B) is ``engine.step()``,
  which also reduces their gradients; the Stiefel factors stay *outside* the engine (fp32, never
  partitioned or cast), their gradients averaged with ONE flat all-reduce per step, and the trainer takes
  the same Riemannian step on every rank;
- passes over a whole split (the head's features, evaluation) are split into contiguous shards, padded so
  that every rank runs the same number of forward passes (ZeRO-3's gathers are collectives), and gathered;
- checkpoints are consolidated: Theta gathered, its AdamW moments reassembled into exactly what a
  one-process ``torch.optim.AdamW`` holds, so a distributed checkpoint resumes in one process too;
- replicas are compared bitwise (a per-tensor sha256 across ranks) every ``sync_check_every`` steps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distributed.collectives import allreduce_mean_, bank_gradients, gather_rows, verify_replicas
from distributed.config import DistConfig
from distributed.engine import (
    build_engine,
    deepspeed_config,
    gathered,
    load_theta_optimizer_state,
    set_theta_lr,
    theta_optimizer_state,
)
from distributed.sharding import (
    lockstep_batches,
    prefix_batches,
    shard_bounds,
    shard_indices,
    shard_step_micro_batches,
    step_micro_batches,
)
from polar_vbll.config import RunConfig
from polar_vbll.features import EncodedSplit
from polar_vbll.training import build_theta_optimizer


class DeepSpeedBackend:
    """This rank's view of a DeepSpeed-wrapped backbone (see the module docstring). Build it on every rank
    (``deepspeed.initialize`` is a collective) after the adapter's weights are final for the start (a
    resumed run loads them first: the engine keeps fp32 master copies from here on)."""

    def __init__(
        self, cfg: RunConfig, dist_cfg: DistConfig, backbone: nn.Module, theta: Sequence[nn.Parameter],
        pad_id: int, micro_batch: int,
        fingerprint_chunks: Callable[[torch.Tensor], Iterable[torch.Tensor]] | None = None,
    ) -> None:  # fmt: skip
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dist_cfg = dist_cfg
        self.sync_check_every = dist_cfg.sync_check_every
        self.grad_accum = dist_cfg.grad_accum
        self.sync_every_step = not dist_cfg.use_gpu  # on GPUs the loss is checked at logging steps only
        # where collectives' tensors live: nccl reduces CUDA tensors only, gloo host ones
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        self.theta = list(theta)
        self.prefix_seconds: dict[str, float] = {}  # split name -> seconds in the frozen-prefix pass (this rank)
        ds_config = deepspeed_config(cfg, dist_cfg, micro_batch)
        self.engine, self.source = build_engine(
            backbone, build_theta_optimizer(self.theta, cfg.optim), ds_config, pad_id, cfg.train, fingerprint_chunks,
            same_ids=dist_cfg.data_split == "replicate",
        )

    @property
    def model(self) -> nn.Module:
        return self.source.model

    # -------------------------------------------------------------------------------------- features
    def own_examples(self, n: int) -> list[int] | None:
        """The examples of a split of ``n`` whose frozen-prefix states this rank keeps: None (all of them)
        with ``data_split: replicate``, its shard (``shard_indices``) with ``shard``."""
        return None if self.dist_cfg.data_split == "replicate" else shard_indices(n, self.rank, self.world)

    def prepare(self, enc: EncodedSplit, batch_size: int, progress: bool = False) -> None:
        """The frozen-prefix pass of the cheap path, through the engine (a no-op on the full path), over the
        whole split or this rank's shard (:meth:`own_examples`; then in ``prefix_batches`` batches on every
        rank). The states are read from the disk cache only when every rank has them (under ZeRO-3 the
        prefix pass is a collective: all ranks run it or none does). Its seconds add up in
        :attr:`prefix_seconds`."""
        t = time.perf_counter()
        own = self.own_examples(len(enc))
        hit = torch.tensor([int(self.source.on_disk(enc, own))], dtype=torch.int64).to(self.comm_device)
        dist.all_reduce(hit, op=dist.ReduceOp.MIN)
        pad = 0 if own is None else prefix_batches(len(enc), self.world, batch_size)
        with torch.no_grad():
            self.engine(enc, None, prepare_batch_size=batch_size, use_disk=bool(hit.item()), indices=own,
                        min_batches=pad)  # fmt: skip
        self.prefix_seconds[enc.name] = self.prefix_seconds.get(enc.name, 0.0) + time.perf_counter() - t

    def features(self, enc: EncodedSplit, idx: Sequence[int]) -> torch.Tensor:
        return self.engine(enc, list(idx))

    def shard(self, n: int) -> tuple[int, int]:
        return shard_bounds(n, self.rank, self.world)

    @torch.no_grad()
    def shard_features(self, enc: EncodedSplit, batch_size: int) -> torch.Tensor:
        """``phi`` of this rank's contiguous shard of ``enc`` (adapter dropout as set), ``(n_shard, d)`` fp32
        on the backbone's device; padded batches keep every rank's forward passes in lockstep."""
        self.prepare(enc, batch_size)
        rows = [
            self.engine(enc, batch.idx)[: batch.n_real].detach().to(torch.float32)
            for batch in lockstep_batches(len(enc), self.rank, self.world, batch_size)
        ]
        return torch.cat(rows) if rows else torch.zeros(0, device=self.comm_device)

    def split_features(self, enc: EncodedSplit, batch_size: int, progress: bool = False) -> torch.Tensor:
        """All rows of ``enc`` on every rank: each rank's shard, gathered in rank order (a collective)."""
        return gather_rows(self.shard_features(enc, batch_size))

    # ------------------------------------------------------------------------------------------ steps
    def step_batches(self, step: int, n: int, batch_size: int, seed: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: its slice of the one-process global batch
        (``replicate``), or ``batch_size / world`` examples drawn from its own shard (``shard``; the rule of
        ``distributed.sharding.shard_step_micro_batches``)."""
        rule = step_micro_batches if self.dist_cfg.data_split == "replicate" else shard_step_micro_batches
        return rule(step, n, batch_size, seed, self.rank, self.world, self.grad_accum)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-steps; it steps only at the boundary

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        buf = value.detach().reshape(1).to(torch.float64).clone()
        allreduce_mean_([buf])
        return buf[0]

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Average the Stiefel-factor gradients over ranks in one flat all-reduce."""
        allreduce_mean_(bank_gradients(list(params)))

    def set_theta_lr(self, lr: float) -> None:
        set_theta_lr(self.engine, lr)

    def theta_step(self) -> None:
        self.engine.step()

    def theta_state_dict(self) -> dict[str, Any]:
        return theta_optimizer_state(self.engine, self.theta)

    def load_theta_state_dict(self, state: dict[str, Any]) -> None:
        load_theta_optimizer_state(self.engine, self.theta, state)

    # ------------------------------------------------------------------------------------ collectives
    @contextlib.contextmanager
    def gathered(self, params: Sequence[nn.Parameter]) -> Iterator[None]:
        with gathered(self.engine, params):
            yield

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def verify(self, named: dict[str, torch.Tensor], where: str) -> str:
        """Bitwise replica check of ``named`` plus Theta's AdamW moments at ZeRO-0 (where every rank keeps
        a whole copy); raises :class:`~polar_vbll.errors.ReplicaDivergence` naming the tensors."""
        named = dict(named)
        if self.dist_cfg.zero_stage == 0:
            for pid, s in self.engine.optimizer.state_dict()["state"].items():
                named.update({f"theta_opt.{pid}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
        return verify_replicas(named, where)

    def describe(self) -> dict[str, Any]:
        return {"kind": "deepspeed", **self.dist_cfg.model_dump(mode="json"), "world_size": self.world}

