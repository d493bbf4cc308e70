"""A whole run: load, evaluate zero-shot, fine-tune, evaluate again, write everything to the run folder.

The run folder (``<output_dir>/<name>``) receives ``config.yaml`` (the whole config), ``params.json``
(flattened config, every **[choice]** included), checkpoints, ``adapter/`` (PoLAR format),
``adapter_peft/`` (a standard PEFT LoRA adapter), ``results.json``, ``results.md`` (the before/after
table) and reliability diagrams.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polar_vbll.adapters import PolarModel, inject_polar
from polar_vbll.config import RunConfig, dump_config
from polar_vbll.evaluate import Predictions, predict
from polar_vbll.features import EncodedSplit, FeatureSource, encode_examples
from polar_vbll.heads import DeterministicHead
from polar_vbll.metrics import format_table
from polar_vbll.models import answer_head_weight, answer_token_ids, load_backbone
from polar_vbll.plots import reliability_diagrams
from polar_vbll.tasks import answer_token_strings, load_task, num_classes, task_num_classes
from polar_vbll.train import Trainer


@dataclass
class Prepared:
    """Everything a run builds before training: the adapted model, its head, encoded splits."""

    cfg: RunConfig
    polar: PolarModel
    tokenizer: Any
    head: DeterministicHead
    source: FeatureSource
    splits: dict[str, EncodedSplit]
    answer_ids: list[int]


def _load_split(cfg: RunConfig, task: str, split: str, limit: int | None):
    return load_task(task, split, seed=cfg.data.split_seed, limit=limit)


def prepare(cfg: RunConfig, progress: bool = True) -> Prepared:
    """Load the backbone, inject PoLAR, load and tokenize the splits, build the deterministic head."""
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_backbone(cfg.model)
    polar = inject_polar(model, cfg.adapter)
    d = cfg.data
    examples = {
        "train": _load_split(cfg, d.task, d.train_split, d.train_limit),
        "validation": _load_split(cfg, d.task, d.val_split, d.val_limit),
        "eval": _load_split(cfg, d.task, d.eval_split, d.eval_limit),
    }
    for task in d.ood_tasks:
        examples[f"ood:{task}"] = _load_split(cfg, task, d.ood_split, d.ood_limit)
    # size the head from the whole task (one split may lack the rare 5-choice question), and the OOD sets
    k = max([task_num_classes(d.task)] + [num_classes(exs) for exs in examples.values()])
    answer_ids = answer_token_ids(tokenizer, answer_token_strings(k))
    weight, bias = answer_head_weight(model, answer_ids)
    head = DeterministicHead(weight, bias)
    splits = {
        name: encode_examples(name, exs, tokenizer, cfg.model.max_length, cfg.model.add_bos)
        for name, exs in examples.items()
    }
    source = FeatureSource(model, pad_id=tokenizer.pad_token_id, cache_prefix=cfg.train.cache_frozen_prefix)
    return Prepared(cfg, polar, tokenizer, head, source, splits, answer_ids)


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def run_training(cfg: RunConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """The main job: zero-shot evaluation, PoLAR fine-tuning, evaluation again; returns the results."""
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "params.json").write_text(json.dumps(cfg.flat_params(), indent=2, sort_keys=True))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = prepare(cfg, progress=progress)
    timings["load_s"] = time.perf_counter() - t0

    sizes = {name: len(enc) for name, enc in prep.splits.items()}
    print(
        f"task {cfg.data.task}: "
        + ", ".join(f"{n} {s}" for n, s in sizes.items())
        + f"; {len(prep.answer_ids)} answer letters"
        + (f"; frozen blocks below {prep.source.split_block} cached" if prep.source.split_block else ""),
        flush=True,
    )

    eval_bs = cfg.train.eval_batch_size
    t = time.perf_counter()
    before = predict(prep.source, prep.head, prep.splits["eval"], eval_bs, progress)
    timings["zero_shot_eval_s"] = time.perf_counter() - t

    trainer = Trainer(
        cfg, prep.polar, prep.head, prep.source, prep.splits["train"], run_dir, progress=progress
    )
    resumed = resume and trainer.resume_latest()
    if resumed:
        print(f"resumed from step {trainer.state.step} in {run_dir}", flush=True)
    t = time.perf_counter()
    trainer.fit()
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    after = predict(prep.source, prep.head, prep.splits["eval"], eval_bs, progress)
    val_after = predict(prep.source, prep.head, prep.splits["validation"], eval_bs, progress)
    ood = {
        name: predict(prep.source, prep.head, enc, eval_bs, progress)
        for name, enc in prep.splits.items()
        if name.startswith("ood:")
    }
    timings["final_eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    prep.polar.save_adapter(run_dir / "adapter")
    prep.polar.export_peft_lora(run_dir / "adapter_peft")
    return write_results(cfg, run_dir, before, after, val_after, ood, trainer, sizes, timings, resumed)


def write_results(
    cfg: RunConfig,
    run_dir: Path,
    before: Predictions,
    after: Predictions,
    val_after: Predictions,
    ood: dict[str, Predictions],
    trainer: Trainer,
    sizes: dict[str, int],
    timings: dict[str, float],
    resumed: bool,
) -> dict[str, Any]:
    rows = {"zero-shot": before.metrics(), "PoLAR (MLE head)": after.metrics()}
    title = f"{cfg.data.task} {cfg.data.eval_split} ({sizes['eval']} questions)"
    table = format_table(rows)
    reliability_diagrams(
        {"zero-shot": before.accumulator(), "PoLAR (MLE head)": after.accumulator()},
        run_dir / "reliability.png",
        title=title,
    )
    results = {
        "task": cfg.data.task,
        "eval_split": cfg.data.eval_split,
        "split_sizes": sizes,
        "metrics": rows,
        "validation_after": val_after.metrics(),
        "ood": {name: p.metrics() for name, p in ood.items()},
        "orthogonality_error": float(trainer.polar.orthogonality_error()),
        "stable_ranks": {k: float(v) for k, v in trainer.polar.stable_ranks().items()},
        "steps": trainer.state.step,
        "resumed": resumed,
        "history": trainer.state.history,
        "timings": timings,
        "machine": machine_info(),
        "params": cfg.flat_params(),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    md = [f"## {title}", "", table, ""]
    md.append(
        f"Orthogonality error max ||U^T U - I||_F = {results['orthogonality_error']:.2e}; "
        f"{trainer.state.step} steps; wall time {timings['total_s']:.0f} s."
    )
    (run_dir / "results.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md), flush=True)
    print(f"\nrun folder: {run_dir}", flush=True)
    return results
