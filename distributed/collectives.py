"""The few collectives the worker needs, on plain ``torch.distributed`` (gloo or nccl).

- :func:`allreduce_mean_` averages the Stiefel-factor gradients across ranks in ONE flat buffer (one
  collective per optimizer step, whatever the number of factor groups);
- :func:`verify_replicas` proves, rather than assumes, that every rank holds bitwise the same replicated
  state (a per-tensor sha256 compared across ranks), and names the tensors that differ;
- :func:`gather_rows` collects per-rank row blocks of different lengths, in rank order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from polar_vbll.errors import ReplicaDivergence

__all__ = [
    "ReplicaDivergence",
    "allreduce_mean_",
    "bank_gradients",
    "broadcast_object",
    "gather_rows",
    "tensor_digest",
    "verify_replicas",
]


def allreduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over all ranks, in place, with a single all-reduce.

    Tensors are flattened into one fp32-or-wider buffer in the given order (every rank must pass the same
    shapes in the same order, e.g. ``StiefelBank.groups()``'s sorted order).
    """
    if not tensors:
        return
    world = dist.get_world_size()
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if world > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def bank_gradients(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter, created as zeros where autograd left none (a rank whose loss does
    not reach a factor must still contribute to the all-reduce)."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return grads


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (bitwise: -0.0 and 0.0 differ, NaN payloads count)."""
    cpu = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{cpu.dtype}:{tuple(cpu.shape)}:".encode())
    if cpu.numel():
        h.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_digests(named: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Name -> :func:`tensor_digest`, names sorted."""
    return {k: tensor_digest(named[k]) for k in sorted(named)}


def combined_digest(digests: Mapping[str, str]) -> str:
    """One sha256 over a whole ``state_digests`` mapping (names included)."""
    h = hashlib.sha256()
    for k in sorted(digests):
        h.update(f"{k}={digests[k]};".encode())
    return h.hexdigest()


def verify_replicas(named: Mapping[str, torch.Tensor], where: str) -> str:
    """Check that every rank holds bitwise-identical tensors under the same names; returns the combined
    digest. Raises :class:`ReplicaDivergence` on every rank, naming each tensor whose bytes differ and the
    ranks that disagree with rank 0. A collective: every rank must call it at the same point."""
    mine = state_digests(named)
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    reference = gathered[0] or {}
    problems = []
    for rank, theirs in enumerate(gathered[1:], start=1):
        theirs = theirs or {}
        if set(theirs) != set(reference):
            diff = sorted(set(theirs) ^ set(reference))
            problems.append(f"rank {rank} holds other tensor names than rank 0: {diff[:5]}")
            continue
        bad = [k for k in sorted(reference) if theirs[k] != reference[k]]
        if bad:
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            problems.append(f"rank {rank} differs from rank 0 in {bad[:5]}{more}")
    if problems:
        raise ReplicaDivergence(f"replicas diverged {where}: " + "; ".join(problems))
    return combined_digest(mine)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, ...)`` block in rank order (the ``n_r`` may differ). CPU tensors."""
    world = dist.get_world_size()
    if world == 1:
        return rows
    counts: list[int | None] = [None] * world
    dist.all_gather_object(counts, int(rows.shape[0]))
    longest = max(int(c or 0) for c in counts)
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c or 0)] for p, c in zip(parts, counts, strict=True)])


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
