"""Running a method end to end: ``polar-vbll train`` in one process, and the steps every entry point
shares after training.

:func:`run_method` is the one-process run of any method (``compare`` calls it per task, method and seed):
build the objects (``polar_vbll.session``), predict the zero-shot model on the evaluation split while the
adapters are still at init, train each member with the :class:`~polar_vbll.training.Trainer` over a
:class:`~polar_vbll.training.LocalBackend` (resuming from the run folder's latest checkpoint), then
:func:`finish_run`. :func:`finish_run` is shared with the distributed workers: the one evaluation
(``polar_vbll.evaluation``), the one ``results.json`` schema (``polar_vbll.results``), the artifacts
(:func:`write_artifacts`), the final checkpoint through the store, and the tracking of the end of the run.

The run folder (``<output_dir>/<name>``) receives ``config.yaml`` (the whole config), ``params.json``
(flattened, every **[choice]** included), checkpoints, ``adapter/`` (the adapter's own format),
``adapter_peft/`` (a standard PEFT LoRA adapter), ``head.safetensors``, ``predictions.safetensors``,
``results.json``, ``results.md`` (zero-shot vs the method), ``reliability.png`` and ``risk_coverage.png``;
an ensemble keeps each member's checkpoints, adapter and head under ``member-<i>/``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from polar_vbll.adapters.state import adapters_off
from polar_vbll.config import RunConfig, check_output_folder, check_plain_name, dump_config
from polar_vbll.decisions.selective import confidence_and_correct
from polar_vbll.errors import CheckpointError
from polar_vbll.evaluation import Evaluation, Member, evaluate
from polar_vbll.features import EncodedSplit, FeatureSource
from polar_vbll.locking import FolderLock
from polar_vbll.methods import ADAPTERS, METHODS
from polar_vbll.metrics import format_table
from polar_vbll.models import describe_model_source
from polar_vbll.placement import Placement, resolved
from polar_vbll.plots import reliability_diagrams, risk_coverage_plot
from polar_vbll.predictives import predict
from polar_vbll.protocols import AdapterModel, Backend, CheckpointStore
from polar_vbll.provenance import digest, training_settings
from polar_vbll.readout import Readout, make_readout, save_readout
from polar_vbll.results import flat_metrics, machine_info, validate_results
from polar_vbll.session import Session, build_session, validate_inputs
from polar_vbll.support import unused_note, unused_settings
from polar_vbll.tasks.registry import run_splits, task_provenance
from polar_vbll.training import (
    LocalBackend,
    LocalCheckpoints,
    LocalCoordinator,
    Trainer,
    check_resumable,
    check_same_data,
    load_weights,
)
from polar_vbll.training.optimizers import off_manifold_warning


@dataclass
class TrainedMember:
    """A trained adapter/head pair kept in memory, so that an identical training in the same comparison
    (LoRA-MLE, the Laplace head on it, the first ensemble member) is done once."""

    adapter_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    training: dict[str, Any]
    train_s: float


def training_key(cfg: RunConfig) -> str:
    """What determines a trained member (``polar_vbll.provenance.training_settings``), as a digest: two
    runs with the same key train the same model, whatever their methods' names or evaluation."""
    return digest(training_settings(cfg))


_MEMBER_SEEDS = (("train", "seed"), *((kind.section, "init_seed") for kind in ADAPTERS.values()))


def member_config(cfg: RunConfig, i: int) -> RunConfig:
    """Ensemble member ``i``: the run config with every seed shifted by ``1000 i`` (training order,
    adapter init, head init and head fit), written to ``<run folder>/member-<i>``."""
    data = cfg.model_dump(mode="json")
    for section, key in _MEMBER_SEEDS:
        data[section][key] += 1000 * i
    data["head"]["vbll"]["init_seed"] += 1000 * i
    data["head"]["fit"]["seed"] += 1000 * i
    data["name"] = f"{cfg.name}/member-{i}"
    return RunConfig.model_validate(data)


