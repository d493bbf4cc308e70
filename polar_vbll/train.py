"""The single-process reference training loop for PoLAR adapters under a given head.

One optimizer step: features of a minibatch -> head loss -> backward -> a Stiefel step on every U, V
(batched by shape) and an AdamW step on every Theta. The batch order and learning rate are pure functions
of the step number, and checkpoints carry every optimizer moment and RNG state, so a resumed run continues
bit-for-bit where an uninterrupted one would be.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from polar_vbll.baselines.lora import adapter_dropout
from polar_vbll.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from polar_vbll.config import OptimConfig, RunConfig, TrainConfig
from polar_vbll.coordinator import HeadCoordinator
from polar_vbll.errors import CheckpointError
from polar_vbll.features import EncodedSplit, FeatureSource, split_features
from polar_vbll.optim import StiefelOptimizer


class TrainingDiverged(RuntimeError):
    """The loss or a parameter group became non-finite; the last good checkpoint is left intact."""


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine decay to 0 (or constant)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


#: config sections that must match for a checkpoint to be resumed (the rest, e.g. steps, may change)
RESUME_SECTIONS = ("model", "adapter_kind", "adapter", "lora", "head", "data")


def check_resumable(saved: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse to resume a checkpoint written with a different model, adapter, head or data config."""
    current = cfg.model_dump(mode="json")
    for section in RESUME_SECTIONS:
        if saved.get(section) != current[section]:
            raise CheckpointError(
                f"the checkpoint was written with a different `{section}` config; resume with the same "
                "config or start a new run (different name or output_dir)"
            )


def head_refit_due(step: int, refits: int, trainable: bool, tcfg: TrainConfig) -> bool:
    """Per-round schedule: refit the head at steps 0, T, 2T, ... unless this round's refit is done
    (``refits`` counts refits so far, so a resumed run neither skips nor repeats one)."""
    return (
        trainable
        and tcfg.alternation == "per_round"
        and step % tcfg.round_steps == 0
        and refits <= step // tcfg.round_steps
    )


def final_refit_due(refits: int, trainable: bool, tcfg: TrainConfig) -> bool:
    """One last refit on the final adapters, after the round refits at 0, T, 2T, ... below ``steps``."""
    return (
        tcfg.final_head_refit
        and trainable
        and tcfg.alternation == "per_round"
        and refits == math.ceil(tcfg.steps / tcfg.round_steps)
    )


