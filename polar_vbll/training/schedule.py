"""The training schedule as pure functions of the step number: the learning-rate factor, the examples of
a step, when the head is refitted, and which config sections a resumed checkpoint must match.

Pure functions of (config, step) are what make resume exact and let N workers agree on every batch
without talking to each other: each rank takes its slice of ``batch_indices(step, ...)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from polar_vbll.config import RunConfig, TrainConfig
from polar_vbll.errors import CheckpointError


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine decay to 0 (or constant)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def effective_batch_size(batch_size: int, n: int, multiple: int = 1) -> int:
    """The batch a step takes: ``train.batch_size``, but never more than the training split (a larger one
    would repeat every example many times in one step, and its memory with it), rounded down to a multiple
    of ``multiple`` (workers x gradient accumulation), and at least ``multiple``."""
    if batch_size <= n:
        return batch_size
    return max(multiple, (n // multiple) * multiple)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of step ``step``: consecutive slices of per-epoch seeded permutations, so that the
    order depends only on (seed, step) and a resumed run sees the same batches."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def head_refit_due(step: int, refits: int, refitted: bool, tcfg: TrainConfig) -> bool:
    """Per-round schedule: refit the head at steps 0, T, 2T, ... unless this round's refit is done
    (``refits`` counts refits so far, so a resumed run neither skips nor repeats one). Per-step schedule:
    one full refit before the first step (then one head step per minibatch)."""
    if not refitted:
        return False
    if tcfg.alternation == "per_step":
        return step == 0 and refits == 0
    return step % tcfg.round_steps == 0 and refits <= step // tcfg.round_steps


def final_refit_due(refits: int, refitted: bool, tcfg: TrainConfig) -> bool:
    """One last refit on the final adapters, after the round refits at 0, T, 2T, ... below ``steps``."""
    return (
        tcfg.final_head_refit
        and refitted
        and tcfg.alternation == "per_round"
        and refits == math.ceil(tcfg.steps / tcfg.round_steps)
    )


def check_resumable(saved: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse to resume a checkpoint written with other training settings
    (:func:`polar_vbll.provenance.training_settings`: backbone, training data, method, adapter, optimizer,
    schedule, head fit), naming the differing keys (saved -> now) and how to start fresh. Evaluation
    settings, batching and checkpointing may change between runs."""
    from pydantic import ValidationError

    from polar_vbll.provenance import differences, training_settings

    try:
        old = training_settings(RunConfig.model_validate(saved))
    except ValidationError:
        raise CheckpointError(
            "the checkpoint was written by an older polar-vbll (its config does not validate now); start "
            "fresh: --no-resume (its checkpoints are replaced) or another name or output_dir"
        ) from None
    new = training_settings(cfg)
    if old != new:
        from polar_vbll.methods import ADAPTERS

        names = {**{k.section: f"{k.label} adapter" for k in ADAPTERS.values()}, "method": "method",
                 "optim": "optimizer", "train": "schedule", "head": "head", "model": "backbone",
                 "data": "training data"}  # fmt: skip
        changed = sorted({names[k.split(".")[0]] for k in set(old) | set(new) if old.get(k) != new.get(k)})
        raise CheckpointError(
            f"the checkpoint was written with other training settings ({', '.join(changed)}): "
            f"{differences(old, new)}. Resume with those settings, or start fresh: --no-resume (its "
            "checkpoints are replaced) or another name or output_dir"
        )
