"""``polar-vbll compare``: methods x tasks x seeds on one backbone, one code path, one table.

Every (task, method, seed) is an ordinary run of :func:`polar_vbll.runner.run_method`, the same one
``polar-vbll train`` does, written to ``<output_dir>/<name>/<task>/<method>/seed<seed>/`` with its own
``results.json``. Per task the splits are tokenized once and the frozen prefix (the blocks below the
adapted ones) runs once per example; every method and seed reuses those states. Runs whose training is
identical (LoRA-MLE, the Laplace head built on it, the first ensemble member) are trained once.

Each finished run is appended to ``records.jsonl`` at once, with a digest of the run config that produced
it: an interrupted comparison resumes where it stopped and loses at most the run in progress (whose
checkpoints resume too), and a rerun with changed settings runs again every (task, method, seed) whose
config changed, naming what changed; the table holds only records of the current settings. The comparison
is tracked in MLflow as one parent run with a child per (task, method, seed) (``--no-track`` to switch
off).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polar_vbll.compare.config import CompareConfig
from polar_vbll.compare.report import (
    aggregate,
    decision_table,
    markdown_table,
    ood_table,
    table_rows,
    write_csv,
)
from polar_vbll.config import RunConfig, check_output_folder, parse_config
from polar_vbll.features import EncodedSplit
from polar_vbll.files import read_records
from polar_vbll.locking import FolderLock
from polar_vbll.methods import METHODS
from polar_vbll.models import load_tokenizer
from polar_vbll.placement import resolved
from polar_vbll.plots import reliability_diagrams
from polar_vbll.predictives import Predictions
from polar_vbll.provenance import differences, digest
from polar_vbll.results import settings_digest
from polar_vbll.runner import TrainedMember, run_method
from polar_vbll.session import check_architecture, learns_from_labels, load_examples, load_splits
from polar_vbll.tasks.registry import task_folder


@dataclass
class TaskContext:
    """One task's tokenized splits (with their cached prefix states), trainings and predictions shared by
    all its runs."""

    task: str
    splits: dict[str, EncodedSplit]
    answer_ids: list[int]
    trained: dict[str, TrainedMember] = field(default_factory=dict)
    predictions: dict[str, Predictions] = field(default_factory=dict)  # method -> eval-split predictions


def _with_decision(split: dict[str, Any], decision: dict[str, Any] | None) -> dict[str, Any]:
    """A split's metrics plus the decision rule's (fractions): ``answered`` and ``selective_risk`` at the
    target risk, and the conformal sets' ``{lac,aps}_coverage`` and ``{lac,aps}_size``."""
    out = dict(split)
    if decision:
        out.update({"answered": decision["coverage"], "selective_risk": decision["selective_risk"]})
        for score in ("lac", "aps"):
            if decision.get(score):
                out[f"{score}_coverage"] = decision[score]["coverage"]
                out[f"{score}_size"] = decision[score]["mean_size"]
    return out


def compare_record(results: dict[str, Any], task: str, method: str, seed: int) -> dict[str, Any]:
    """One line of ``records.jsonl``: a run's test metrics (fractions) with its decision rule's, its
    temperature-scaled metrics when it has them, the guard block of the test split, per OOD set its metrics
    and AUROCs, validation metrics, cost and provenance."""
    m = results["metrics"]
    training = results["training"]
    scaled = m.get("temperature_scaled")
    chance = m.get("chance")
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "settings": settings_digest(results),
        "metrics": _with_decision(m["eval"], m.get("decision")),
        "ts_metrics": _with_decision(scaled["eval"], scaled.get("decision")) if scaled else None,
        "ts_ood": dict(scaled["ood"]) if scaled else {},
        "temperature": scaled["temperature"] if scaled else None,
        "chance": {k: v for k, v in chance.items() if k != "at_chance"} if chance else None,
        "at_chance": chance["at_chance"] if chance else None,
        "ood": dict(m["ood"]),
        "validation": m["validation"],
        "passes_per_example": results["passes_per_example"],
        "train_s": results["timings"]["train_s"],
        "test_s": results["timings"]["test_s"],
        **cost_columns(results),
        "orthogonality_error": training["orthogonality_error"],
        "stable_rank_mean": training["stable_rank_mean"],
        "head_fits": training.get("head_fits", []),
        "params": results["params"],
    }


