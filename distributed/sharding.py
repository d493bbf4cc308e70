"""Which examples each rank works on. Pure functions of (step, rank, world): no communication.

Two rules keep the distributed run equal to the one-process run and free of deadlocks:

- A training step's global batch is ``polar_vbll.training.batch_indices(step, ...)``, the very batch the
  single-process trainer uses; rank ``r`` takes the ``r``-th equal contiguous slice, so concatenating the
  slices in rank order gives the global batch back (``DistConfig.data_split: replicate``, the default).
  With ``data_split: shard`` rank ``r`` draws its slice from its own contiguous shard instead
  (:func:`shard_step_micro_batches`; the rule is in docs/distributed.md), so that it needs the frozen
  prefix's states of its shard only.
- Under ZeRO-3 every forward pass gathers parameters collectively, so all ranks must run the same number
  of forward passes. Passes over a split (features for the head, evaluation) are therefore padded: a rank
  with fewer examples repeats one of its own (or, with an empty shard, :func:`shard_indices`' one example)
  and drops the extra rows afterwards; a shard's frozen-prefix pass runs :func:`prefix_batches` batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from polar_vbll.errors import ConfigError
from polar_vbll.training.schedule import batch_indices

T = TypeVar("T")


def rank_slice(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The ``rank``-th of ``world`` equal contiguous slices of ``items`` (``len(items) % world == 0``)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    if len(items) % world:
        raise ValueError(f"{len(items)} items do not split evenly over {world} ranks")
    size = len(items) // world
    return list(items[rank * size : (rank + 1) * size])


def micro_batches(batch: Sequence[int], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: its slice, cut into ``grad_accum`` equal parts."""
    mine = rank_slice(list(batch), rank, world)
    return [rank_slice(mine, i, grad_accum) for i in range(grad_accum)]


def step_micro_batches(
    step: int, n: int, batch_size: int, seed: int, rank: int, world: int, grad_accum: int
) -> list[list[int]]:
    """This rank's micro-batches of optimizer step ``step`` (the global batch of ``batch_indices``)."""
    return micro_batches(batch_indices(step, n, batch_size, seed), rank, world, grad_accum)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous shard of ``range(n)``; the first ``n % world`` ranks get
    one more example. Shards in rank order cover ``range(n)`` in order."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_shards(n: int, world: int) -> None:
    """``data_split: shard`` trains every rank on its own shard of the training split: refuses (``ConfigError``,
    one line) a split of fewer examples than ranks, where a shard would be empty."""
    if n < world:
        raise ConfigError(
            f"--dist-set data_split=shard needs at least one training example per worker: {n} examples for "
            f"{world} workers; use fewer workers or data_split=replicate"
        )


def shard_step_micro_batches(
    step: int, n: int, batch_size: int, seed: int, rank: int, world: int, grad_accum: int
) -> list[list[int]]:
    """This rank's micro-batches of optimizer step ``step`` under ``data_split: shard``: ``batch_size //
    world`` examples drawn from its own shard ``[start, stop) = shard_bounds(n, rank, world)`` by
    ``start + batch_indices(step, stop - start, batch_size // world, seed + rank)`` (seeded per-epoch
    permutations of the shard, as one process permutes the split), cut into ``grad_accum`` equal parts.
    With ``world == 1`` this is :func:`step_micro_batches`. Raises ``ConfigError`` for an empty shard
    (fewer examples than ranks)."""
    check_shards(n, world)
    start, stop = shard_bounds(n, rank, world)
    mine = [start + i for i in batch_indices(step, stop - start, batch_size // world, seed + rank)]
    return [rank_slice(mine, i, grad_accum) for i in range(grad_accum)]


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The examples this rank's lock-step passes over a split read (:func:`lockstep_batches`): its shard,
    or, when the shard is empty (``n < world``), the one example its padding repeats."""
    start, stop = shard_bounds(n, rank, world)
    if stop > start:
        return list(range(start, stop))
    return [start] if start < n else ([0] if n else [])


def prefix_batches(n: int, world: int, batch_size: int) -> int:
    """Forward batches every rank runs in a sharded frozen-prefix pass of a split of ``n`` examples: as many
    as the largest shard (``ceil(n / world)`` examples, or the one example of an empty shard) needs."""
    if not n:
        return 0
    return math.ceil(max(1, math.ceil(n / world)) / batch_size)


@dataclass(frozen=True)
class PaddedBatch:
    """Indices to run through the model; only the first ``n_real`` rows are this rank's examples."""

    idx: list[int]
    n_real: int


def lockstep_batches(n: int, rank: int, world: int, batch_size: int) -> list[PaddedBatch]:
    """This rank's shard of ``range(n)`` in batches, padded so that every rank gets the same number of
    batches of the same sizes (see the module docstring). Padding rows repeat an index already used."""
    start, stop = shard_bounds(n, rank, world)
    longest = math.ceil(n / world)
    n_batches = math.ceil(longest / batch_size) if longest else 0
    out = []
    for b in range(n_batches):
        lo = start + b * batch_size
        hi = min(stop, lo + batch_size)
        real = list(range(lo, hi)) if lo < stop else []
        want = min(batch_size, longest - b * batch_size)
        filler = real[0] if real else shard_indices(n, rank, world)[0]
        out.append(PaddedBatch(real + [filler] * (want - len(real)), len(real)))
    return out
