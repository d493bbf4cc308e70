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
from polar_vbll.training.warm_start import with_settings

if TYPE_CHECKING:
    from polar_vbll.config import HeadFitConfig


class HeadCoordinator:
    """Owns a copy of the head (the trainer's is loaded with the result of every refit) and the head's
    Adam optimizer; :meth:`refit` runs the eta-phase.

    ``refit(features, labels, n_choices, steps)`` fits the head's loss (for the VBLL head, the negative
    ELBO with its KL weighted 1/N) with the features fixed. ``steps=None`` is a full eta-phase on the whole
    training set (the per-round schedule, and the first fit of the per-step schedule): the head's feature
    statistics are set from these features, then L-BFGS runs to convergence (``head.fit.optimizer:
    lbfgs``, with the empirical-Bayes prior updates when the head asks for them) or ``head.fit.steps`` Adam
    steps. ``steps=n`` takes n Adam steps on the given rows (the per-step schedule's minibatch).
    :attr:`last_report` describes the last full eta-phase (``polar_vbll.heads.fit.FitReport`` as a dict).
    """

    def __init__(self, head: nn.Module, cfg: HeadFitConfig):
        # the head's fits run on the CPU whatever device the backbone is on (docs/method-choices.md, "Where the
        # head fits run"): ``head`` is the coordinator's own copy, moved here once
        self.head = head.to("cpu")
        self.cfg = cfg
        params = [p for p in head.parameters() if p.requires_grad]
        # no weight decay: it would fight the head's prior, which the ELBO already contains
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas)) if params else None
        self.refits = 0
        self.last_report: dict[str, Any] | None = None

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
        if steps is None:
            fit_features = getattr(self.head, "fit_features", None)
            if fit_features is not None:
                fit_features(features)
            if getattr(getattr(self.head, "config", None), "prior_fit", None) == "evidence":
                from polar_vbll.heads.probe import evidence_prior_var

                self.head.set_prior_var(evidence_prior_var(self.head, features, labels, n_choices, self.cfg))
            if self.cfg.optimizer == "lbfgs":
                self._converge(features, labels, n_choices)
            else:
                self._adam(features, labels, n_choices, self.cfg.steps)
                self.last_report = {"adam_steps": self.cfg.steps, **self._loss_parts(features, labels, n_choices)}
        else:
            self._adam(features, labels, n_choices, steps)
        self.refits += 1
        check = getattr(self.head, "check_positive_definite", None)
        if check is not None:
            check(self.refits)
        return self.head_state()

    def _converge(self, features: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor) -> None:
        from polar_vbll.heads.fit import fit_to_convergence

        cfg = self.cfg
        vbll = getattr(self.head, "config", None)
        try:
            report = fit_to_convergence(
                self.head, features, labels, n_choices, max_iter=cfg.max_iter, tolerance=cfg.tolerance,
                empirical_bayes=getattr(vbll, "prior_fit", "fixed") == "empirical_bayes",
                prior_rounds=cfg.prior_rounds, prior_tolerance=cfg.prior_tolerance,
            )  # fmt: skip
        except HeadFitDiverged as exc:
            raise HeadFitDiverged(f"head refit {self.refits}: {exc}. The last good checkpoint is intact") from None
        self.last_report = report.as_dict()

    @torch.no_grad()
    def _loss_parts(self, features, labels, n_choices) -> dict[str, float]:
        loss = float(self.head.loss(features, labels, n_choices))
        regularizer = getattr(self.head, "regularizer", None)
        reg = float(regularizer()) if regularizer is not None else 0.0
        return {"loss": loss, "loss_data": loss - reg, "loss_regularizer": reg}

    def _adam(self, features: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor, steps: int) -> None:
        assert self.optimizer is not None
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

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_report": self.last_report,
            "head": self.head_state(),
            # a copy: torch's state_dict aliases the live moment tensors, and an in-memory hand-over (to a
            # resumed coordinator, an actor) must not let two optimizers step the same tensors
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "refits": self.refits,
        }

    def load_state_dict(self, sd: dict[str, Any], keep_settings: bool = False) -> None:
        """Load :meth:`state_dict`'s ``sd``; ``keep_settings``: keep this coordinator's optimizer settings
        (learning rate, betas: a warm start, ``polar_vbll.training.warm_start``), take only the moments."""
        self.head.load_state_dict(sd["head"])
        if self.optimizer is not None and sd.get("optimizer") is not None:
            saved = sd["optimizer"]
            if keep_settings:
                saved = with_settings(saved, self.optimizer.state_dict())
            self.optimizer.load_state_dict(saved)
        self.refits = int(sd["refits"])
        self.last_report = sd.get("last_report")


class LocalCoordinator:
    """The :class:`~polar_vbll.protocols.Coordinator` of a one-process run: a :class:`HeadCoordinator` on
    its own copy of the head, exactly as the distributed coordinator actor holds one, so the trainer
    treats both alike (features in; the new head state and the refit count out)."""

    def __init__(self, head: nn.Module, cfg: HeadFitConfig, state: dict[str, Any] | None = None) -> None:
        self.inner = HeadCoordinator(copy.deepcopy(head), cfg)  # its own copy, on the CPU
        if state is not None:
            self.inner.load_state_dict(state)

    @property
    def refits(self) -> int:
        return self.inner.refits

    @property
    def last_report(self) -> dict[str, Any] | None:
        """The last full eta-phase's report (iterations, gradient norm, loss parts, prior variance)."""
        return self.inner.last_report

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

    def load_state_dict(self, sd: dict[str, Any], keep_settings: bool = False) -> None:
        self.inner.load_state_dict(sd, keep_settings)