def build_optimizers(polar, cfg: OptimConfig) -> tuple[StiefelOptimizer | None, torch.optim.AdamW]:
    """A Stiefel optimizer for U, V (None for adapters without Stiefel factors, e.g. LoRA) and AdamW for
    the Euclidean adapter parameters (Theta, or LoRA's A and B)."""
    factors = list(polar.stiefel_parameters())
    stiefel = None
    if factors:
        stiefel = StiefelOptimizer(
            factors,
            lr=cfg.lr_stiefel,
            method=cfg.method,
            retraction=cfg.retraction,
            betas=cfg.betas,
            eps=cfg.eps,
            landing_lambda=cfg.landing_lambda,
            second_moment=cfg.second_moment,
        )
    theta = torch.optim.AdamW(
        list(polar.theta_parameters()),
        lr=cfg.lr_theta,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.theta_weight_decay,
    )
    return stiefel, theta


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Trains the adapters of ``polar`` (a ``PolarModel``, or any adapter with the same interface) and,
    when the head is trainable, the head, by alternating optimization.

    - theta-phase: one optimizer step of the adapters on a minibatch, the head fixed;
    - eta-phase: the head refitted by the :class:`HeadCoordinator` with the adapters fixed, either on the
      same minibatch's features after every theta step (``train.alternation: per_step``), or on the whole
      training set's features, computed once without gradients, at the start of every round of
      ``train.round_steps`` theta steps (``per_round``).

    ``on_log`` receives ``(step, metrics)`` for every logged step; it is where a tracker attaches.
    """

    def __init__(
        self,
        cfg: RunConfig,
        polar,
        head,
        source: FeatureSource,
        train: EncodedSplit,
        run_dir: str | Path,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True,
        coordinator: HeadCoordinator | None = None,
    ):
        self.cfg = cfg
        self.tcfg: TrainConfig = cfg.train
        self.polar = polar
        self.head = head
        self.source = source
        self.train_split = train
        self.run_dir = Path(run_dir)
        self.on_log = on_log
        self.progress = progress
        self.stiefel_opt, self.theta_opt = build_optimizers(polar, cfg.optim)
        self.coordinator = coordinator or HeadCoordinator(head, cfg.head.fit)
        self.state = TrainState()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "history": self.state.history,
            "adapter": self.polar.adapter_state_dict(),
            "coordinator": self.coordinator.state_dict(),
            "stiefel_opt": self.stiefel_opt.state_dict() if self.stiefel_opt is not None else None,
            "theta_opt": self.theta_opt.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        check_resumable(sd.get("config", {}), self.cfg)
        self.polar.load_adapter_state_dict(sd["adapter"])
        self.coordinator.load_state_dict(sd["coordinator"])
        if self.stiefel_opt is not None:
            self.stiefel_opt.load_state_dict(sd["stiefel_opt"])
        self.theta_opt.load_state_dict(sd["theta_opt"])
        set_rng_state(sd["rng"])
        self.state = TrainState(step=int(sd["step"]), history=list(sd["history"]))

    def save(self) -> Path:
        path = save_checkpoint(self.run_dir / f"checkpoint-{self.state.step}", self.state_dict())
        prune_checkpoints(self.run_dir, self.tcfg.keep_checkpoints)
        return path

    def resume_latest(self) -> bool:
        """Load the newest complete checkpoint of this run directory, if there is one."""
        found = list_checkpoints(self.run_dir)
        if not found:
            return False
        self.load_state_dict(load_checkpoint(found[-1]))
        return True

    # ---------------------------------------------------------------- one step
    def _adapter_optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.stiefel_opt, self.theta_opt) if o is not None]

    def _set_lr(self, step: int) -> float:
        f = lr_factor(step, self.tcfg.steps, self.cfg.optim.warmup_ratio, self.cfg.optim.schedule)
        if self.stiefel_opt is not None:
            for g in self.stiefel_opt.param_groups:
                g["lr"] = self.cfg.optim.lr_stiefel * f
        for g in self.theta_opt.param_groups:
            g["lr"] = self.cfg.optim.lr_theta * f
        return f

    def _check_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss):
            return
        groups = (
            ("stiefel factors (U, V)", list(self.polar.stiefel_parameters())),
            ("adapter core (theta)", list(self.polar.theta_parameters())),
            ("head", list(self.head.parameters())),
        )
        bad = [name for name, params in groups if any(not torch.isfinite(p).all() for p in params)]
        where = ", ".join(bad) if bad else "the features or the loss (every parameter group is finite)"
        raise TrainingDiverged(
            f"loss became {loss.item()} at step {self.state.step}; non-finite: {where}. The last good "
            f"checkpoint in {self.run_dir} is intact."
        )

    def training_features(self) -> torch.Tensor:
        """Features of the whole training split with the adapters as they are (for the eta-phase)."""
        return split_features(self.source, self.train_split, self.tcfg.eval_batch_size)[0]

    def refit_head(self) -> None:
        """The eta-phase of the per-round schedule, on the whole training set."""
        split = self.train_split
        self.coordinator.refit(self.training_features(), split.labels, split.n_choices)  # dropout off

    def train_step(self) -> dict[str, float]:
        step = self.state.step
        if head_refit_due(step, self.coordinator.refits, self.coordinator.trainable, self.tcfg):
            self.refit_head()
        lr_f = self._set_lr(step)
        idx = batch_indices(step, len(self.train_split), self.tcfg.batch_size, self.tcfg.seed)
        labels, n_choices = self.train_split.labels[idx], self.train_split.n_choices[idx]
        with adapter_dropout(self.source.model, True):  # adapter dropout (if configured) while training
            phi = self.source.features(self.train_split, idx)
        loss = self.head.loss(phi, labels.to(phi.device), n_choices.to(phi.device))
        for opt in self._adapter_optimizers():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self._check_finite(loss)
        if self.cfg.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.polar.theta_parameters()), self.cfg.optim.max_grad_norm)
        for opt in self._adapter_optimizers():
            opt.step()
        for p in self.head.parameters():  # the theta-phase never moves the head
            p.grad = None
        if self.coordinator.trainable and self.tcfg.alternation == "per_step":
            self.coordinator.refit(phi.detach(), labels, n_choices, steps=1)
        self.state.step += 1
        return {"loss": float(loss.detach()), "lr_factor": lr_f}

    # ---------------------------------------------------------------- the loop
    def fit(self, validate: Callable[[], dict[str, float]] | None = None) -> TrainState:
        """Train until ``train.steps``, checkpointing on schedule and at the end."""
        self.source.prepare(self.train_split, self.tcfg.eval_batch_size, progress=self.progress)
        total = self.tcfg.steps
        bar = tqdm(total=total, initial=self.state.step, desc="training", disable=not self.progress)
        t0 = time.perf_counter()
        log_every = max(1, total // 20)
        while self.state.step < total:
            logs = self.train_step()
            step = self.state.step
            due_val = validate is not None and self.tcfg.eval_every > 0 and step % self.tcfg.eval_every == 0
            if step % log_every == 0 or step == total or due_val:
                logs["orthogonality_error"] = float(self.polar.orthogonality_error())
                logs["seconds"] = time.perf_counter() - t0
                if due_val:
                    logs.update({f"val_{k}": v for k, v in validate().items()})
                self.state.history.append({"step": step, **logs})
                if self.on_log is not None:
                    self.on_log(step, logs)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            bar.update(1)
            if self.tcfg.checkpoint_every and step % self.tcfg.checkpoint_every == 0 and step < total:
                self.save()
        bar.close()
        if final_refit_due(self.coordinator.refits, self.coordinator.trainable, self.tcfg):
            self.refit_head()  # the head matches the final adapters
        self.save()
        return self.state
