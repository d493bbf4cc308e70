"""``polar-vbll compare``: methods x tasks x seeds on one backbone, one code path, one table.

Per task the splits are tokenized once and the frozen prefix (the blocks below the adapted ones) runs once
per example; every method and seed reuses those states, so a comparison costs little more than its
trainings. Each finished (task, method, seed) is appended to ``records.jsonl`` at once: an interrupted
comparison resumes where it stopped and loses at most the run in progress (whose trainer checkpoints
resume too). Runs whose training is identical (LoRA-MLE, the Laplace baseline built on it, the first
ensemble member) are trained once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polar_vbll.compare.config import CompareConfig
from polar_vbll.compare.methods import LABELS, method_config
from polar_vbll.compare.report import aggregate, markdown_table, write_csv
from polar_vbll.config import RunConfig, parse_config
from polar_vbll.evaluate import Predictions
from polar_vbll.features import EncodedSplit, FeatureSource
from polar_vbll.heads import DeterministicHead
from polar_vbll.metrics import CalibrationAccumulator, ood_auroc, ood_scores
from polar_vbll.models import answer_head_weight, load_backbone
from polar_vbll.plots import reliability_diagrams
from polar_vbll.run import (
    build_adapter,
    build_head,
    load_splits,
    predict_with,
    with_posthoc_head,
    write_run_params,
)
from polar_vbll.train import Trainer

_EVAL_ONLY = ("eval", "name", "output_dir")


def training_key(cfg: RunConfig) -> str:
    """What determines a trained model: everything but how it is evaluated and where it is written."""
    d = cfg.model_dump(mode="json")
    for k in _EVAL_ONLY:
        d.pop(k, None)
    d["head"].pop("laplace", None)
    d["head"].pop("laplace_predictive", None)
    return json.dumps(d, sort_keys=True)


@dataclass
class Trained:
    adapter_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    train_s: float
    orthogonality_error: float
    stable_rank_mean: float


@dataclass
class TaskContext:
    """One task's tokenized splits (with their cached prefix states) shared by all its runs."""

    task: str
    splits: dict[str, EncodedSplit]
    answer_ids: list[int]
    trained: dict[str, Trained] = field(default_factory=dict)
    predictions: dict[str, dict[str, Predictions]] = field(default_factory=dict)  # method -> split -> preds