def data_provenance(cfg: RunConfig) -> dict[str, Any]:
    """What a ``datasets`` source of ``data.task`` resolved to, as ``data.resolved.*`` params (kind, path or
    hub id, config, where it was found, the snapshot revision of a cached hub dataset, the rows of each split,
    the columns read and ignored, the seeded cut); empty for built-in tasks and ``jsonl:`` files."""
    d = cfg.data
    return {f"data.resolved.{k}": v for k, v in task_provenance(d.task, d.columns, run_splits(d)).items()}


def write_run_params(cfg: RunConfig, run_dir: Path, placement: Placement | None = None) -> None:
    """``config.yaml`` (the config, ``model.dtype`` resolved) and ``params.json`` (every value flat, and
    where the run computes: ``placement.device``, ``placement.dtype``, ...; what a ``datasets`` source
    resolved to: ``data.resolved.*``, :func:`data_provenance`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    params = cfg.flat_params()
    if placement is not None:
        params.update({f"placement.{k}": v for k, v in placement.describe().items()})
    params.update({f"model_source.{k}": v for k, v in describe_model_source(cfg.model).items()})
    params["unused_settings"] = sorted(unused_settings(cfg))  # given, but not read by the method
    params.update(data_provenance(cfg))
    (run_dir / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True))


def local_backend(session: Session) -> LocalBackend:
    """The one-process backend around a session's model (cached frozen prefix when configured)."""
    cfg = session.cfg
    source = FeatureSource.for_config(session.adapter.base_model, session.tokenizer.pad_token_id, cfg.train)
    return LocalBackend(source, session.adapter.theta_parameters(), cfg.optim)


def zero_shot_probs(session: Session, backend: Backend, progress: bool) -> torch.Tensor:
    """The zero-shot model's probabilities on the evaluation split: the LM-head rows of the answer letters
    on features computed while the adapters are at init, where ``W = W0`` exactly."""
    bs = session.cfg.train.eval_batch_size
    return predict(backend, session.zero_shot_head, session.splits["eval"], bs, progress).probs


def zero_shot_for(
    session: Session, backend: Backend, state: dict[str, Any] | None, progress: bool, one_process: bool
) -> torch.Tensor | None:
    """The zero-shot probabilities for this run's evaluation split: a resumed checkpoint's when they were
    computed on the same split (its fingerprint), else computed now (adapters at init when fresh; with the
    update zeroed after a resume in one process). None where neither is possible (a resumed distributed
    run evaluated on another split: a partitioned adapter is not zeroed behind DeepSpeed's back)."""
    fingerprint = session.splits["eval"].fingerprint()
    if state is not None and state.get("zero_shot") is not None and state.get("zero_shot_split") == fingerprint:
        return state["zero_shot"]
    if state is None:
        return zero_shot_probs(session, backend, progress)
    if not one_process:
        print("note: the evaluation split changed since the checkpoint; no zero-shot row this time", flush=True)
        return None
    with adapters_off(session.adapter):
        return zero_shot_probs(session, backend, progress)


def training_summary(trainer: Trainer) -> dict[str, Any]:
    """The ``training`` block of ``results.json`` for a finished trainer (a collective on workers)."""
    history = trainer.state.history
    adapter = trainer.adapter
    with trainer.backend.gathered(adapter.theta_parameters()):
        ranks = {k: float(v) for k, v in adapter.stable_ranks().items()}
    orthogonality = float(adapter.orthogonality_error())
    warning = off_manifold_warning(trainer.cfg.optim, orthogonality, trainer.state.step)
    if warning is not None and trainer.backend.rank == 0:
        warnings.warn(warning, stacklevel=2)
    return {
        "steps": trainer.state.step,
        "batch_size": trainer.batch_size,  # examples per step: train.batch_size, clamped to the split
        "resumed_from_step": trainer.state.resumed_from,
        "refits": trainer.refits,
        "loss": history[-1]["loss"] if history else None,
        "loss_data": history[-1].get("loss_data") if history else None,
        "loss_regularizer": history[-1].get("loss_regularizer") if history else None,
        "head_fits": trainer.state.head_fits,
        "orthogonality_error": orthogonality,
        "stable_rank_mean": sum(ranks.values()) / len(ranks) if ranks else None,
        "stable_ranks": ranks,
        "history": history,
        "warm_starts": trainer.state.warm_starts,
    }


