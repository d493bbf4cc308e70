"""The frozen prefix's token embedding under ZeRO-3, read row by row from the partitions, never gathered.

A ZeRO-3 forward gathers each module's whole parameters on every rank. For the input embedding (the
largest single tensor of a small or mid-sized LLM: 21% of SmolLM2-135M's parameters) that means the full
``(V, d)`` matrix, plus the all-gather's flat buffer, on every rank at every prefix pass, which sets the
worker's peak memory (bench/zero_memory.py). A lookup needs only the rows of the batch's token ids: here
each rank copies the elements of those rows that lie in its own partition into a zero buffer, and a
bitwise-OR all-reduce over their bytes assembles the rows exactly (each element is set on exactly one
rank; the others contribute all-zero bits), so the result equals ``F.embedding`` on the gathered weight
bit for bit, signed zeros and NaNs included. Memory: ``(tokens, d)`` per rank; one all-reduce per call.
Ranks whose ids differ (a sharded prefix pass, ``DistConfig.data_split: shard``: each rank its own
examples) first all-gather their ids (two small all-gathers on every call), and the rows of all ranks' ids
are assembled at once: ``(sum of tokens, d)``.

Installed on the cheap path's frozen-prefix view only (:func:`install`), which runs without gradients;
the decoder itself, and DeepSpeed's hooks on it, are untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class PartitionedEmbedding(nn.Module):
    """``nn.Embedding``'s forward over a ZeRO-3-partitioned weight, without gathering it (module docstring).

    ``forward(ids)``: int64 ids of any shape -> ``(*ids.shape, d)`` in the weight's dtype. A collective:
    every rank of the weight's process group must call it the same number of times, with its own ids (the
    rows of every rank's ids are looked up together when they differ). The weight is held as a plain
    attribute (not a parameter), so no engine hook fetches it."""

    def __init__(self, embedding: nn.Embedding, same_ids: bool = False) -> None:
        super().__init__()
        if not hasattr(embedding.weight, "ds_tensor"):
            raise ValueError("PartitionedEmbedding needs a ZeRO-3 partitioned embedding weight")
        object.__setattr__(self, "_weight", embedding.weight)
        self.same_ids = same_ids  # every rank looks up the same ids (data_split replicate): no id all-gathers
        self.num_embeddings, self.embedding_dim = embedding.weight.ds_shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self._weight
        part = w.ds_tensor
        group = w.ds_process_group
        start = dist.get_rank(group=group) * part.ds_numel
        stop = min(start + part.ds_numel, w.ds_numel)
        d = self.embedding_dim
        flat = ids.reshape(-1).to(torch.int64)
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        flat = flat.to(part.device)
        wanted, offset = (flat, 0) if self.same_ids else all_ids(flat, group)
        element = wanted[:, None] * d + torch.arange(d, device=part.device)[None, :]  # (m, d) flat index of each
        mine = (element >= start) & (element < stop)
        size = part.element_size()
        out = torch.zeros(wanted.numel(), d, size, dtype=torch.uint8, device=part.device)  # each element's bytes
        out[mine] = part.data.view(torch.uint8).view(-1, size)[element[mine] - start]
        # one rank holds each element, the others contribute zero bytes: OR, or (nccl has no bitwise ops) MAX
        # of unsigned bytes, is that rank's bytes exactly
        op = dist.ReduceOp.MAX if dist.get_backend(group) == "nccl" else dist.ReduceOp.BOR
        dist.all_reduce(out, op=op, group=group)
        n = flat.numel()
        return out[offset : offset + n].reshape(n, d * size).view(part.dtype).view(*ids.shape, d)


def all_ids(flat: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """The ids every rank of ``group`` looks up, and where this rank's start among them: ``flat`` itself
    (offset 0) when all ranks hold the same ids, else every rank's ids concatenated in rank order. The same
    on every rank (two all-gathers: the counts, then the ids padded to the largest count)."""
    world = dist.get_world_size(group)
    n = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros(max(sizes), dtype=torch.int64, device=flat.device)
    padded[: flat.numel()] = flat
    every = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(every, padded, group=group)
    if len(set(sizes)) == 1 and all(torch.equal(e, every[0]) for e in every):
        return flat, 0
    rank = dist.get_rank(group=group)
    return torch.cat([e[:k] for e, k in zip(every, sizes, strict=True)]), sum(sizes[:rank])


def install(prefix_view: nn.Module, attr: str | None = "embed_tokens", same_ids: bool = False) -> bool:
    """Give the frozen-prefix view (``SplitDecoder.prefix``, a shallow copy of the decoder with its own
    module dict) a :class:`PartitionedEmbedding` in place of its token embedding at ``attr``
    (``SplitDecoder.embedding_attr``: ``embed_tokens``, ``wte``...); returns whether it did: only for a
    partitioned plain ``nn.Embedding`` (a subclass such as Gemma's scaled embedding computes more than a
    lookup, and keeps its own forward). The decoder's own embedding stays as it is. ``same_ids``: every rank
    passes the same ids (``data_split: replicate``), so the ids are not all-gathered first."""
    embedding = prefix_view._modules.get(attr) if attr else None
    if type(embedding) is not nn.Embedding or not hasattr(embedding.weight, "ds_tensor"):
        return False
    prefix_view._modules = dict(prefix_view._modules)  # the view's own dict: never the decoder's
    prefix_view._modules[attr] = PartitionedEmbedding(embedding, same_ids)
    return True