class CompareRunner:
    def __init__(self, ccfg: CompareConfig, progress: bool = True):
        self.ccfg = ccfg
        self.progress = progress
        self.out = Path(ccfg.output_dir) / ccfg.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.records_path = self.out / "records.jsonl"
        (self.out / "compare_config.json").write_text(ccfg.model_dump_json(indent=2))

    # ----------------------------------------------------------------- records
    def load_records(self) -> list[dict[str, Any]]:
        if not self.records_path.is_file():
            return []
        return [json.loads(line) for line in self.records_path.read_text().splitlines() if line.strip()]

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.records_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- configs
    def run_config(self, method: str, task: str, seed: int) -> RunConfig:
        c = self.ccfg
        mapping = method_config(c.base_for(task), method, c.method_overrides.get(method), task, seed)
        mapping["name"] = f"{c.name}/{task}/{method}/seed{seed}"
        mapping["output_dir"] = c.output_dir
        if c.ood is not None and task == c.ood.train_task:
            mapping.setdefault("data", {})["ood_tasks"] = list(c.ood.eval_tasks)
            mapping["data"]["ood_limit"] = c.ood.limit
        return parse_config(mapping, f"compare method {method} on {task} (seed {seed})")

    # ----------------------------------------------------------------- one run
    def _fresh(self, cfg: RunConfig, ctx: TaskContext):
        model, tokenizer = load_backbone(cfg.model)
        adapter = build_adapter(cfg, model)
        head = build_head(cfg, model, ctx.answer_ids, n_train=len(ctx.splits["train"]))
        source = FeatureSource(adapter.base_model, tokenizer.pad_token_id, cfg.train.cache_frozen_prefix)
        return model, adapter, head, source

    def _train(self, cfg: RunConfig, ctx: TaskContext):
        """A fresh model with trained adapters (trained now, or restored from an identical earlier run)."""
        model, adapter, head, source = self._fresh(cfg, ctx)
        key = training_key(cfg)
        if key in ctx.trained:
            done = ctx.trained[key]
            adapter.load_adapter_state_dict(done.adapter_state)
            head.load_state_dict(done.head_state)
            return model, adapter, head, source, done
        write_run_params(cfg, cfg.run_dir())
        trainer = Trainer(
            cfg, adapter, head, source, ctx.splits["train"], cfg.run_dir(), progress=self.progress
        )
        trainer.resume_latest()
        t = time.perf_counter()
        trainer.fit()
        ranks = list(adapter.stable_ranks().values())
        done = Trained(
            adapter_state=adapter.adapter_state_dict(),
            head_state={k: v.detach().clone() for k, v in head.state_dict().items()},
            train_s=time.perf_counter() - t,
            orthogonality_error=float(adapter.orthogonality_error()),
            stable_rank_mean=sum(ranks) / max(1, len(ranks)),
        )
        ctx.trained[key] = done
        return model, adapter, head, source, done

    def _predict_all(
        self, cfg: RunConfig, ctx: TaskContext, source, head
    ) -> tuple[dict[str, Predictions], int]:
        """Predictions on the eval, validation and OOD splits; ``_eval_s`` is the eval split's time."""
        names = ["eval", "validation"] + [n for n in ctx.splits if n.startswith("ood:")]
        preds, passes = {}, 1
        cfg, head = with_posthoc_head(cfg, source, head, ctx.splits["train"])  # fitted once for all splits
        for name in names:
            t = time.perf_counter()
            preds[name], passes = predict_with(cfg, source, head, ctx.splits[name], progress=self.progress)
            if name == "eval":
                preds["_eval_s"] = time.perf_counter() - t  # type: ignore[assignment]
        return preds, passes

    def run_method(self, method: str, task: str, seed: int, ctx: TaskContext) -> dict[str, Any]:
        cfg = self.run_config(method, task, seed)
        if method == "zero_shot":
            # the adapter at init is exactly W0, and it lets the zero-shot pass reuse the cached prefix
            model, adapter, _, source = self._fresh(cfg, ctx)
            head = DeterministicHead(*answer_head_weight(model, ctx.answer_ids))
            preds, passes = self._predict_all(cfg, ctx, source, head)
            extra = {"train_s": 0.0}
        elif cfg.eval.ensemble_members > 1:
            members = []
            train_s = 0.0
            for i in range(cfg.eval.ensemble_members):
                member_cfg = self.run_config("lora_mle", task, seed + 1000 * i)
                member_cfg = member_cfg.model_copy(update={"adapter_kind": cfg.adapter_kind})
                _, _, head, source, done = self._train(member_cfg, ctx)
                member_preds, _ = self._predict_all(member_cfg, ctx, source, head)
                members.append(member_preds)
                train_s += done.train_s
            from polar_vbll.baselines.ensemble import ensemble_predictions

            preds = {
                name: ensemble_predictions([m[name] for m in members])
                for name in members[0]
                if name != "_eval_s"
            }
            preds["_eval_s"] = sum(m["_eval_s"] for m in members)  # type: ignore[assignment]
            passes = cfg.eval.ensemble_members
            extra = {"train_s": train_s}
        else:
            _, adapter, head, source, done = self._train(cfg, ctx)
            preds, passes = self._predict_all(cfg, ctx, source, head)
            extra = {
                "train_s": done.train_s,
                "orthogonality_error": done.orthogonality_error,
                "stable_rank_mean": done.stable_rank_mean,
            }
        eval_s = float(preds.pop("_eval_s"))  # type: ignore[arg-type]
        if seed == self.ccfg.seeds[0]:
            ctx.predictions[method] = preds
        metrics = preds["eval"].metrics()
        in_scores = ood_scores(preds["eval"].probs)
        for name, p in preds.items():
            if name.startswith("ood:"):
                short = name.removeprefix("ood:")
                out_scores = ood_scores(p.probs)
                metrics[f"ood_auroc_{short}"] = ood_auroc(in_scores["msp"], out_scores["msp"])
                metrics[f"ood_acc_{short}"] = p.metrics()["acc"]
        return {
            "task": task,
            "method": method,
            "seed": seed,
            "metrics": metrics,
            "validation": preds["validation"].metrics(),
            "passes_per_example": passes,
            "test_s": eval_s,
            "params": cfg.flat_params(),
            **extra,
        }

    # ----------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, Any]]:
        c = self.ccfg
        records = self.load_records()
        done = {(r["task"], r["method"], r["seed"]) for r in records}
        for task in c.tasks:
            todo = [(s, m) for s in c.seeds for m in c.methods if (task, m, s) not in done]
            if not todo:
                continue
            first = self.run_config(c.methods[0], task, c.seeds[0])
            _, tokenizer = load_backbone(first.model)
            splits, answer_ids = load_splits(first, tokenizer)
            sizes = ", ".join(f"{n} {len(e)}" for n, e in splits.items())
            print(f"\n== {task}: {sizes}", flush=True)
            ctx = TaskContext(task, splits, answer_ids)
            for seed, method in todo:
                print(f"-- {task} / {LABELS.get(method, method)} / seed {seed}", flush=True)
                record = self.run_method(method, task, seed, ctx)
                self._append(record)
                records.append(record)
            if ctx.predictions:
                reliability_diagrams(
                    {LABELS.get(m, m): _acc(p["eval"]) for m, p in ctx.predictions.items()},
                    self.out / f"reliability_{task}.png",
                    title=f"{task} {first.data.eval_split}, seed {c.seeds[0]}",
                )
        self.write_report(records)
        return records

    def write_report(self, records: list[dict[str, Any]]) -> str:
        wanted = [r for r in records if r["task"] in self.ccfg.tasks and r["method"] in self.ccfg.methods]
        rows = aggregate(
            [{**r, "method": LABELS.get(r["method"], r["method"])} for r in _ordered(wanted, self.ccfg)]
        )
        ood_keys = sorted({k for r in wanted for k in r["metrics"] if k.startswith("ood_auroc_")})
        table = markdown_table(rows, ood_keys)
        write_csv(wanted, self.out / "results.csv")
        header = (
            f"# {self.ccfg.name}: {len(self.ccfg.methods)} methods x {len(self.ccfg.tasks)} tasks x "
            f"{len(self.ccfg.seeds)} seeds\n\nmean ± std over seeds; ACC, ECE and AUROC in percent; "
            "NLL and Brier from the predictive probabilities; ECE top-label, 15 equal-width bins.\n"
        )
        (self.out / "results.md").write_text(header + "\n" + table + "\n")
        print("\n" + table, flush=True)
        print(f"\ncomparison folder: {self.out}", flush=True)
        return table


def _acc(p: Predictions) -> CalibrationAccumulator:
    return p.accumulator()


def _ordered(records: list[dict[str, Any]], ccfg: CompareConfig) -> list[dict[str, Any]]:
    order = {(t, m): (i, j) for i, t in enumerate(ccfg.tasks) for j, m in enumerate(ccfg.methods)}
    return sorted(records, key=lambda r: (order[(r["task"], r["method"])], r["seed"]))


def run_compare(ccfg: CompareConfig, progress: bool = True) -> list[dict[str, Any]]:
    return CompareRunner(ccfg, progress).run()