# ------------------------------------------------------------------------------------------ artifacts
def write_artifacts(
    directory: Path,
    adapter: AdapterModel,
    members: list[Member],
    results: dict[str, Any],
    evaluation: Evaluation,
    readout: Readout,
) -> None:
    """A run's files: the adapter (own format + PEFT LoRA export), the head and its ``readout.json`` (one
    each per member, under ``member-<i>/`` for an ensemble), every split's probabilities, ``results.json``,
    ``results.md`` and the reliability diagram of the evaluation split (zero-shot beside the method)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(members):
        where = directory if len(members) == 1 else directory / f"member-{i}"
        saved = None
        if m.adapter_state is not None:
            saved = adapter.adapter_state_dict()
            adapter.load_adapter_state_dict(m.adapter_state, where=f"ensemble member {i}")
        try:
            adapter.save_adapter(where / "adapter")
            adapter.export_peft_lora(where / "adapter_peft")
        finally:
            if saved is not None:
                adapter.load_adapter_state_dict(saved, where="the adapter's own state")
        tensors = {k: v.detach().contiguous() for k, v in m.head.state_dict().items()}
        save_file(tensors, str(where / "head.safetensors"))
        save_readout(where, readout)
    probs = {f"{k.replace(':', '_')}_probs": p.probs.contiguous() for k, p in evaluation.predictions.items()}
    if evaluation.zero_shot is not None:
        probs["zero_shot_eval_probs"] = evaluation.zero_shot.probs.contiguous()
    save_file(probs, str(directory / "predictions.safetensors"))
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    rows, accs = {}, {}
    if evaluation.zero_shot is not None and METHODS[results["method"]].trains:  # else it is the zero-shot row
        rows["zero-shot"], accs["zero-shot"] = results["metrics"]["zero_shot"], evaluation.zero_shot.accumulator()
    rows[results["label"]] = results["metrics"]["eval"]
    accs[results["label"]] = evaluation.predictions["eval"].accumulator()
    title = f"{results['task']} {results['eval_split']} ({results['split_sizes']['eval']} questions)"
    reliability_diagrams(accs, directory / "reliability.png", title=title)
    trained = evaluation.zero_shot is not None and METHODS[results["method"]].trains
    shown = {"zero-shot": evaluation.zero_shot} if trained else {}
    shown[results["label"]] = evaluation.predictions["eval"]
    curves = {name: confidence_and_correct(p.probs, p.labels) for name, p in shown.items()}
    risk_coverage_plot(curves, directory / "risk_coverage.png", title=title)
    training, method = results["training"], METHODS[results["method"]]
    md = [f"## {title}", "", format_table(rows), ""]
    ortho = (
        f"orthogonality error max ||U^T U - I||_F = {training['orthogonality_error']:.2e}; "
        if method.adapter_kind.stiefel and method.trains
        else ""
    )
    md.append(
        f"{results['label']}: {ortho}{training['steps']} steps; {results['passes_per_example']} backbone "
        f"pass(es) per example; wall time {results['timings'].get('total_s', 0.0):.0f} s."
    )
    md += ["", decision_line(results["metrics"])]
    (directory / "results.md").write_text("\n".join(md) + "\n")


def decision_line(metrics: dict[str, Any]) -> str:
    """One line on the run's decisions (results.md and the console): AURC, and the decision rule calibrated
    on validation applied to the test split (docs/predict.md)."""
    out = f"AURC {metrics['eval']['aurc']:.3f} (risk-coverage curve: risk_coverage.png)"
    d = metrics.get("decision")
    if not d:
        return out + "; no decision rule (the validation split is missing or too small for decision.alpha)."
    if d["tau"] is None:
        out += (f"; decisions: no confidence threshold meets selective risk <= {d['risk_target']:g} "
                f"(probability {1 - d['delta']:g}) on validation, so every test question is abstained on")
    else:
        risk = "-" if d["selective_risk"] is None else f"{100 * d['selective_risk']:.1f}%"
        out += (f"; decisions at selective risk <= {d['risk_target']:g} (probability {1 - d['delta']:g}): "
                f"{100 * d['coverage']:.1f}% of test questions answered, their error rate {risk}")
    sets = "; ".join(f"{k.upper()} sets cover {100 * d[k]['coverage']:.1f}%, mean size {d[k]['mean_size']:.2f}"
                     for k in ("lac", "aps") if d.get(k))  # fmt: skip
    return f"{out}; at alpha {d['alpha']:g}: {sets}."


def build_results(
    cfg: RunConfig,
    entry_point: str,
    evaluation: Evaluation,
    splits: dict[str, EncodedSplit],
    trainings: list[dict[str, Any]],
    timings: dict[str, float],
    distributed: dict[str, Any] | None = None,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """The ``results.json`` content (validated against ``polar_vbll.results.RunResults``)."""
    method = METHODS[cfg.method]
    return validate_results(
        {
            "entry_point": entry_point,
            "name": cfg.name,
            "method": cfg.method,
            "label": method.label,
            "task": cfg.data.task,
            "eval_split": cfg.data.eval_split,
            "split_sizes": {name: len(enc) for name, enc in splits.items()},
            "data_fingerprints": {name: enc.fingerprint() for name, enc in splits.items()},
            "prompts_shortened": {name: dict(enc.shortened) for name, enc in splits.items()},
            "passes_per_example": evaluation.passes,
            "metrics": evaluation.metrics(),
            "training": trainings[0],
            "ensemble_members": trainings if len(trainings) > 1 else None,
            "distributed": distributed,
            "placement": placement.describe() if placement is not None else None,
            "unused_settings": unused_settings(cfg),
            "timings": timings,
            "peak_memory": evaluation.peak_memory,
            "machine": machine_info(),
            "params": cfg.flat_params(),
        }
    )


@dataclass
class RunOutcome:
    """A finished run: ``results.json``'s content and the in-memory evaluation (its predictions)."""

    results: dict[str, Any]
    evaluation: Evaluation


