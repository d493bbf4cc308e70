"""Building blocks of a run, and ``polar-vbll train``: one method, zero-shot vs fine-tuned.

``build_adapter`` / ``build_head`` / ``load_splits`` turn a :class:`RunConfig` into the objects the trainer
needs; ``predict_with`` evaluates a trained model with the configured predictive (one pass, MC dropout,
post-hoc Laplace). ``run_training`` strings them together for one method; ``polar_vbll.compare`` runs many.

The run folder (``<output_dir>/<name>``) receives ``config.yaml`` (the whole config), ``params.json``
(flattened config, every **[choice]** included), checkpoints, ``adapter/`` (the adapter's own format),
``adapter_peft/`` (a standard PEFT LoRA adapter), ``head.safetensors``, ``results.json``, ``results.md``
(the before/after table) and a reliability diagram.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from polar_vbll.config import RunConfig, dump_config
from polar_vbll.evaluate import Predictions, predict
from polar_vbll.features import EncodedSplit, FeatureSource, encode_examples, split_features
from polar_vbll.heads import DeterministicHead, VBLLHead
from polar_vbll.metrics import format_table
from polar_vbll.models import answer_head_weight, answer_token_ids, load_backbone
from polar_vbll.plots import reliability_diagrams
from polar_vbll.tasks import answer_token_strings, load_task, num_classes, task_num_classes
from polar_vbll.train import Trainer


def method_label(cfg: RunConfig) -> str:
    """A readable name for what a config trains, e.g. ``PoLAR-VBLL`` or ``LoRA-MLE``."""
    adapter = "PoLAR" if cfg.adapter_kind == "polar" else "LoRA"
    if cfg.head.kind == "vbll":
        return f"{adapter}-VBLL"
    if cfg.eval.predictive == "mc_dropout":
        return f"{adapter} MC dropout"
    if cfg.head.laplace != "none":
        return f"{adapter} + LL-Laplace"
    return f"{adapter}-{'MAP' if cfg.optim.theta_weight_decay > 0 else 'MLE'}"


def build_adapter(cfg: RunConfig, model: nn.Module):
    """Inject the configured adapter into ``model``; both kinds expose the same interface."""
    if cfg.adapter_kind == "lora":
        from polar_vbll.baselines.lora import LoraAdapter

        return LoraAdapter(model, cfg.lora)
    from polar_vbll.adapters import inject_polar

    return inject_polar(model, cfg.adapter)


def build_head(cfg: RunConfig, model: nn.Module, answer_ids: list[int], n_train: int) -> nn.Module:
    """The last layer, started from the LM head's answer-token rows (so training starts at zero-shot)."""
    weight, bias = answer_head_weight(model, answer_ids)
    if cfg.head.kind == "vbll":
        return VBLLHead.from_weight(weight, dataset_size=n_train, config=cfg.head.vbll)
    return DeterministicHead(weight, bias)


def load_splits(cfg: RunConfig, tokenizer) -> tuple[dict[str, EncodedSplit], list[int]]:
    """Train / validation / eval splits (and OOD sets), tokenized, plus the answer-letter token ids."""
    d = cfg.data
    examples = {
        "train": load_task(d.task, d.train_split, seed=d.split_seed, limit=d.train_limit),
        "validation": load_task(d.task, d.val_split, seed=d.split_seed, limit=d.val_limit),
        "eval": load_task(d.task, d.eval_split, seed=d.split_seed, limit=d.eval_limit),
    }
    for task in d.ood_tasks:
        examples[f"ood:{task}"] = load_task(task, d.ood_split, seed=d.split_seed, limit=d.ood_limit)
    # size the head from the whole task (one split may lack the rare 5-choice question), and the OOD sets
    k = max([task_num_classes(d.task)] + [num_classes(exs) for exs in examples.values()])
    answer_ids = answer_token_ids(tokenizer, answer_token_strings(k))
    splits = {
        name: encode_examples(name, exs, tokenizer, cfg.model.max_length, cfg.model.add_bos)
        for name, exs in examples.items()
    }
    return splits, answer_ids


def predict_with(
    cfg: RunConfig,
    source: FeatureSource,
    head: nn.Module,
    enc: EncodedSplit,
    train: EncodedSplit | None = None,
    progress: bool = True,
) -> tuple[Predictions, int]:
    """Predictions with the configured predictive, and the backbone passes it costs per example."""
    bs = cfg.train.eval_batch_size
    if cfg.eval.predictive == "mc_dropout":
        from polar_vbll.baselines.mc_dropout import predict_mc_dropout

        n = cfg.eval.mc_dropout_samples
        return predict_mc_dropout(
            source, head, enc, bs, n_samples=n, seed=cfg.train.seed, progress=progress
        ), n
    if cfg.head.laplace != "none":
        return predict(source, fit_laplace_head(cfg, source, head, train), enc, bs, progress), 1
    return predict(source, head, enc, bs, progress), 1


