"""Which head settings to make the default: the VBLL head's [choice]s (feature standardisation, the prior
variance: fixed, empirical Bayes or the evidence; the covariance: diagonal or dense; the ELBO's data term:
Jensen bound or Monte Carlo; the post-hoc Laplace refinement at the VBLL mean) on real features, chosen on
the VALIDATION split (the test split is printed for the record only, never used to choose).

Features: the bundled SmolLM2-135M-Instruct's frozen final hidden state (PoLAR adapters at init, W = W0
exactly) on a task's seeded splits, computed once through the frozen-prefix cache. Each variant fits a head
on the training features alone (the eta-phase a run starts with); the uniform and majority-class
predictors and MAP / MLE linear heads on the same features stand beside it.

    python bench/head_choices.py --task sst2 [--out bench/results/head_choices_sst2.json]
    python bench/head_choices.py --task hf:../shared/data/sst5 --train-limit 2000 --only-new
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_vbll.config import parse_config  # noqa: E402
from polar_vbll.features import FeatureSource  # noqa: E402
from polar_vbll.heads.features import FeatureMapConfig  # noqa: E402
from polar_vbll.heads.fit import fit_to_convergence  # noqa: E402
from polar_vbll.heads.laplace import LastLayerLaplace  # noqa: E402
from polar_vbll.heads.linear import LinearHead  # noqa: E402
from polar_vbll.heads.probe import fit_probe  # noqa: E402
from polar_vbll.heads.vbll import VBLLHead  # noqa: E402
from polar_vbll.metrics import summarize  # noqa: E402
from polar_vbll.session import build_session  # noqa: E402
from polar_vbll.training.coordinator import HeadCoordinator  # noqa: E402


def features(task: str, train_limit: int | None = None
             ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:  # fmt: skip
    cfg = parse_config({
        "data": {"task": task, "eval_split": "test", "train_limit": train_limit},
        "polar": {"layers": [-4, -3, -2, -1], "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj",
                                                                  "down_proj"]},
    })  # fmt: skip
    session = build_session(cfg)
    source = FeatureSource.for_config(session.adapter.base_model, session.tokenizer.pad_token_id, cfg.train)
    out = {}
    for name in ("train", "validation", "eval"):
        enc = session.splits[name]
        phi = source.split_features(enc, 32, progress=True)
        out[name] = (phi, enc.labels.clone(), enc.n_choices.clone())
    return out, session.zero_shot_head.weight.detach().clone()


def metrics(head, split) -> dict[str, float]:
    phi, y, c = split
    with torch.no_grad():
        probs = head.predict_proba(phi, c)
        m = summarize(probs, y)
        mv = head.logit_moments(phi, c)[1] if hasattr(head, "logit_moments") else torch.zeros_like(probs)
    valid = torch.arange(probs.shape[1]).unsqueeze(0) < c.unsqueeze(1)
    m["logit_var"] = float(mv[valid].mean())
    return m


def constant(probs_row: torch.Tensor, split) -> dict[str, float]:
    _, y, c = split
    probs = probs_row.expand(len(y), -1).clone()
    return summarize(probs, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--train-limit", type=int, default=None, help="training questions (default: all)")
    ap.add_argument("--only-new", action="store_true", help="skip the variants behind the old defaults")
    args = ap.parse_args()
    t0 = time.time()
    splits, lm_rows = features(args.task, args.train_limit)
    train, val, test = splits["train"], splits["validation"], splits["eval"]
    n, k = len(train[1]), lm_rows.shape[0]
    rows: dict[str, dict] = {}
    counts = torch.bincount(train[1], minlength=k).double()
    rows["uniform"] = {"validation": constant(torch.full((k,), 1.0 / k), val),
                       "test": constant(torch.full((k,), 1.0 / k), test)}  # fmt: skip
    prior = (counts / counts.sum()).float()
    rows["majority (class frequencies)"] = {"validation": constant(prior, val), "test": constant(prior, test)}
    std = FeatureMapConfig(standardize=True, bias=True)
    raw = FeatureMapConfig(standardize=False, bias=True)
    old = {
        # the old default: raw features, no bias, covariance at 1e-3 x prior, 100 Adam steps (lr 1e-2)
        "VBLL raw, fixed prior, Adam x100 (old)": (None, {"prior_fit": "fixed", "init_cov_scale": 1e-3}, "adam"),
        "VBLL raw+bias, fixed prior, L-BFGS": (raw, {"prior_fit": "fixed"}, "lbfgs"),
        "VBLL raw+bias, empirical Bayes, L-BFGS": (raw, {"prior_fit": "empirical_bayes"}, "lbfgs"),
        "VBLL standardised+bias, empirical Bayes, L-BFGS": (std, {"prior_fit": "empirical_bayes"}, "lbfgs"),
    }
    new = {  # standardised + bias, L-BFGS (the defaults since issue 12); each also refined by Laplace at its mean
        "VBLL fixed prior (default)": (std, {"prior_fit": "fixed"}, "lbfgs"),
        "VBLL evidence prior": (std, {"prior_fit": "evidence"}, "lbfgs"),
        "VBLL fixed prior, MC ELBO": (std, {"prior_fit": "fixed", "elbo": "mc"}, "lbfgs"),
        "VBLL evidence prior, MC ELBO": (std, {"prior_fit": "evidence", "elbo": "mc"}, "lbfgs"),
        "VBLL dense, fixed prior": (std, {"prior_fit": "fixed", "cov": "dense"}, "lbfgs"),
        "VBLL dense, evidence prior": (std, {"prior_fit": "evidence", "cov": "dense"}, "lbfgs"),
    }
    variants = new if args.only_new else {**old, **new}
    fit_cfg = parse_config({}).head.fit
    for name, (fm, vcfg, opt) in variants.items():
        head = VBLLHead.from_weight(lm_rows, n, vcfg, features=fm)
        coord = HeadCoordinator(head, fit_cfg.model_copy(update={"optimizer": opt}))
        t = time.time()
        coord.refit(*train)
        rows[name] = {"validation": metrics(coord.head, val), "test": metrics(coord.head, test),
                      "train": metrics(coord.head, train), "fit": coord.last_report, "fit_s": time.time() - t,
                      "prior_var": coord.head.prior_var,
                      "jensen_gap": coord.head.jensen_gap(train[0], train[1], train[2], n_samples=200)}  # fmt: skip
        print(name, json.dumps({k: rows[name][k] for k in ("validation", "fit", "jensen_gap")}, default=str),
              flush=True)  # fmt: skip
        if name in new:  # the paper's hybrid: last-layer Laplace centred at this head's mean, evidence prior
            la = LastLayerLaplace(coord.head.vbll_mean, None, feature_map=coord.head.feature_map,
                                  structure="full" if coord.head.vbll_mean.numel() <= 16384 else "kron"
                                  ).fit(*train)  # fmt: skip
            rows[name + " + LA"] = {"validation": metrics(la, val), "test": metrics(la, test),
                                    "prior_precision": la.prior_precision}  # fmt: skip
            print(name + " + LA", json.dumps(rows[name + " + LA"]["validation"]), flush=True)
    probe = fit_probe(LinearHead(lm_rows, dataset_size=n, features=std), *train, fit_cfg)
    rows["linear probe (MAP, evidence prior: MacKay)"] = {"validation": metrics(probe, val),
                                                          "test": metrics(probe, test), "prior_var": probe.prior_var}
    la = LastLayerLaplace.from_head(probe, prior_precision=1 / probe.prior_var).fit(*train)
    rows["linear probe + LL-Laplace"] = {"validation": metrics(la, val), "test": metrics(la, test)}
    for name, fm, p in (("MAP linear, standardised+bias (prior 2/D)", std, "gaussian"),
                        ("MAP linear, raw+bias (prior 2/D)", raw, "gaussian")):  # fmt: skip
        head = LinearHead(lm_rows, dataset_size=n, features=fm, prior=p)
        head.fit_features(train[0])
        report = fit_to_convergence(head, *train)
        rows[name] = {"validation": metrics(head, val), "test": metrics(head, test), "train": metrics(head, train),
                      "fit": report.as_dict()}  # fmt: skip
        print(name, json.dumps(rows[name]["validation"]), report.as_dict(), flush=True)
    rows["zero-shot (LM-head rows)"] = {}
    from polar_vbll.heads.deterministic import DeterministicHead

    zs = DeterministicHead(lm_rows)
    rows["zero-shot (LM-head rows)"] = {s: summarize(zs.predict_proba(v[0], v[2]), v[1])
                                        for s, v in (("validation", val), ("test", test))}  # fmt: skip
    out = {
        "task": args.task, "n_train": n, "n_validation": len(val[1]), "n_test": len(test[1]),
        "feature_norm_mean": float(train[0].norm(dim=1).mean()), "rows": rows,
        "machine": f"{platform.node()} {os.cpu_count()} cpus", "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.time() - t0,
    }  # fmt: skip
    print(f"\n{args.task}: N_train={n}, ||phi|| mean {out['feature_norm_mean']:.1f}")
    print("| head | val ACC | val NLL | val ECE | test ACC | test NLL | test ECE | mean logit var (val) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        v, t = r["validation"], r["test"]
        lv = v.get("logit_var", math.nan)
        print(f"| {name} | {100 * v['acc']:.1f} | {v['nll']:.3f} | {100 * v['ece']:.1f} | {100 * t['acc']:.1f} | "
              f"{t['nll']:.3f} | {100 * t['ece']:.1f} | {lv:.3g} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