def cost_columns(results: dict[str, Any]) -> dict[str, Any]:
    """What a run cost at test time (the paper's Table 3 columns; ``passes_per_example`` is beside them):
    seconds of the evaluation split's prediction per 1,000 questions (without the cheap path's frozen-prefix
    pass, run once per task before), its peak memory in bytes and how that was read (``polar_vbll.peak``);
    None for results written before they were recorded."""
    predict_s = results["timings"].get("test_predict_s")
    n = results["metrics"]["eval"].get("n") or results["split_sizes"].get("eval")
    peak = results.get("peak_memory") or {}
    return {
        "s_per_1k": predict_s / n * 1000 if predict_s is not None and n else None,
        "peak_memory_bytes": peak.get("bytes"),
        "peak_memory_kind": peak.get("kind"),
    }


class CompareRunner:
    def __init__(self, ccfg: CompareConfig, progress: bool = True, track: bool = True):
        self.ccfg = ccfg
        self.progress = progress
        self.track = track
        self.out = Path(ccfg.output_dir) / ccfg.name
        check_output_folder(self.out, "output_dir/name", "comparison")
        # every task's data read and validated before any model loads (as a method that learns from the
        # training answers reads it, so a one-class training split is refused here, not after other runs)
        first = next((m for m in ccfg.methods if learns_from_labels(m)), ccfg.methods[0])
        for task in ccfg.tasks:
            load_examples(self.run_config(first, task, ccfg.seeds[0]))
        # the model, and each adapter kind's layer selection on it (a skeleton, no weights), before anything exists
        for method in {METHODS[m].adapter: m for m in ccfg.methods}.values():
            check_architecture(self.run_config(method, ccfg.tasks[0], ccfg.seeds[0]))
        self.lock = FolderLock(self.out, "polar-vbll compare").acquire()  # one writer, before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        self.records_path = self.out / "records.jsonl"
        (self.out / "compare_config.json").write_text(ccfg.model_dump_json(indent=2))

    # ----------------------------------------------------------------- records
    def load_records(self) -> list[dict[str, Any]]:
        if not self.records_path.is_file():
            return []
        return read_records(self.records_path, "the comparison's records")

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.records_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- configs
    def run_config(self, method: str, task: str, seed: int) -> RunConfig:
        # model.dtype resolved for this process's device (a ConfigError for a device it lacks, before any work)
        return resolved(self.ccfg.run_config(method, task, seed))

    # ----------------------------------------------------------------- one run
    def run_method(self, method: str, task: str, seed: int, ctx: TaskContext, parent=None) -> dict[str, Any]:
        from polar_vbll.tracking import tracked

        cfg = self.run_config(method, task, seed)
        tags = {"polar_vbll.role": "compare-run", "polar_vbll.method": method, "polar_vbll.task": task}
        name = f"{task_folder(task)}/{method}/seed{seed}"
        experiment = f"polar-vbll-compare-{self.ccfg.name}"
        enabled = parent is not None
        with tracked(cfg.run_dir(), experiment, name, cfg.flat_params(), tags, parent, enabled,
                     settings=digest(cfg.flat_params())) as tracker:  # fmt: skip
            outcome = run_method(
                cfg, entry_point="compare", splits=ctx.splits, answer_ids=ctx.answer_ids, trained=ctx.trained,
                resume="matching", zero_shot=False, tracker=tracker, progress=self.progress,
            )  # fmt: skip
        if seed == self.ccfg.seeds[0]:
            ctx.predictions[method] = outcome.evaluation.predictions["eval"]
        return compare_record(outcome.results, task, method, seed)

    # ----------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, Any]]:
        from polar_vbll.tracking import tracked

        c = self.ccfg
        params = {f"compare.{k}": v for k, v in c.model_dump(mode="json").items() if k != "base"}
        params.update({f"base.{k}": v for k, v in resolved(parse_config(c.base_for(c.tasks[0]))).flat_params().items()})
        tags = {"polar_vbll.role": "compare"}
        with tracked(self.out, f"polar-vbll-compare-{c.name}", c.name, params, tags, enabled=self.track) as parent:
            records = self._run_all(parent.target if parent is not None else None)
        self.write_report(records)
        return records

    def current_records(
        self, task: str, records: list[dict[str, Any]], fingerprints: dict[str, str]
    ) -> list[dict[str, Any]]:
        """The records of ``task`` produced by the current settings and data (one per method and seed) whose
        run folder still holds that run; any other is named with what changed, and its run is done again."""
        c = self.ccfg
        out: dict[tuple[str, str, int], dict[str, Any]] = {}
        stale: dict[tuple[str, str, int], str] = {}
        for r in records:
            key = (r["task"], r["method"], r["seed"])
            if key[0] != task or key[1] not in c.methods or key[2] not in c.seeds:
                continue
            cfg = self.run_config(key[1], key[0], key[2])
            params = cfg.flat_params()
            expected = digest({"params": params, "data": fingerprints})
            if r.get("settings") == expected and _holds(cfg.run_dir(), expected):
                out[key] = r
            elif r.get("settings") == expected:
                stale[key] = f"its run folder {cfg.run_dir()} now holds another run"
            elif key not in stale:
                changed = differences(r.get("params", {}), params)
                stale[key] = f"settings changed since it was recorded ({changed or 'the data changed'})"
        for key, why in stale.items():
            if key not in out:
                print(f"-- {key[0]} / {METHODS[key[1]].label} / seed {key[2]}: {why}; it runs again", flush=True)
        return list(out.values())

    def _run_all(self, parent) -> list[dict[str, Any]]:
        c = self.ccfg
        recorded = self.load_records()
        records: list[dict[str, Any]] = []
        for task in c.tasks:
            first = self.run_config(c.methods[0], task, c.seeds[0])
            splits, answer_ids = load_splits(first, load_tokenizer(first.model))
            current = self.current_records(task, recorded, {n: e.fingerprint() for n, e in splits.items()})
            records += current
            done = {(r["method"], r["seed"]) for r in current}
            todo = [(s, m) for s in c.seeds for m in c.methods if (m, s) not in done]
            total = len(c.seeds) * len(c.methods)
            print(f"\n== {task}: {', '.join(f'{n} {len(e)}' for n, e in splits.items())}; {total - len(todo)} of "
                  f"{total} runs already recorded with these settings, {len(todo)} to run", flush=True)  # fmt: skip
            if not todo:
                continue
            ctx = TaskContext(task, splits, answer_ids)
            for seed, method in todo:
                print(f"-- {task} / {METHODS[method].label} / seed {seed}", flush=True)
                record = self.run_method(method, task, seed, ctx, parent)
                self._append(record)
                records.append(record)
            if ctx.predictions:
                reliability_diagrams(
                    {METHODS[m].label: p.accumulator() for m, p in ctx.predictions.items()},
                    self.out / f"reliability_{task_folder(task)}.png",
                    title=f"{task} {first.data.eval_split}, seed {c.seeds[0]}",
                )
        return records

    def write_report(self, records: list[dict[str, Any]]) -> str:
        wanted = [r for r in records if r["task"] in self.ccfg.tasks and r["method"] in self.ccfg.methods]
        labels = {m: METHODS[m].label for m in self.ccfg.methods}
        rows = aggregate(table_rows(_ordered(wanted, self.ccfg), labels))
        table = markdown_table(rows)
        ood = ood_table(rows)
        decisions = decision_table(rows)
        write_csv(wanted, self.out / "results.csv")
        header = (
            f"# {self.ccfg.name}: {len(self.ccfg.methods)} methods x {len(self.ccfg.tasks)} tasks x "
            f"{len(self.ccfg.seeds)} seeds\n\nmean ± std over seeds; ACC and ECE in percent; NLL and Brier from the "
            "predictive probabilities; ECE top-label, 15 equal-width bins; logit var: the mean predictive variance "
            "of the logits (0 for a single deterministic model). Per task, the uniform and majority-class "
            "predictors come first; **at chance** marks a method whose accuracy is below chance + 2 standard "
            "errors: its ECE and NLL then measure abstention, not calibration. '+ TS': the same run's predictive "
            "after temperature scaling fitted on the validation split. Cost at test time (the paper's Table 3): "
            "passes / example: backbone passes per question (the sampled predictives' configured samples, an "
            "ensemble's members); s / 1k q.: wall seconds of the test split's prediction per 1,000 questions "
            "(on the cheap path without the frozen blocks below the adapters, which run once per question before); "
            "peak mem: the process's peak resident set while it predicted (on a GPU: the device's max allocated "
            "memory; † a process-lifetime peak), the largest over seeds; stable rank: the adapters' final "
            "||dW||_F^2 / ||dW||_2^2, averaged over the adapted layers (at most r).\n"
        )
        text = header + "\n" + table + "\n"
        if ood:
            text += ("\n## Out of distribution\n\nEach OOD set's own ACC/ECE/NLL (the shifted-task accuracy, as "
                     "BLoB reports it) and AUROC (%) of telling it from the test set by max-probability, "
                     "predictive entropy and the epistemic score (mutual information; – for a single "
                     "deterministic model).\n\n" + ood + "\n")  # fmt: skip
        if decisions:
            from polar_vbll.config import DecisionConfig

            d = DecisionConfig(**(self.ccfg.base.get("decision") or {}))
            text += (f"\n## Decisions\n\nThe decision rule calibrated on the validation split, applied to the test "
                     f"split: answer when the confidence reaches the Learn-then-Test threshold for selective risk "
                     f"<= {d.risk:g} (probability {1 - d.delta:g}); 'answered' is the fraction of test questions "
                     f"answered and 'risk' their error rate (– when none is answered); conformal sets at alpha "
                     f"{d.alpha:g} (LAC and APS scores): empirical coverage (%) and mean size (choices per set); "
                     "AURC: area under the risk-coverage curve (lower is better; a random ranking scores the error "
                     "rate).\n\n" + decisions + "\n")  # fmt: skip
        (self.out / "results.md").write_text(text)
        print("\n" + table, flush=True)
        if ood:
            print("\n" + ood, flush=True)
        print(f"\ncomparison folder: {self.out.resolve()}", flush=True)
        return table


def _holds(run_dir: Path, expected: str) -> bool:
    """Does the run folder still hold the run of these settings (its results.json)?"""
    path = run_dir / "results.json"
    try:
        return settings_digest(json.loads(path.read_text())) == expected
    except (OSError, ValueError, KeyError):
        return False


def _ordered(records: list[dict[str, Any]], ccfg: CompareConfig) -> list[dict[str, Any]]:
    order = {(t, m): (i, j) for i, t in enumerate(ccfg.tasks) for j, m in enumerate(ccfg.methods)}
    return sorted(records, key=lambda r: (order[(r["task"], r["method"])], r["seed"]))


def run_compare(ccfg: CompareConfig, progress: bool = True, track: bool = True) -> list[dict[str, Any]]:
    runner = CompareRunner(ccfg, progress, track)
    try:
        return runner.run()
    finally:
        runner.lock.release()
