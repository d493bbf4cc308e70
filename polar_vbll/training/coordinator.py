"""The head coordinator: the eta-phase of the alternating optimization, behind one small interface.

It receives features and labels (computed by whoever holds the backbone), fits the head's parameters on
them with the adapters fixed, and returns the new head parameters. In one process it is
:class:`LocalCoordinator`; the distributed driver runs the very same :class:`HeadCoordinator` inside a Ray
actor (``distributed.head_actor``), so the eta-phase math exists once. Its state (the head and its
optimizer moments) is part of every checkpoint. A refit whose loss or posterior goes non-finite raises
:class:`~polar_vbll.errors.HeadFitDiverged` naming the refit and the settings to lower.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polar_vbll.errors import HeadFitDiverged

if TYPE_CHECKING:
    from polar_vbll.config import HeadFitConfig


class HeadCoordinator:
    """Owns a copy of the head (the trainer's is loaded with the result of every refit) and the head
    optimizer; :meth:`refit` runs the eta-phase.

    ``refit(features, labels, n_choices, steps)`` takes full-batch Adam steps on the head's loss (for the
    VBLL head, the negative ELBO with its KL weighted 1/N) with the features fixed: in the per-round
    schedule the features are the whole training set's, in the per-step schedule one minibatch's.
    """

    def __init__(self, head: nn.Module, cfg: HeadFitConfig):
        self.head = head
        self.cfg = cfg
        params = [p for p in head.parameters() if p.requires_grad]
        # no weight decay: it would fight the head's prior, which the ELBO already contains
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas)) if params else None
        self.refits = 0

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    def refit(
        self, features: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor, steps: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Fit the head on fixed features; returns the new head parameters (a state dict)."""
        if self.optimizer is None:
            return self.head_state()
        features = features.detach().to(torch.float32)
        steps = self.cfg.steps if steps is None else steps
        batch = self.cfg.batch_size
        g = torch.Generator().manual_seed(self.cfg.seed + self.refits)
        for step in range(steps):
            if batch and batch < len(features):
                idx = torch.randperm(len(features), generator=g)[:batch]
                f, y, c = features[idx], labels[idx], n_choices[idx]
            else:
                f, y, c = features, labels, n_choices
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.head.loss(f, y, c)
            if not torch.isfinite(loss):
                vbll = getattr(self.head, "config", None)
                more = (
                    f" or raise head.vbll.noise_init (now {vbll.noise_init:g}) / head.vbll.init_cov_scale (now "
                    f"{vbll.init_cov_scale:g})"
                    if vbll is not None
                    else ""
                )
                raise HeadFitDiverged(
                    f"the eta-phase (head refit {self.refits}) diverged: the head loss became {loss.item()} "
                    f"at Adam step {step} of {steps}; lower head.fit.lr (now {self.cfg.lr:g}){more}. The last "
                    "good checkpoint is intact"
                )
            loss.backward()
            self.optimizer.step()
        self.refits += 1
        check = getattr(self.head, "check_positive_definite", None)
        if check is not None:
            check(self.refits)
        return self.head_state()

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "head": self.head_state(),
            # a copy: torch's state_dict aliases the live moment tensors, and an in-memory hand-over (to a
            # resumed coordinator, an actor) must not let two optimizers step the same tensors
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "refits": self.refits,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.head.load_state_dict(sd["head"])
        if self.optimizer is not None and sd.get("optimizer") is not None:
            self.optimizer.load_state_dict(sd["optimizer"])
        self.refits = int(sd["refits"])


class LocalCoordinator:
    """The :class:`~polar_vbll.protocols.Coordinator` of a one-process run: a :class:`HeadCoordinator` on
    its own copy of the head, exactly as the distributed coordinator actor holds one, so the trainer
    treats both alike (features in; the new head state and the refit count out)."""

    def __init__(self, head: nn.Module, cfg: HeadFitConfig, state: dict[str, Any] | None = None) -> None:
        self.inner = HeadCoordinator(copy.deepcopy(head), cfg)
        if state is not None:
            self.inner.load_state_dict(state)

    @property
    def refits(self) -> int:
        return self.inner.refits

    def refit(
        self,
        key: int,
        features: torch.Tensor,
        labels: torch.Tensor,
        n_choices: torch.Tensor,
        steps: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Refit on all rows (one process holds them all; ``key`` only matters across ranks)."""
        return self.inner.refit(features, labels, n_choices, steps), self.inner.refits

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.inner.load_state_dict(sd)