def finish_run(
    cfg: RunConfig,
    entry_point: str,
    session: Session,
    backend: Backend,
    store: CheckpointStore,
    trainer: Trainer | None,
    members: list[Member],
    trainings: list[dict[str, Any]],
    zero_shot: torch.Tensor | None,
    timings: dict[str, float],
    *,
    tracker=None,
    distributed: dict[str, Any] | None = None,
    progress: bool = True,
    t0: float | None = None,
) -> RunOutcome:
    """After training, on every rank: the evaluation, ``results.json``, the artifacts staged on rank 0
    (Theta gathered when partitioned), tracking of the end of the run, then the final checkpoint and the
    artifacts through ``store`` (which puts them in the run folder, or in Ray Train's storage)."""
    t = time.perf_counter()
    ev = evaluate(cfg, backend, session.adapter, members, session.splits, zero_shot, progress)
    timings["final_eval_s"] = time.perf_counter() - t
    timings["test_s"] = ev.seconds.get("eval", 0.0)
    timings["test_predict_s"] = ev.predict_seconds.get("eval", 0.0)  # without the cheap path's frozen blocks
    if t0 is not None:
        timings["total_s"] = time.perf_counter() - t0
    results = build_results(cfg, entry_point, ev, session.splits, trainings, timings, distributed, session.placement)
    staged: Path | None = None
    with backend.gathered(session.adapter.theta_parameters()):  # every rank gathers; rank 0 writes
        if backend.rank == 0:
            staged = Path(tempfile.mkdtemp(prefix="polar-vbll-artifacts-"))
            readout = make_readout(session.tokenizer, session.answer_ids, cfg.model.max_length, cfg.model.add_bos)
            write_artifacts(staged, session.adapter, members, results, ev, readout)
    if tracker is not None and staged is not None:
        from polar_vbll.tracking import log_final

        during = tracker.seconds
        log_final(tracker, results, ev.predictions, staged)
        log_run_model(tracker, cfg, session.placement, staged)
        results["timings"]["tracking_train_s"] = during
        results["timings"]["tracking_final_s"] = tracker.seconds - during
        (staged / "results.json").write_text(json.dumps(results, indent=2))
    state = trainer.state_dict() if trainer is not None else None
    summary = {"step": results["training"]["steps"], **flat_metrics(results)}
    try:
        store.save_final(results["training"]["steps"], state, summary, staged)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    return RunOutcome(results, ev)


