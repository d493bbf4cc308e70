"""Decisions on SST-2's test split with ``polar-vbll calibrate`` and ``polar-vbll predict``, as a user runs
them, for every method of a finished comparison (3 seeds), beside the uniform and majority-class predictors.

For each run folder ``<compare>/sst2/<method>/seed<s>``:

1. ``polar-vbll calibrate RUN --risk R --delta D --alpha A`` on the run's validation split (174 questions);
2. ``polar-vbll predict RUN --input sst2_test.jsonl --output ...`` (the test split written as a user's JSONL,
   answers included so the summary can score it);
3. ``polar-vbll predict ... --coverage 0.5`` (the same stored calibration data refitted to answer half of
   the questions: no guarantee, the risk-coverage trade-off at one point).

From the decision records: test accuracy, AURC, the fraction answered and their error rate at the
risk-controlled threshold, the conformal sets' coverage and mean size (LAC, APS), the fraction flagged OOD
(in-distribution questions: about 1 - ood_pass expected), and the risk at 50% coverage. Nothing is tuned on
the test split: every threshold comes from validation.

    python bench/predict_sst2.py runs/quick [--risk 0.3] [--out bench/results/predict_sst2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_vbll.decisions.conformal import set_metrics  # noqa: E402
from polar_vbll.decisions.rule import CalibrationData, DecisionRule, RuleSettings  # noqa: E402
from polar_vbll.decisions.selective import aurc  # noqa: E402
from polar_vbll.methods import METHODS  # noqa: E402
from polar_vbll.tasks import load_task  # noqa: E402

METHOD_ORDER = ("linear_probe", "polar_mle", "polar_laplace", "polar_vbll", "lora_mle", "laplace", "vbll_lora",
                "mc_dropout", "ensemble")  # fmt: skip


def _cli(*args: str) -> str:
    exe = Path(sys.executable).with_name("polar-vbll")
    out = subprocess.run([str(exe), *args, "--no-progress"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"polar-vbll {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def _scores(records: list[dict]) -> dict[str, float | None]:
    conf = np.array([r["confidence"] for r in records])
    ok = np.array([r["correct"] for r in records], dtype=float)
    answered = np.array([r["decision"] == "answer" for r in records])
    out = {"acc": float(ok.mean()), "aurc": aurc(conf, ok), "answered": float(answered.mean()),
           "risk": float(1 - ok[answered].mean()) if answered.any() else None,
           "ood_flagged": float(np.mean([r["ood"] for r in records]))}  # fmt: skip
    for s in ("lac", "aps"):
        has = records[0][f"set_{s}"] is not None  # APS: None on two-choice questions (MAPIE: LAC only)
        out[f"{s}_coverage"] = float(np.mean([r["label"] in r[f"set_{s}"] for r in records])) if has else None
        out[f"{s}_size"] = float(np.mean([len(r[f"set_{s}"]) for r in records])) if has else None
    return out


def _reference(name: str, probs_val, probs_test, yv, yt, settings: RuleSettings) -> dict:
    """The uniform / majority-class predictor through the same rule (constant probabilities)."""
    rule = DecisionRule.fit(CalibrationData(probs_val, yv, torch.full((len(yv),), 2), torch.zeros(len(yv))), settings)
    d = rule.decide(probs_test, torch.zeros(len(yt)), torch.full((len(yt),), 2))
    ok = (torch.as_tensor(d.answer) == yt).double().numpy()
    answered = ~d.abstain
    out = {"acc": float(ok.mean()), "aurc": aurc(d.confidence, ok), "answered": float(answered.mean()),
           "risk": float(1 - ok[answered].mean()) if answered.any() else None, "ood_flagged": float(d.ood.mean())}
    for s in ("lac", "aps"):
        m = set_metrics(d.sets[s], yt) if s in d.sets else {"coverage": None, "mean_size": None}
        out[f"{s}_coverage"], out[f"{s}_size"] = m["coverage"], m["mean_size"]
    cov = rule.with_settings(coverage=0.5)
    d2 = cov.decide(probs_test, torch.zeros(len(yt)), torch.full((len(yt),), 2))
    a2 = ~d2.abstain
    out["risk_at_50"] = float(1 - ok[a2].mean()) if a2.any() else None
    out["answered_at_50"] = float(a2.mean())
    return out


def _fmt(vals: list, scale: float, digits: int) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    m = statistics.fmean(v * scale for v in vals)
    s = statistics.stdev([v * scale for v in vals]) if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}" + (f" ({len(vals)})" if len(vals) < 3 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compare", type=Path, help="a finished comparison folder holding sst2/<method>/seed<s>")
    ap.add_argument("--risk", type=float, default=0.3)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHOD_ORDER))
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict_sst2"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()[0]

    test = load_task("sst2", "test", seed=0)
    qfile = args.out / "sst2_test.jsonl"
    qfile.write_text("".join(json.dumps({"id": e.uid, "question": e.question, "choices": list(e.choices),
                                         "answer": e.answer}) + "\n" for e in test))  # fmt: skip
    rows: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            run = args.compare / "sst2" / method / f"seed{seed}"
            if not (run / "config.yaml").is_file():
                print(f"skip {run}: no run folder", flush=True)
                continue
            t = time.time()
            _cli("calibrate", str(run), "--risk", str(args.risk), "--delta", str(args.delta),
                 "--alpha", str(args.alpha))  # fmt: skip
            dec = args.out / f"{method}_seed{seed}.jsonl"
            _cli("predict", str(run), "-i", str(qfile), "-o", str(dec))
            recs = [json.loads(line) for line in dec.read_text().splitlines()]
            row = _scores(recs)
            half = args.out / f"{method}_seed{seed}_cov50.jsonl"
            _cli("predict", str(run), "-i", str(qfile), "-o", str(half), "--coverage", "0.5")
            h = [json.loads(line) for line in half.read_text().splitlines()]
            ans = [r for r in h if r["decision"] == "answer"]
            row["risk_at_50"] = 1 - sum(r["correct"] for r in ans) / len(ans) if ans else None
            row["answered_at_50"] = len(ans) / len(h)
            rule = json.loads((run / "decision" / "rule.json").read_text())
            row["tau"], row["val_answered"] = rule["threshold"]["tau"], rule["threshold"]["coverage"]
            row["seconds"] = time.time() - t
            rows.setdefault(METHODS[method].label, []).append(row)
            print(f"{method} seed {seed}: {json.dumps(row)}", flush=True)
            for f in (dec, half):
                f.unlink()  # the records are summarised below; the files are large and reproducible

    val = load_task("sst2", "validation", seed=0, limit=200)
    train = load_task("sst2", "train", seed=0, limit=600)
    yv, yt = torch.tensor([e.answer for e in val]), torch.tensor([e.answer for e in test])
    settings = RuleSettings(risk=args.risk, delta=args.delta, alpha=args.alpha)
    freq = torch.bincount(torch.tensor([e.answer for e in train]), minlength=2).double()
    refs = {"uniform predictor": torch.full((2,), 0.5, dtype=torch.float64),
            "majority-class predictor": freq / freq.sum()}  # fmt: skip
    for name, p in refs.items():
        rows[name] = [_reference(name, p.expand(len(yv), 2), p.expand(len(yt), 2), yv, yt, settings)]

    header = ["Method", "ACC (%)", "AURC", f"answered at r={args.risk:g} (%)", "risk of answered (%)",
              "LAC coverage (%)", "LAC size", "APS coverage (%)", "APS size", "risk at 50% answered (%)",
              "flagged OOD (%)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = ["uniform predictor", "majority-class predictor"] + [k for k in rows if "predictor" not in k]
    for name in order:
        rs = rows[name]
        def col(k: str, rs: list[dict] = rs) -> list:
            return [r[k] for r in rs]

        lines.append("| " + " | ".join([name, _fmt(col("acc"), 100, 1), _fmt(col("aurc"), 1, 3),
            _fmt(col("answered"), 100, 1), _fmt(col("risk"), 100, 1), _fmt(col("lac_coverage"), 100, 1),
            _fmt(col("lac_size"), 1, 2), _fmt(col("aps_coverage"), 100, 1), _fmt(col("aps_size"), 1, 2),
            _fmt(col("risk_at_50"), 100, 1), _fmt(col("ood_flagged"), 100, 1)]) + " |")  # fmt: skip
    meta = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": platform.platform(), "cpus": os.cpu_count(), "load_start": load0,
            "load_end": os.getloadavg()[0], "wall_s": time.time() - t0, "risk": args.risk, "delta": args.delta,
            "alpha": args.alpha, "n_test": len(test), "n_validation": len(val)}  # fmt: skip
    (args.out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
