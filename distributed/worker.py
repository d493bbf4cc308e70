"""What every Ray Train worker runs: the alternating PoLAR-VBLL training, data-parallel.

Per optimizer step (docs/design.md, "Distributed training"): each rank runs its slice of the global batch
(``distributed.sharding``) through the DeepSpeed engine in ``grad_accum`` micro-batches; at the accumulation
boundary the Stiefel-factor gradients are averaged across ranks with ONE flat all-reduce and every rank
applies the same :class:`~polar_vbll.optim.StiefelOptimizer` step; then ``engine.step()`` lets DeepSpeed
step the Thetas (which it owns and reduces itself). Nothing in the per-step math is rewritten here: the
batch order, the learning-rate schedule, the optimizers, the head's loss and the eta-phase all come from
``polar_vbll``.

The head is refitted by the coordinator actor (``distributed.head_actor``) on the features of every
rank's shard, on exactly the schedule of ``polar_vbll.train.Trainer``. Replicas are compared bitwise every
``sync_check_every`` steps and at the end. Checkpoints are consolidated (see ``distributed.engine``) and
written by rank 0 alone through the ``report`` callback (``ray.train.report`` under Ray).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from distributed.collectives import allreduce_mean_, bank_gradients, gather_rows, verify_replicas
from distributed.config import DistConfig, check_batch_layout
from distributed.engine import (
    build_engine,
    deepspeed_config,
    gathered,
    load_theta_optimizer_state,
    local_parameter_bytes,
    set_theta_lr,
    theta_optimizer_state,
)
from distributed.head_actor import CoordinatorClient
from distributed.sharding import lockstep_batches, shard_bounds, step_micro_batches
from distributed.tracking import RunLogger, TrackingTarget, prefixed
from polar_vbll.baselines.lora import adapter_dropout, set_adapter_dropout
from polar_vbll.checkpoint import rng_state, save_checkpoint, set_rng_state
from polar_vbll.config import RunConfig
from polar_vbll.errors import ConfigError
from polar_vbll.evaluate import Predictions
from polar_vbll.features import EncodedSplit, length_sorted_batches
from polar_vbll.metrics import ood_auroc, ood_scores
from polar_vbll.models import load_backbone
from polar_vbll.run import build_adapter, build_head, load_splits, method_label, save_trained
from polar_vbll.train import (
    TrainingDiverged,
    build_optimizers,
    check_resumable,
    final_refit_due,
    head_refit_due,
    lr_factor,
)

#: Config sections that must match for a checkpoint to be resumed (as in ``Trainer.load_state_dict``).

#: ``report(metrics, checkpoint_dir)``: called on every rank at the same points; ``checkpoint_dir`` is a
#: directory (rank 0, when a checkpoint is due) or None.
ReportFn = Callable[[dict[str, Any], Path | None], None]
#: ``hook(trainer, step)``: called on every rank after each completed step (see ``distributed.faults``).
StepHook = Callable[["DistributedTrainer", int], None]


def _memory_status() -> dict[str, int]:
    """Resident and peak resident memory of this process, in bytes (Linux /proc)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak_rss"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class DistributedTrainer:
    """One rank of a distributed run (construct it on every rank; every method is a collective)."""

    def __init__(
        self,
        cfg: RunConfig,
        dist_cfg: DistConfig,
        coordinator: CoordinatorClient,
        report: ReportFn,
        state: dict[str, Any] | None = None,
        hooks: Sequence[StepHook] = (),
        tracking: TrackingTarget | None = None,
    ) -> None:
        if cfg.adapter_kind != "polar":
            raise ConfigError(
                "distributed training supports adapter_kind: polar (the LoRA baselines run in one process)"
            )
        self.cfg, self.dist_cfg = cfg, dist_cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.coordinator, self.report_fn, self.hooks = coordinator, report, list(hooks)
        # MLflow from rank 0 only; the other ranks never open the store
        self.logger = RunLogger(tracking) if tracking is not None and self.rank == 0 else None
        micro = check_batch_layout(cfg, dist_cfg, self.world)
        t0 = time.perf_counter()

        torch.manual_seed(cfg.train.seed + self.rank)
        model, tokenizer = _load_backbone_node_by_node(cfg)
        self.polar = build_adapter(cfg, model)
        self.splits, answer_ids = load_splits(cfg, tokenizer)
        self.train_split = self.splits["train"]
        self.head = build_head(cfg, model, answer_ids, n_train=len(self.train_split))
        self.trainable_head = any(p.requires_grad for p in self.head.parameters())

        self.step, self.refits, self.history, self.resumed_from = 0, 0, [], None
        if state is not None:
            check_resumable(state.get("config", {}), cfg)
            self.polar.load_adapter_state_dict(state["adapter"], where="the distributed checkpoint")
            self.head.load_state_dict(state["coordinator"]["head"])
            self.step, self.refits = int(state["step"]), int(state["coordinator"]["refits"])
            self.history, self.resumed_from = list(state["history"]), int(state["step"])

        self.stiefel, theta_opt = build_optimizers(self.polar, cfg.optim)
        assert self.stiefel is not None, "a PoLAR adapter always has Stiefel factors"
        self.theta = list(self.polar.theta_parameters())
        ds_config = deepspeed_config(cfg, dist_cfg, micro)
        self.engine, self.source = build_engine(
            self.polar.base_model, theta_opt, ds_config, tokenizer.pad_token_id, cfg.train.cache_frozen_prefix
        )
        if state is not None:
            self.stiefel.load_state_dict(state["stiefel_opt"])
            load_theta_optimizer_state(self.engine, self.theta, state["theta_opt"])
            rngs = state.get("rng_per_rank") or [state["rng"]]
            if len(rngs) == self.world:
                set_rng_state(rngs[self.rank])
        self.memory = {**local_parameter_bytes(self.polar.base_model), **_memory_status()}

        self.coordinator.start(
            self.head if self.rank == 0 else None,
            cfg.head.fit,
            state["coordinator"] if state is not None else None,
        )
        self.head.requires_grad_(False)  # the theta-phase never moves the head; the coordinator owns it
        self.setup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ features
    def _prepare(self, enc: EncodedSplit) -> None:
        """The frozen-prefix pass of the cheap path, through the engine (a no-op on the full path)."""
        with torch.no_grad():
            self.engine(enc, None, prepare_batch_size=self.cfg.train.eval_batch_size)

    @torch.no_grad()
    def shard_features(self, enc: EncodedSplit) -> torch.Tensor:
        """``phi`` of this rank's contiguous shard of ``enc`` (adapter dropout off), ``(n_shard, d)``."""
        set_adapter_dropout(self.source.model, False)
        rows = []
        for batch in lockstep_batches(len(enc), self.rank, self.world, self.cfg.train.eval_batch_size):
            rows.append(self.engine(enc, batch.idx)[: batch.n_real].detach().cpu())
        return torch.cat(rows) if rows else torch.zeros(0)

    def predict(self, enc: EncodedSplit) -> Predictions:
        """The head's predictive probabilities for every example of ``enc`` on every rank, batched exactly
        as ``polar_vbll.evaluate.predict`` batches them (so an MC predictive draws the same samples)."""
        self._prepare(enc)
        phi = gather_rows(self.shard_features(enc))
        probs = torch.zeros((len(enc), self.head.num_classes), dtype=torch.float32)
        for idx in length_sorted_batches([len(s) for s in enc.ids], self.cfg.train.eval_batch_size):
            probs[idx] = self.head.predict_proba(phi[idx], enc.n_choices[idx]).to(torch.float32)
        return Predictions(enc.name, probs, enc.labels.clone())

    # --------------------------------------------------------------------------------------- eta-phase
    def _load_head(self, head_state: dict[str, torch.Tensor], refits: int) -> None:
        self.head.load_state_dict(head_state)
        self.refits = refits

    def refit_round(self) -> None:
        """The per-round eta-phase: every rank's shard of the training features to the coordinator."""
        enc = self.train_split
        start, stop = shard_bounds(len(enc), self.rank, self.world)
        phi = self.shard_features(enc)
        self._load_head(
            *self.coordinator.refit(self.refits, phi, enc.labels[start:stop], enc.n_choices[start:stop])
        )

    def _refit_due(self, step: int) -> bool:
        return head_refit_due(step, self.refits, self.trainable_head, self.cfg.train)

    def _final_refit_due(self) -> bool:
        return final_refit_due(self.refits, self.trainable_head, self.cfg.train)

    # ------------------------------------------------------------------------------------- theta-phase
    def _set_lr(self, step: int) -> float:
        o = self.cfg.optim
        f = lr_factor(step, self.cfg.train.steps, o.warmup_ratio, o.schedule)
        for g in self.stiefel.param_groups:
            g["lr"] = o.lr_stiefel * f
        set_theta_lr(self.engine, o.lr_theta * f)
        return f

    def _stiefel_step(self, local_loss: torch.Tensor) -> float:
        """At the accumulation boundary: the global loss (checked finite before anything moves), one flat
        all-reduce of every U/V gradient, then the same Riemannian step on every rank."""
        loss = local_loss.detach().reshape(1).to(torch.float64).clone()
        allreduce_mean_([loss])
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.step} on {self.world} workers; the last good "
                "checkpoint is intact"
            )
        params = list(self.polar.stiefel_parameters())
        allreduce_mean_(bank_gradients(params))
        self.stiefel.step()
        self.stiefel.zero_grad(set_to_none=True)
        return float(loss.item())

    def train_step(self) -> dict[str, float]:
        step, t = self.step, self.cfg.train
        if self._refit_due(step):
            self.refit_round()
        lr_f = self._set_lr(step)
        enc = self.train_split
        micro = step_micro_batches(
            step, len(enc), t.batch_size, t.seed, self.rank, self.world, self.dist_cfg.grad_accum
        )
        losses, phis, loss = [], [], float("nan")
        for mb in micro:
            with adapter_dropout(self.source.model, True):
                phi = self.engine(enc, mb)
            micro_loss = self.head.loss(phi, enc.labels[mb], enc.n_choices[mb])
            self.engine.backward(micro_loss)
            losses.append(micro_loss.detach())
            phis.append(phi.detach())
            if self.engine.is_gradient_accumulation_boundary():
                loss = self._stiefel_step(torch.stack(losses).mean())
            self.engine.step()
        if self.trainable_head and t.alternation == "per_step":
            idx = [i for mb in micro for i in mb]
            self._load_head(
                *self.coordinator.refit(self.refits, torch.cat(phis), enc.labels[idx], enc.n_choices[idx], 1)
            )
        self.step += 1
        return {"loss": loss, "lr_factor": lr_f}

    # ------------------------------------------------------------------------------- replicas, state
    def replicated_state(self) -> dict[str, torch.Tensor]:
        """Everything that must be bitwise equal on every rank: U, V, Theta, the head, the Stiefel moments
        (and Theta's moments at ZeRO-0, where each rank keeps a whole copy)."""
        with gathered(self.engine, self.theta):
            named = dict(self.polar.adapter_state_dict())
        named.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        for prefix, opt in (("stiefel_opt", self.stiefel), ("theta_opt", self.engine.optimizer)):
            if prefix == "theta_opt" and self.dist_cfg.zero_stage != 0:
                continue
            for pid, s in opt.state_dict()["state"].items():
                named.update({f"{prefix}.{pid}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
        return named

    def verify(self, where: str) -> str:
        return verify_replicas(self.replicated_state(), where)

    def checkpoint_state(self) -> dict[str, Any] | None:
        """The consolidated checkpoint (rank 0; None elsewhere), a superset of ``Trainer.state_dict()``."""
        with gathered(self.engine, self.theta):
            adapter = self.polar.adapter_state_dict()
        theta_opt = theta_optimizer_state(self.engine, self.theta)
        rngs: list[Any] = [None] * self.world
        dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return None
        return {
            "step": self.step,
            "history": self.history,
            "adapter": adapter,
            "coordinator": self.coordinator.state_dict(),
            "stiefel_opt": self.stiefel.state_dict(),
            "theta_opt": theta_opt,
            "rng": copy.deepcopy(rngs[0]),  # the single-process Trainer resumes from this one
            "rng_per_rank": rngs,
            "config": self.cfg.model_dump(mode="json"),
            "distributed": {**self.dist_cfg.model_dump(mode="json"), "world_size": self.world},
        }

    def save(self, metrics: dict[str, Any], write_artifacts: Callable[[Path], None] | None = None) -> None:
        """Checkpoint through the report callback: every rank assembles, rank 0 writes."""
        state = self.checkpoint_state()
        if self.rank != 0:
            self.report_fn(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="polar-vbll-ckpt-") as tmp:
            save_checkpoint(Path(tmp) / "state", state)  # type: ignore[arg-type]
            if write_artifacts is not None:
                write_artifacts(Path(tmp) / "artifacts")
            self.report_fn(metrics, Path(tmp))

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``, checkpointing on schedule; evaluate; save the final checkpoint with
        the adapter, head and predictions. Returns the final metrics (the same on every rank)."""
        t, total = self.cfg.train, self.cfg.train.steps
        t0 = time.perf_counter()
        self._prepare(self.train_split)
        log_every = max(1, total // 20)
        while self.step < total:
            logs = self.train_step()
            step = self.step
            if step % log_every == 0 or step == total:
                logs["orthogonality_error"] = float(self.polar.orthogonality_error())
                logs["stable_rank_mean"] = self.stable_rank_mean()
                logs["seconds"] = time.perf_counter() - t0
                self.history.append({"step": step, **logs})
                self._log_metrics(logs, step)
            every = self.dist_cfg.sync_check_every
            if every and step % every == 0 and step < total:
                self.verify(f"after step {step}")
            val = self.validate(step) if t.eval_every and step % t.eval_every == 0 and step < total else {}
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total:
                self.save({"step": step, **logs, **val})
            elif val:
                self.report_fn({"step": step, **val}, None)
            for hook in self.hooks:
                hook(self, step)
        if self._final_refit_due():
            self.refit_round()
        digest = self.verify("at the end of training")
        train_seconds = time.perf_counter() - t0
        names = ["validation", "eval"] + [n for n in self.splits if n.startswith("ood:")]
        preds = {name: self.predict(self.splits[name]) for name in names}
        metrics = {name: p.metrics() for name, p in preds.items()}
        in_scores = ood_scores(preds["eval"].probs)
        for name in names[2:]:
            auroc = ood_auroc(in_scores["msp"], ood_scores(preds[name].probs)["msp"])
            metrics[name] = {**metrics[name], "auroc_msp": auroc}
        memory: list[Any] = [None] * self.world
        dist.all_gather_object(memory, {"rank": self.rank, **self.memory})
        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, digest)
        final = {
            "step": self.step,
            "method": method_label(self.cfg),
            "loss": self.history[-1]["loss"] if self.history else float("nan"),
            "orthogonality_error": float(self.polar.orthogonality_error()),
            "refits": self.refits,
            "metrics": metrics,
            "replica_digests": digests,
            "resumed_from_step": self.resumed_from,
            "world_size": self.world,
            "zero_stage": self.dist_cfg.zero_stage,
            "memory": memory,
            "timings": {"setup_s": self.setup_seconds, "train_s": train_seconds},
            "history": self.history,
        }
        final.update(flat_final_metrics(metrics))

        def write_artifacts(directory: Path) -> None:
            save_trained(self.polar, self.head, directory)
            probs = {f"{k}_probs": p.probs.contiguous() for k, p in preds.items()}
            save_file(probs, str(directory / "predictions.safetensors"))
            (directory / "results.json").write_text(json.dumps(final, indent=2))

        with gathered(self.engine, self.theta):  # every rank gathers Theta; rank 0 writes the files
            if self.rank == 0:
                staged = Path(tempfile.mkdtemp(prefix="polar-vbll-artifacts-"))
                write_artifacts(staged)
            if self.logger is not None:
                during = self.logger.seconds  # logging inside the training loop: what a step pays
                self._log_final(final, preds, staged)
                final["timings"]["tracking_train_s"] = during
                final["timings"]["tracking_final_s"] = self.logger.seconds - during
                (staged / "results.json").write_text(json.dumps(final, indent=2))
        summary = {k: v for k, v in final.items() if k != "history"}  # Ray logs every reported metric
        self.save(summary, (lambda d: _move_tree(staged, d)) if self.rank == 0 else None)
        return final

    # ------------------------------------------------------------------------------------ monitoring
    def stable_rank_mean(self) -> float:
        """Mean stable rank of the adapters' updates (a collective: Theta is gathered at ZeRO-3)."""
        with gathered(self.engine, self.theta):
            ranks = list(self.polar.stable_ranks().values())
        return float(sum(ranks) / len(ranks)) if ranks else float("nan")

    def validate(self, step: int) -> dict[str, float]:
        """Validation metrics in the middle of training (``train.eval_every``), as ``val_*`` keys: what
        Tune's scheduler compares. RNG-neutral, so evaluating does not change what training does next."""
        with torch.random.fork_rng(devices=[]):
            metrics = self.predict(self.splits["validation"]).metrics()
        val = prefixed(metrics, "val_", ("acc", "ece", "nll", "brier"))
        self._log_metrics(val, step)
        return val

    def _log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step)

    def _log_final(self, final: dict[str, Any], preds: dict[str, Predictions], artifacts: Path) -> None:
        """Rank 0: final metrics, reliability diagrams, the adapter, the head and results.json."""
        from polar_vbll.plots import reliability_diagram

        logger = self.logger
        assert logger is not None
        logger.log_metrics({k: v for k, v in final.items() if k.startswith(FINAL_PREFIXES)}, self.step)
        logger.log_metrics({"orthogonality_error": final["orthogonality_error"]}, self.step)
        with tempfile.TemporaryDirectory(prefix="polar-vbll-plots-") as tmp:
            for name in ("validation", "eval"):
                label = "test" if name == "eval" else name
                png = reliability_diagram(
                    preds[name].accumulator(),
                    Path(tmp) / f"reliability_{label}.png",
                    title=f"{method_label(self.cfg)}: {self.cfg.data.task} {label}",
                )
                logger.log_artifact(png, "plots")
        for name in ("adapter", "adapter_peft", "head.safetensors"):
            logger.log_artifact(artifacts / name, "model")
        logger.log_artifact(artifacts / "results.json")


#: Flat keys of the final results that are logged as metrics and reported to Tune.
FINAL_PREFIXES = ("val_", "test_", "ood_")


def flat_final_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``val_nll``, ``test_ece``, ``ood_auroc_<task>``, ...: the final metrics as flat keys (Tune and
    MLflow compare scalars); ``eval`` is the run's evaluation split, called ``test`` here."""
    out: dict[str, float] = {}
    for name, m in metrics.items():
        if name.startswith("ood:"):
            task = name.removeprefix("ood:").replace(":", "_")
            out[f"ood_auroc_{task}"] = float(m["auroc_msp"])
            out[f"ood_acc_{task}"] = float(m["acc"])
        else:
            prefix = {"validation": "val_", "eval": "test_"}[name]
            out.update(prefixed(m, prefix, ("acc", "ece", "nll", "brier")))
    return out


def _load_backbone_node_by_node(cfg: RunConfig):
    """``load_backbone`` on each node's local rank 0 first, then on the others: the first load may
    convert the bundled model into the node's cache, and two processes must not build it at once."""
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    loaded = load_backbone(cfg.model) if first else None
    dist.barrier()
    return loaded if loaded is not None else load_backbone(cfg.model)


def _move_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.move(str(src), str(dst))


class RunAborted(RuntimeError):
    """A restarted worker group found an unrecoverable error recorded by the previous one."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``).

    ``config``: ``cfg`` (a ``RunConfig`` dump), ``dist`` (a ``DistConfig`` dump), ``coordinator`` (the
    head-coordinator actor handle) and optional ``hooks``. Resumes from ``ray.train.get_checkpoint()``,
    the latest checkpoint of this run name and storage path, which is what Ray Train hands a restarted
    worker group after a failure.
    """
    import ray.train

    from distributed.collectives import ReplicaDivergence
    from polar_vbll.checkpoint import load_checkpoint
    from polar_vbll.config import parse_config
    from polar_vbll.errors import UserInputError

    cfg = parse_config(config["cfg"], "the distributed run's config")
    dist_cfg = DistConfig.model_validate(config["dist"])
    ctx = ray.train.get_context()
    client = CoordinatorClient(config["coordinator"], ctx.get_world_rank(), ctx.get_world_size())
    fatal = client.fatal()
    if fatal:
        raise RunAborted(f"not retrying a run that cannot succeed: {fatal}")

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / "state")

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=ckpt)

    try:
        tracking = config.get("tracking")
        target = TrackingTarget(**tracking) if tracking else None
        trainer = DistributedTrainer(cfg, dist_cfg, client, report, state, config.get("hooks") or (), target)
        trainer.fit()
    except (ReplicaDivergence, TrainingDiverged, UserInputError) as exc:
        client.record_fatal(f"{type(exc).__name__}: {exc}")
        raise
    dist.barrier()