def log_run_model(tracker, cfg: RunConfig, placement: Placement | None, staged: Path) -> None:
    """The run's MLflow model (``polar_vbll.mlflow_model``: the staged files with ``config.yaml`` and
    ``params.json``) at ``model/`` in its MLflow run; a failure is a note, never a lost run."""
    t = time.perf_counter()
    try:
        from polar_vbll.mlflow_model import log_model

        with tempfile.TemporaryDirectory(prefix="polar-vbll-config-") as tmp:
            write_run_params(cfg, Path(tmp), placement)
            log_model(tracker, staged, Path(tmp))
    except Exception as exc:  # the run's files are written whatever happens here
        print(f"[tracking] the MLflow model was not logged: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    finally:
        tracker.seconds += time.perf_counter() - t


# ------------------------------------------------------------------------------------------ one process
def _open_member(cfg: RunConfig, splits, answer_ids, resume: bool | str):
    """A member's run folder's latest checkpoint (checked against the training settings and data, weights
    loaded), objects and backend. ``resume``: True resumes or refuses a checkpoint of other training
    settings or data; "matching" (a comparison's own run folders) starts such a run afresh; False starts
    afresh. A fresh start removes the folder's old checkpoints, so none of other settings is ever resumed
    later; nothing is removed before the data and the model are checked."""
    if splits is None:
        validate_inputs(cfg)  # a wrong task, row or model path is named before any checkpoint is read
    store = LocalCheckpoints(cfg.run_dir(), cfg.train.keep_checkpoints)
    state = store.latest() if resume else None
    session = None
    try:
        if state is not None:
            check_resumable(state.get("config", {}), cfg)
            session = build_session(cfg, splits, answer_ids)
            check_same_data(state, session.splits["train"])
    except CheckpointError as exc:
        if resume != "matching":
            raise CheckpointError(f"{cfg.run_dir()}: {exc}") from None
        print(f"settings or data changed since the checkpoints in {cfg.run_dir()} were written; training again",
              flush=True)  # fmt: skip
        state = None
    session = session or build_session(cfg, splits, answer_ids)
    if state is None:
        store.clear()
    else:
        load_weights(session.adapter, session.head, state, cfg)
    return session, local_backend(session), store, state


def _fit_member(cfg: RunConfig, session: Session, backend: Backend, store, state, zero, tracker, progress) -> Trainer:
    """Train one member with the one trainer (resuming ``state``), checkpointing at the end."""
    coordinator = LocalCoordinator(session.head, cfg.head.fit, state["coordinator"] if state else None)
    trainer = Trainer(
        cfg, session.adapter, session.head, session.splits, backend, coordinator, store, tracker=tracker,
        progress=progress,
    )  # fmt: skip
    if state is not None:
        trainer.restore(state)
        if trainer.state.step:
            print(f"resumed from step {trainer.state.step} in {cfg.run_dir()}", flush=True)
    trainer.state.zero_shot, trainer.state.zero_shot_split = zero, session.splits["eval"].fingerprint()
    trainer.fit()  # checkpoints at the end: an evaluation that fails loses no training
    return trainer


def run_method(
    cfg: RunConfig,
    *,
    entry_point: str = "train",
    splits: dict[str, EncodedSplit] | None = None,
    answer_ids: list[int] | None = None,
    trained: dict[str, TrainedMember] | None = None,
    resume: bool | str = True,
    zero_shot: bool = True,
    tracker=None,
    progress: bool = True,
) -> RunOutcome:
    """Run ``cfg``'s method in this process and write its run folder; returns ``results.json``'s content
    and the evaluation.

    ``splits``/``answer_ids``: tokenized splits to share (with their cached prefix states). ``trained``: a
    cache of trained members by :func:`training_key` (a comparison's), reused instead of training again.
    ``resume``: see :func:`_open_member`. ``zero_shot``: also predict the zero-shot model on the evaluation
    split (before training)."""
    cfg = resolved(cfg)  # what trains is recorded: model.dtype as this process's device resolves it
    with FolderLock(cfg.run_dir(), f"polar-vbll {entry_point}"):  # re-entrant in the process that holds it
        return _run_method(cfg, entry_point, splits, answer_ids, trained, resume, zero_shot, tracker, progress)


def _run_method(cfg, entry_point, splits, answer_ids, trained, resume, zero_shot, tracker, progress) -> RunOutcome:
    t0 = time.perf_counter()
    n_members = METHODS[cfg.method].predictive_kind.members(cfg)
    timings = {"load_s": 0.0, "zero_shot_eval_s": 0.0, "train_s": 0.0}
    members: list[Member] = []
    trainings: list[dict[str, Any]] = []
    zero: torch.Tensor | None = None
    trainer: Trainer | None = None
    for i in range(n_members):
        mcfg = member_config(cfg, i) if n_members > 1 else cfg
        key = training_key(mcfg)
        done = trained.get(key) if trained is not None else None
        t = time.perf_counter()
        session, backend, store, state = _open_member(mcfg, splits, answer_ids, resume if done is None else False)
        splits, answer_ids = session.splits, session.answer_ids
        timings["load_s"] += time.perf_counter() - t
        if i == 0:
            # after the resume check: a refused resume changes nothing
            write_run_params(cfg, cfg.run_dir(), session.placement)
            if zero_shot:
                t = time.perf_counter()
                zero = zero_shot_for(session, backend, state, progress, one_process=True)
                timings["zero_shot_eval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if done is not None:
            session.adapter.load_adapter_state_dict(done.adapter_state, where="an identical earlier training")
            session.head.load_state_dict(done.head_state)
            training, trainer = {**done.training, "reused": True}, None
            timings["train_s"] += done.train_s
        else:
            trainer = _fit_member(mcfg, session, backend, store, state, zero if i == 0 else None,
                                  tracker if i == 0 else None, progress)  # fmt: skip
            training, train_s = training_summary(trainer), time.perf_counter() - t
            timings["train_s"] += train_s
            if trained is not None:
                head_state = {k: v.detach().clone() for k, v in session.head.state_dict().items()}
                trained[key] = TrainedMember(session.adapter.adapter_state_dict(), head_state, training, train_s)
        members.append(Member(session.head, session.adapter.adapter_state_dict() if n_members > 1 else None))
        trainings.append(training)
    store = LocalCheckpoints(cfg.run_dir(), cfg.train.keep_checkpoints)
    final_trainer = trainer if n_members == 1 else None  # an ensemble's members checkpointed their own
    return finish_run(
        cfg, entry_point, session, backend, store, final_trainer, members, trainings, zero, timings,
        tracker=tracker, progress=progress, t0=t0,
    )  # fmt: skip


def run_training(
    cfg: RunConfig, resume: bool = True, progress: bool = True, track: bool = True
) -> dict[str, Any]:
    """``polar-vbll train``: one method in this process (zero-shot beside it), tracked in MLflow (the run
    folder's local store, or ``MLFLOW_TRACKING_URI``) unless ``track`` is False; prints the table and the
    run folder, returns ``results.json``'s content."""
    from polar_vbll.support import TRAIN, check_supported
    from polar_vbll.tracking import tracked

    check_supported(cfg, TRAIN)
    check_plain_name(cfg.name)
    cfg = resolved(cfg)  # model.dtype as this process's device resolves it (ConfigError: no such device)
    run_dir = cfg.run_dir()
    check_output_folder(run_dir, "output_dir/name", "run")
    validate_inputs(cfg)
    print(f"run folder: {run_dir.resolve()}", flush=True)
    tags = {"polar_vbll.role": "run", "polar_vbll.method": cfg.method}
    with FolderLock(run_dir, "polar-vbll train"):  # one writer, taken before anything is written
        if note := unused_note(cfg):
            print(note, flush=True)
        with tracked(run_dir, "polar-vbll-runs", cfg.name, cfg.flat_params(), tags, enabled=track,
                     settings=training_key(cfg), fresh=not resume) as tracker:  # fmt: skip
            outcome = run_method(cfg, entry_point="train", resume=resume, tracker=tracker, progress=progress)
    print("\n" + (run_dir / "results.md").read_text(), flush=True)
    print(f"run folder: {run_dir.resolve()}", flush=True)
    return outcome.results
