"""The one training loop: alternating optimization of the adapters and the head, over any backend.

One optimizer step (:meth:`Trainer.train_step`), the same in one process and on N Ray Train workers:

1. at the start of a round (``train.alternation: per_round``), the eta-phase: every rank sends the
   features of its shard of the training split to the head coordinator, which refits the head and
   returns it (:meth:`Trainer.refit_head`);
2. the theta-phase: this rank's share of the step's global batch (``Backend.step_batches``: one process's
   ``batch_indices``, a pure function of the step) through the backend with adapter dropout on, the
   head's loss, backward; the loss averaged over ranks and checked finite before anything moves; the
   Stiefel gradients averaged over ranks in one flat all-reduce and the same Riemannian (or landing) step
   taken on every rank; then the backend's Euclidean step (Theta, or LoRA's A and B: a local AdamW, or the
   DeepSpeed engine);
3. with ``per_step`` alternation, one head step on the same minibatch's features.

A head the theta-phase trains (``HeadKind.training == "theta"``: the MLE/MAP ``linear`` head) is not
refitted: its gradient comes from the same backward pass, is averaged over ranks with the Stiefel
gradients' all-reduce, and a plain Adam (``head.linear.lr``, the adapters' schedule) steps it on every
rank. Before the first step its feature statistics are set from the training split's features at init, so
it starts exactly at the zero-shot model.

:meth:`Trainer.fit` runs steps to ``train.steps`` with logging (loss, learning rate, orthogonality error,
stable rank), mid-training validation (``train.eval_every``), replica checks (workers), checkpoints
(``train.checkpoint_every``, through the backend's checkpoint store) and step hooks, then the final head
refit. The backend (``polar_vbll.protocols.Backend``) is the only thing that differs between one process
and N workers (the shape of litgpt's ``fit`` over a Fabric); nothing here knows which it runs on.

Resume is exact: the batch order and learning rate are pure functions of the step, and a checkpoint holds
every optimizer moment, the coordinator's state and every rank's RNG state. A run resumes on another number
of workers, or in one process, under the rule of :func:`restore_rng` (docs/distributed.md).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from polar_vbll.adapters.dropout import adapter_dropout
from polar_vbll.checkpoint import rng_state, set_rng_state
from polar_vbll.config import RunConfig
from polar_vbll.errors import CheckpointError, TrainingDiverged
from polar_vbll.features import EncodedSplit
from polar_vbll.heads.checks import check_labels, inputs_checked
from polar_vbll.methods import METHODS
from polar_vbll.placement import to_device
from polar_vbll.predictives import predict
from polar_vbll.protocols import AdapterModel, Backend, CheckpointStore, Coordinator, StepHook
from polar_vbll.training.optimizers import build_stiefel_optimizer
from polar_vbll.training.schedule import (
    check_resumable,
    effective_batch_size,
    final_refit_due,
    head_refit_due,
    lr_factor,
)
from polar_vbll.training.warm_start import check_warm_start, with_settings


def check_same_data(state: dict[str, Any], train: EncodedSplit) -> None:
    """A checkpoint resumes only on the training split it was trained on (its fingerprint: the token ids,
    labels and choice counts), so an edited data file, another tokenizer or prompt template is refused."""
    saved = state.get("train_split")
    if saved is not None and saved != train.fingerprint():
        raise CheckpointError(
            "the training data changed since the checkpoint was written (a data file's rows, the tokenizer or "
            "the prompt template); start fresh: --no-resume (its checkpoints are replaced) or another name"
        )


def load_weights(adapter: AdapterModel, head, state: dict[str, Any], cfg: RunConfig, warm: bool = False) -> None:
    """The first half of a resume: the adapter's and the head's weights from a checkpoint ``state``.

    Done before a backend is built around the model (DeepSpeed keeps fp32 master copies of the weights it
    owns from ``initialize`` on, so weights loaded later would be silently overwritten by the next step);
    :meth:`Trainer.restore` does the rest (optimizer moments, RNG states, the step). ``warm``: a warm start
    (:mod:`polar_vbll.training.warm_start`: the hyperparameters may differ from the checkpoint's)."""
    if warm:
        check_warm_start(state.get("config", {}), cfg)
    else:
        check_resumable(state.get("config", {}), cfg)
    adapter.load_adapter_state_dict(state["adapter"], where="the checkpoint")
    head.load_state_dict(state["head"] if state.get("head") is not None else state["coordinator"]["head"])


def resumed_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of a rank the checkpoint holds no RNG state for (it was written by fewer ranks):
    distinct per rank and per resume step, and never a fresh run's ``seed + rank``."""
    return seed + rank + 1_000_003 * step


def restore_rng(state: dict[str, Any], rank: int, seed: int) -> None:
    """The RNG rule of a resume (docs/distributed.md, "Resuming on another number of workers"): rank ``r``
    continues rank ``r``'s streams from the checkpoint (Python, numpy, torch; CUDA where as many devices are
    visible) when the checkpoint has a rank ``r``; a rank beyond the checkpoint's world size seeds torch
    with :func:`resumed_seed`; the checkpoint's ranks beyond this world size are dropped. What draws from
    these streams in training: adapter dropout and BLoB's weight noise (the head's fit has its own
    generator)."""
    rngs = state.get("rng_per_rank") or [state["rng"]]
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    else:
        torch.manual_seed(resumed_seed(seed, rank, int(state["step"])))


@dataclass
class TrainState:
    """Where training stands: the step, the logged history, the eta-phase reports, the step a resume
    started from, and the zero-shot probabilities on the evaluation split (computed at step 0 and kept in
    checkpoints, with the fingerprint of the split they were computed on)."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    head_fits: list[dict[str, Any]] = field(default_factory=list)  # one report per full eta-phase
    resumed_from: int | None = None
    warm_starts: list[dict[str, Any]] = field(default_factory=list)  # {"step", "changed": {key: [then, now]}}
    zero_shot: torch.Tensor | None = None
    zero_shot_split: str | None = None  # fingerprint of the evaluation split those probabilities are for


class Trainer:
    """Trains ``adapter`` (and, when the method's head is refitted, the head) by alternating optimization
    on ``splits["train"]``; see the module docstring.

    ``backend``: where the math runs (``LocalBackend`` or ``DeepSpeedBackend``). ``coordinator``: the
    eta-phase (built around the head, from the resumed state if any). ``store``: where checkpoints go.
    ``tracker``: an object with ``log_metrics(metrics, step)`` (MLflow's ``RunLogger``; rank 0 only).
    ``hooks``: called as ``hook(trainer, step)`` on every rank after each completed step.
    """

    def __init__(
        self,
        cfg: RunConfig,
        adapter: AdapterModel,
        head,
        splits: dict[str, EncodedSplit],
        backend: Backend,
        coordinator: Coordinator,
        store: CheckpointStore,
        *,
        tracker=None,
        hooks: Sequence[StepHook] = (),
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.train
        self.method = METHODS[cfg.method]
        self.adapter = adapter
        self.head = head
        self.splits = splits
        self.train_split = splits["train"]
        self.backend = backend
        self.coordinator = coordinator
        self.store = store
        self.tracker = tracker
        self.hooks = list(hooks)
        self.progress = progress and backend.rank == 0
        self.refitted = self.method.head_kind.refitted
        self.joint = self.method.head_kind.training == "theta" and self.method.trains
        self.stiefel_opt = build_stiefel_optimizer(adapter, cfg.optim)
        # only a jointly trained head moves in the theta-phase; a refitted one is the coordinator's to fit
        self.head.requires_grad_(self.joint)
        self.head_params = [p for p in self.head.parameters() if p.requires_grad]
        self.head_opt = (
            torch.optim.Adam(self.head_params, lr=cfg.head.linear.lr, betas=tuple(cfg.optim.betas))
            if self.head_params
            else None
        )
        self.refits = coordinator.refits
        self.state = TrainState()
        multiple = backend.world * getattr(backend, "grad_accum", 1)
        self.batch_size = effective_batch_size(self.tcfg.batch_size, len(self.train_split), multiple)
        if self.batch_size != self.tcfg.batch_size and backend.rank == 0:
            print(f"note: train.batch_size={self.tcfg.batch_size} is larger than the training split "
                  f"({len(self.train_split)} examples); each step takes {self.batch_size}", flush=True)  # fmt: skip
        # the losses of steps taken without a host sync, checked at the next sync point
        self._pending: list[tuple[int, torch.Tensor]] = []
        check_labels(self.train_split, getattr(head, "num_classes", None))

    @classmethod
    def local(
        cls,
        cfg: RunConfig,
        adapter: AdapterModel,
        head,
        splits: dict[str, EncodedSplit] | EncodedSplit,
        run_dir,
        source=None,
        progress: bool = True,
        **kwargs,
    ) -> Trainer:
        """A one-process trainer (``LocalBackend``, ``LocalCoordinator``, checkpoints in ``run_dir``):
        the short way to train in a notebook. ``splits``: a dict with ``train`` (and ``validation`` for
        ``train.eval_every``), or the training split alone; ``source``: a ``FeatureSource`` (by default
        one over ``adapter.base_model`` with the config's cached-prefix setting, pad id 0)."""
        from polar_vbll.features import FeatureSource
        from polar_vbll.training.coordinator import LocalCoordinator
        from polar_vbll.training.local import LocalBackend, LocalCheckpoints

        if isinstance(splits, EncodedSplit):
            splits = {"train": splits}
        source = source or FeatureSource.for_config(adapter.base_model, 0, cfg.train)
        backend = LocalBackend(source, adapter.theta_parameters(), cfg.optim)
        coordinator = LocalCoordinator(head, cfg.head.fit)
        store = LocalCheckpoints(run_dir, cfg.train.keep_checkpoints)
        return cls(cfg, adapter, head, splits, backend, coordinator, store, progress=progress, **kwargs)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint: adapter, coordinator (head + its optimizer), both adapter optimizers, every
        rank's RNG state, the step, history and config. A collective; the writing rank (0) gets the
        dict, the others None."""
        with self.backend.gathered(self.adapter.theta_parameters()):
            adapter = self.adapter.adapter_state_dict()
        theta_opt = self.backend.theta_state_dict()
        rngs = self.backend.all_gather_object(rng_state())
        if self.backend.rank != 0:
            return None
        return {
            "step": self.state.step,
            "batch_size": self.batch_size,  # examples per step, as this layout cut train.batch_size
            "history": self.state.history,
            "head_fits": self.state.head_fits,
            "warm_starts": self.state.warm_starts,
            "adapter": adapter,
            "head": {k: v.detach().clone() for k, v in self.head.state_dict().items()},
            "head_opt": copy.deepcopy(self.head_opt.state_dict()) if self.head_opt is not None else None,
            "coordinator": self.coordinator.state_dict(),
            "stiefel_opt": self.stiefel_opt.state_dict() if self.stiefel_opt is not None else None,
            "theta_opt": theta_opt,
            "rng": copy.deepcopy(rngs[0]),  # its own tensors (safetensors refuses shared storage)
            "rng_per_rank": rngs,
            "zero_shot": self.state.zero_shot,
            "zero_shot_split": self.state.zero_shot_split,
            "train_split": self.train_split.fingerprint(),
            "config": self.cfg.model_dump(mode="json"),
            "backend": getattr(self.backend, "describe", lambda: {"world_size": 1})(),
        }

    def restore(self, state: dict[str, Any], warm: bool = False) -> None:
        """The second half of a resume (after :func:`load_weights` and a coordinator built from
        ``state["coordinator"]``): optimizer moments, RNG state, step and history. ``warm``: a warm start
        (:mod:`polar_vbll.training.warm_start`): the moments are kept, each optimizer's settings are the
        current config's, and the changed settings are added to :attr:`TrainState.warm_starts`."""
        changed = None
        if warm:
            changed = check_warm_start(state.get("config", {}), self.cfg)
        else:
            check_resumable(state.get("config", {}), self.cfg)
        check_same_data(state, self.train_split)
        self._check_same_batch(state)

        def moments(saved: dict[str, Any], optimizer_state: dict[str, Any]) -> dict[str, Any]:
            return with_settings(saved, optimizer_state) if warm else saved

        if self.stiefel_opt is not None:
            self.stiefel_opt.load_state_dict(moments(state["stiefel_opt"], self.stiefel_opt.state_dict()))
        if self.head_opt is not None and state.get("head_opt") is not None:
            self.head_opt.load_state_dict(moments(state["head_opt"], self.head_opt.state_dict()))
        theta = state["theta_opt"]
        self.backend.load_theta_state_dict(moments(theta, self.backend.theta_state_dict()) if warm else theta)
        restore_rng(state, self.backend.rank, self.tcfg.seed)
        self.refits = self.coordinator.refits
        self.state = TrainState(
            step=int(state["step"]),
            history=list(state["history"]),
            head_fits=list(state.get("head_fits", [])),
            resumed_from=int(state["step"]),
            warm_starts=[*state.get("warm_starts", []), *([{"step": int(state["step"]), "changed": changed}] * warm)],
            zero_shot=state.get("zero_shot"),
            zero_shot_split=state.get("zero_shot_split"),
        )

    def _check_same_batch(self, state: dict[str, Any]) -> None:
        """The global batch a step takes must be the checkpoint's: it differs only where ``train.batch_size``
        exceeds the training split and is cut to a multiple of workers x gradient accumulation
        (``effective_batch_size``), which another number of workers can change."""
        saved = state.get("batch_size")
        if saved is None or int(saved) == self.batch_size:
            return
        multiple = self.backend.world * getattr(self.backend, "grad_accum", 1)
        raise CheckpointError(
            f"the checkpoint's steps took {saved} examples each, this run's would take {self.batch_size} "
            f"(train.batch_size={self.tcfg.batch_size} exceeds the {len(self.train_split)} training examples "
            f"and is cut to a multiple of workers x grad_accum = {multiple}); resume with the checkpoint's "
            "number of workers, or start fresh: --no-resume or another name"
        )

    def resume_latest(self) -> bool:
        """One process: load the newest intact checkpoint of the store, if there is one (on workers the
        weights must be loaded before the backend is built; ``distributed.worker`` does that)."""
        state = self.store.latest()
        if state is None:
            return False
        self.resume(state)
        return True

    def resume(self, state: dict[str, Any], warm: bool = False) -> None:
        """One process: resume from a checkpoint ``state`` (weights, coordinator, optimizers, RNG, step);
        ``warm``: a warm start with this config's hyperparameters (:mod:`polar_vbll.training.warm_start`)."""
        load_weights(self.adapter, self.head, state, self.cfg, warm=warm)
        self.coordinator.load_state_dict(state["coordinator"], keep_settings=warm)  # type: ignore[attr-defined]
        self.restore(state, warm=warm)

    def save(self, metrics: dict[str, Any] | None = None) -> None:
        """A checkpoint through the store (a collective: every rank assembles, rank 0 writes)."""
        state = self.state_dict()
        self.store.save(self.state.step, state, {"step": self.state.step, **(metrics or {})})

    # --------------------------------------------------------------------------------------- eta-phase
    def training_features(self) -> torch.Tensor:
        """Features of this rank's shard of the training split with the adapters as they are, no grad."""
        return self.backend.shard_features(self.train_split, self.tcfg.eval_batch_size)

    def refit_head(self) -> None:
        """The per-round eta-phase: this rank's shard of the training features to the coordinator."""
        start, stop = self.backend.shard(len(self.train_split))
        split = self.train_split
        phi = self.training_features()
        self._refit(phi, split.labels[start:stop], split.n_choices[start:stop], steps=None)

    def _refit(self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor, steps: int | None):
        head_state, self.refits = self.coordinator.refit(self.refits, phi.detach().cpu(), labels.cpu(),
                                                         n_choices.cpu(), steps)  # fmt: skip
        self.head.load_state_dict(head_state)
        report = self.coordinator.last_report
        if steps is None and report is not None:  # a full eta-phase: iterations, gradient norm, loss parts
            entry = {"step": self.state.step, "refit": self.refits, **report}
            self.state.head_fits.append(entry)
            self._log({f"eta_{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))},
                      self.state.step)  # fmt: skip

    def init_joint_head(self) -> None:
        """Before the first step of a jointly trained head: its feature statistics from the training
        split's features at init (every rank computes the same, from the gathered rows), re-expressing its
        weights so it starts at the zero-shot model. Skipped on resume (the statistics are in the head)."""
        fmap = getattr(self.head, "feature_map", None)
        if not self.joint or fmap is None or bool(fmap.fitted):
            return
        phi = self.backend.split_features(self.train_split, self.tcfg.eval_batch_size)
        self.head.fit_features(phi)

    # ------------------------------------------------------------------------------------- theta-phase
    def _set_lr(self, step: int) -> float:
        o = self.cfg.optim
        f = lr_factor(step, self.tcfg.steps, o.warmup_ratio, o.schedule)
        if self.stiefel_opt is not None:
            for g in self.stiefel_opt.param_groups:
                g["lr"] = o.lr_stiefel * f
        self.backend.set_theta_lr(o.lr_theta * f)
        if self.head_opt is not None:
            for g in self.head_opt.param_groups:
                g["lr"] = self.cfg.head.linear.lr * f
        return f

    def _check_pending(self) -> None:
        """The losses of the steps taken without a host sync since the last check, checked in one sync: a
        non-finite one stops the run, naming the step it first appeared at (the parameters have moved since,
        so no group is named; checkpoints are written only after this check, so the last one is good)."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        losses = torch.stack([loss.reshape(()) for _, loss in self._pending])
        self._pending.clear()
        finite = torch.isfinite(losses).cpu()  # the one host sync of a logging interval
        if bool(finite.all()):
            return
        bad = int((~finite).nonzero()[0, 0])
        raise TrainingDiverged(
            f"loss became {float(losses[bad])} at step {steps[bad]} (found at step {self.state.step}: on an "
            f"accelerator the loss is checked at each logging step, not after every step). Lower "
            f"optim.lr_stiefel / optim.lr_theta (now {self.cfg.optim.lr_stiefel:g} / {self.cfg.optim.lr_theta:g}) "
            "or set optim.max_grad_norm; the last good checkpoint is intact."
        )

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Before anything moves: a non-finite loss stops the run, naming the parameter groups that are
        non-finite (a collective on workers: every rank sees the same averaged loss)."""
        self._check_pending()
        if torch.isfinite(loss).all():
            return
        theta = self.adapter.theta_parameters()
        with self.backend.gathered(theta):
            groups = (
                ("stiefel factors (U, V)", self.adapter.stiefel_parameters()),
                ("adapter core (theta)", theta),
                ("head", list(self.head.parameters())),
            )
            bad = [name for name, params in groups if any(not torch.isfinite(p).all() for p in params)]
        where = ", ".join(bad) if bad else "the features or the loss (every parameter group is finite)"
        workers = f" on {self.backend.world} workers" if self.backend.world > 1 else ""
        raise TrainingDiverged(
            f"loss became {loss.item()} at step {self.state.step}{workers}; non-finite: {where}. Lower "
            f"optim.lr_stiefel / optim.lr_theta (now {self.cfg.optim.lr_stiefel:g} / "
            f"{self.cfg.optim.lr_theta:g}) or set optim.max_grad_norm; the last good checkpoint is intact."
        )

    def train_step(self, sync: bool = True) -> dict[str, float]:
        """One optimizer step (see the module docstring); returns ``{"loss", "lr_factor"}`` and, for a head
        with a prior, ``loss_data`` (the VBLL head's expected negative log-likelihood bound, or the
        cross-entropy) and ``loss_regularizer`` (``(KL - log p(sigma)) / N``, or a MAP head's penalty / N),
        taken before the step: ``loss`` is their sum (for VBLL the negative ELBO per example).

        ``sync``: check the loss finite before anything moves and return floats (a host sync). Without it
        the step never waits for the device: the values are returned as 0-dim tensors on it and the loss is
        checked at the next synced step (:meth:`fit` syncs at logging, validation and checkpoint steps, and
        every step on a backend whose ``sync_every_step`` is true: the CPU, where a sync costs nothing)."""
        step, t, split = self.state.step, self.tcfg, self.train_split
        if head_refit_due(step, self.refits, self.refitted, t):
            self.refit_head()
        lr_f = self._set_lr(step)
        micro = self.backend.step_batches(step, len(split), self.batch_size, t.seed)
        losses, phis = [], []
        for mb in micro:
            with adapter_dropout(self.backend.model, True):  # adapter dropout (if configured) while training
                phi = self.backend.features(split, mb)
            labels, n_choices = to_device(split.labels[mb], phi.device), to_device(split.n_choices[mb], phi.device)
            with inputs_checked():  # the split's labels were checked once (check_labels): no sync per step
                loss = self.head.loss(phi, labels, n_choices)
            self.backend.backward(loss)
            losses.append(loss.detach())
            phis.append(phi.detach())
        loss = self.backend.mean(torch.stack(losses).mean())
        if sync:
            self._check_finite(loss)
        else:
            self._pending.append((step, loss))
        regularizer = getattr(self.head, "regularizer", None)  # a Bayesian or MAP head: the loss's two parts
        with torch.no_grad():
            reg = regularizer().detach().clone() if regularizer is not None else None  # before anything moves
        if self.stiefel_opt is not None:
            self.backend.reduce_gradients(self.adapter.stiefel_parameters())
            self.stiefel_opt.step()
            self.stiefel_opt.zero_grad(set_to_none=True)
        self.backend.theta_step()
        posterior_step = getattr(self.adapter, "variational_step", None)  # a Bayesian adapter's own step (BLoB)
        posterior_logs = {}
        if posterior_step is not None:
            self.backend.reduce_gradients(self.adapter.posterior_parameters())
            posterior_logs = posterior_step(step, lr_f, len(split), self.batch_size)
        if self.head_opt is not None:
            self.backend.reduce_gradients(self.head_params)
            self.head_opt.step()
            self.head_opt.zero_grad(set_to_none=True)
        if self.refitted and t.alternation == "per_step":
            idx = [i for mb in micro for i in mb]
            self._refit(torch.cat(phis), split.labels[idx], split.n_choices[idx], steps=1)
        self.state.step += 1
        logs = {"loss": loss, "lr_factor": lr_f, **posterior_logs}
        if reg is not None:
            logs["loss_regularizer"] = reg  # (KL - log p(sigma)) / N, or the MAP penalty / N
            logs["loss_data"] = loss - reg
        return {k: float(v) for k, v in logs.items()} if sync else logs

    # ------------------------------------------------------------------------------------ monitoring
    def stable_rank_mean(self) -> float:
        """Mean stable rank of the adapters' updates (a collective: Theta is gathered when partitioned)."""
        with self.backend.gathered(self.adapter.theta_parameters()):
            ranks = list(self.adapter.stable_ranks().values())
        return float(sum(ranks) / len(ranks)) if ranks else float("nan")

    def validate(self) -> dict[str, float]:
        """Validation metrics of the model as it is (one pass, the training head), as ``val_*`` keys:
        what a search scheduler compares. RNG-neutral, so validating does not change what training does
        next."""
        with torch.random.fork_rng(devices=[]):
            metrics = predict(
                self.backend, self.head, self.splits["validation"], self.tcfg.eval_batch_size, progress=False
            ).metrics()
        return {f"val_{k}": float(metrics[k]) for k in ("acc", "ece", "nll", "brier")}

    def replicated_state(self) -> dict[str, torch.Tensor]:
        """What must be bitwise equal on every rank: U, V, Theta, the head, the Stiefel moments (the
        backend adds what it replicates itself, e.g. Theta's moments at ZeRO-0)."""
        with self.backend.gathered(self.adapter.theta_parameters()):
            named = dict(self.adapter.adapter_state_dict())
        named.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        if self.stiefel_opt is not None:
            for pid, s in self.stiefel_opt.state_dict()["state"].items():
                named.update({f"stiefel_opt.{pid}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
        return named

    def verify(self, where: str) -> str | None:
        """Replica check (a collective on workers; None in one process)."""
        if self.backend.world == 1:
            return None
        return self.backend.verify(self.replicated_state(), where)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)

    # ------------------------------------------------------------------------------------------- loop
    @property
    def finished(self) -> bool:
        """Whether training reached ``train.steps`` (false after :meth:`fit` paused at ``stop_at``)."""
        return not self.method.trains or self.state.step >= self.tcfg.steps

    def prepare_train_split(self) -> None:
        """The cheap path's frozen-prefix pass over the training split, when training is left to do (a no-op
        on the full path, or when the states are there already). :meth:`fit` calls it first; a caller that
        measures the pass on its own (the distributed worker's memory phases) may call it before."""
        if self.state.step < (self.tcfg.steps if self.method.trains else 0):
            self.backend.prepare(self.train_split, self.tcfg.eval_batch_size, progress=self.progress)

    def fit(self, checkpoint_at_end: bool = True, stop_at: int | None = None) -> TrainState:
        """Train to ``train.steps`` (none for a method that does not train), checkpointing on schedule;
        then the final head refit and (``checkpoint_at_end``) a checkpoint. A run that writes its final
        checkpoint together with its artifacts (``polar_vbll.runner``) passes False.

        ``stop_at``: pause at that step (below ``train.steps``) with a checkpoint and the validation metrics
        (a segment of a run: ``polar-vbll tune --scheduler pbt``); the schedule is the whole run's, so a
        resume continues it exactly. Check :meth:`finished` afterwards."""
        t = self.tcfg
        total = t.steps if self.method.trains else 0
        pause = stop_at if stop_at is not None and self.state.step < stop_at < total else None
        if self.state.step < total:
            self.prepare_train_split()
            self.init_joint_head()
        bar = tqdm(total=total, initial=min(self.state.step, total), desc="training", disable=not self.progress)
        t0 = time.perf_counter()
        log_every = max(1, total // 20)
        every_step = getattr(self.backend, "sync_every_step", True)
        while self.state.step < total:
            nxt = self.state.step + 1
            due = every_step or nxt % log_every == 0 or nxt == total or any(
                n and nxt % n == 0 for n in (t.eval_every, t.checkpoint_every))  # fmt: skip
            logs = self.train_step(sync=due or nxt == pause)
            step = self.state.step
            validating = (t.eval_every and step % t.eval_every == 0) or step == pause
            val = self.validate() if validating and step < total and "validation" in self.splits else {}
            if step % log_every == 0 or step == total or val:
                logs["orthogonality_error"] = float(self.adapter.orthogonality_error())
                logs["stable_rank_mean"] = self.stable_rank_mean()
                logs["seconds"] = time.perf_counter() - t0
                self.state.history.append({"step": step, **logs, **val})
                self._log({**logs, **val}, step)
            every = self.backend.sync_check_every
            if every and step % every == 0 and step < total:
                self.verify(f"after step {step}")
            if (t.checkpoint_every and step % t.checkpoint_every == 0 and step < total) or step == pause:
                self.save({**logs, **val})
            elif val:
                self.store.report({"step": step, **val})
            for hook in self.hooks:
                hook(self, step)
            if due:  # the bar shows the last synced values (a device value would cost a sync per step)
                parts = {"data": f"{logs['loss_data']:.3f}", "reg": f"{logs['loss_regularizer']:.3f}"} if (
                    "loss_regularizer" in logs) else {}  # fmt: skip
                bar.set_postfix(loss=f"{logs['loss']:.3f}", **parts)
            bar.update(1)
            if step == pause:
                break
        bar.close()
        self._check_pending()
        if not self.finished:
            return self.state
        if final_refit_due(self.refits, self.refitted, t) and self.method.trains:
            self.refit_head()  # the head matches the final adapters
        if checkpoint_at_end:
            self.save()
        return self.state