def with_posthoc_head(
    cfg: RunConfig, source: FeatureSource, head: nn.Module, train: EncodedSplit
) -> tuple[RunConfig, nn.Module]:
    """Fit a post-hoc head (last-layer Laplace) once, for every split to be predicted with it: returns the
    config with the post-hoc step marked done and the head to predict with."""
    if cfg.head.laplace == "none":
        return cfg, head
    lap = fit_laplace_head(cfg, source, head, train)
    return cfg.model_copy(update={"head": cfg.head.model_copy(update={"laplace": "none"})}), lap


def fit_laplace_head(cfg: RunConfig, source: FeatureSource, head: nn.Module, train: EncodedSplit | None):
    """Post-hoc last-layer Laplace around the trained head's mean (the VBLL mean or the answer rows)."""
    from polar_vbll.baselines.laplace import LastLayerLaplace

    if train is None:
        raise ValueError("a Laplace head needs the training split")
    weight = head.vbll_mean if isinstance(head, VBLLHead) else head.weight
    bias = getattr(head, "bias", None)
    lap = LastLayerLaplace(
        weight.detach(), bias, structure=cfg.head.laplace, predictive=cfg.head.laplace_predictive
    )
    return lap.fit(*split_features(source, train, cfg.train.eval_batch_size))


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def write_run_params(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "params.json").write_text(json.dumps(cfg.flat_params(), indent=2, sort_keys=True))


def save_trained(adapter, head: nn.Module, run_dir: Path) -> None:
    """The adapter (own format + PEFT LoRA export) and the head's tensors, beside the checkpoints."""
    adapter.save_adapter(run_dir / "adapter")
    adapter.export_peft_lora(run_dir / "adapter_peft")
    save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(run_dir / "head.safetensors")
    )


def run_training(cfg: RunConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """``polar-vbll train``: zero-shot evaluation, fine-tuning, evaluation again; returns the results."""
    run_dir = cfg.run_dir()
    write_run_params(cfg, run_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_backbone(cfg.model)
    adapter = build_adapter(cfg, model)
    splits, answer_ids = load_splits(cfg, tokenizer)
    head = build_head(cfg, model, answer_ids, n_train=len(splits["train"]))
    zero_shot_head = DeterministicHead(*answer_head_weight(model, answer_ids))
    source = FeatureSource(
        adapter.base_model, tokenizer.pad_token_id, cache_prefix=cfg.train.cache_frozen_prefix
    )
    timings["load_s"] = time.perf_counter() - t0
    sizes = {name: len(enc) for name, enc in splits.items()}
    print(
        f"task {cfg.data.task}: "
        + ", ".join(f"{n} {s}" for n, s in sizes.items())
        + f"; {len(answer_ids)} answer letters"
        + (f"; frozen blocks below {source.split_block} cached" if source.split_block else ""),
        flush=True,
    )
    bs = cfg.train.eval_batch_size
    t = time.perf_counter()
    before = predict(source, zero_shot_head, splits["eval"], bs, progress)  # adapters at init: W = W0
    timings["zero_shot_eval_s"] = time.perf_counter() - t

    trainer = Trainer(cfg, adapter, head, source, splits["train"], run_dir, progress=progress)
    resumed = resume and trainer.resume_latest()
    if resumed:
        print(f"resumed from step {trainer.state.step} in {run_dir}", flush=True)
    t = time.perf_counter()
    trainer.fit()
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    eval_cfg, eval_head = with_posthoc_head(cfg, source, head, splits["train"])
    after, passes = predict_with(eval_cfg, source, eval_head, splits["eval"], progress=progress)
    timings["final_eval_s"] = time.perf_counter() - t
    val_after, _ = predict_with(eval_cfg, source, eval_head, splits["validation"], progress=progress)
    ood = {
        name: predict_with(eval_cfg, source, eval_head, enc, progress=progress)[0]
        for name, enc in splits.items()
        if name.startswith("ood:")
    }
    timings["total_s"] = time.perf_counter() - t0
    save_trained(adapter, head, run_dir)

    label = method_label(cfg)
    rows = {"zero-shot": before.metrics(), label: after.metrics()}
    title = f"{cfg.data.task} {cfg.data.eval_split} ({sizes['eval']} questions)"
    reliability_diagrams(
        {"zero-shot": before.accumulator(), label: after.accumulator()},
        run_dir / "reliability.png",
        title=title,
    )
    results = {
        "task": cfg.data.task,
        "eval_split": cfg.data.eval_split,
        "method": label,
        "split_sizes": sizes,
        "metrics": rows,
        "passes_per_example": passes,
        "validation_after": val_after.metrics(),
        "ood": {name: p.metrics() for name, p in ood.items()},
        "orthogonality_error": float(adapter.orthogonality_error()),
        "stable_ranks": {k: float(v) for k, v in adapter.stable_ranks().items()},
        "steps": trainer.state.step,
        "resumed": resumed,
        "history": trainer.state.history,
        "timings": timings,
        "machine": machine_info(),
        "params": cfg.flat_params(),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    md = [f"## {title}", "", format_table(rows), ""]
    md.append(
        f"Orthogonality error max ||U^T U - I||_F = {results['orthogonality_error']:.2e}; "
        f"{trainer.state.step} steps; wall time {timings['total_s']:.0f} s."
    )
    (run_dir / "results.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md), flush=True)
    print(f"\nrun folder: {run_dir}", flush=True)
    return results
