"""Item 3 of issue #6: test-time cost of uncertainty, per example: PoLAR-VBLL's predictive (VBLLHead, MC
over logit samples and probit) against one deterministic forward, MC dropout (10 passes) and a 3-member
ensemble (target: PoLAR-VBLL <= 1.05x a deterministic forward).

The predictors are built by ``common.build_uncertainty_suite`` (each on its own copy of the same random
backbone, all through the library). The one-pass predictors are timed interleaved with ``--reps``
repetitions; MC dropout and the ensemble (10 and 3 passes) in a second interleaved group with fewer
repetitions, with ``polar_det`` timed again inside that group as their reference.

    python bench/uncertainty.py [--threads 1] [--reps 10] [--n-batches 2] [--out DIR]
"""

from __future__ import annotations

import warnings

import torch
from common import (
    Report,
    Shape,
    Stat,
    build_uncertainty_suite,
    common_args,
    interleaved,
    make_batch,
    md_table,
    paired_ratios,
    set_threads,
)


def main() -> None:
    p = common_args(__doc__.splitlines()[0], reps=10, warmup=1)
    p.add_argument("--n-batches", type=int, default=2, help="test batches (examples = n-batches x batch)")
    p.add_argument("--multi-reps", type=int, default=3, help="repetitions of MC dropout / ensemble")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="clock of the ratios")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    shape = Shape.from_args(args)
    rep = Report("uncertainty", "3. Test-time cost of uncertainty")
    batches = [make_batch(args.batch, args.seq, shape.vocab, seed=100 + i) for i in range(args.n_batches)]
    suite = build_uncertainty_suite(shape, batches, r=args.rank)

    # the predictive probabilities must be valid before their cost means anything
    for name, fn in {**suite.single, **suite.multi}.items():
        probs = fn()
        if not torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-4):
            raise RuntimeError(f"{name}: probabilities do not sum to 1")

    single = interleaved(suite.single, reps=args.reps, warmup=args.warmup)
    multi = interleaved(suite.multi, reps=args.multi_reps, warmup=0)
    n = suite.n_examples
    clock = args.clock
    s_t, m_t = single.get(clock), multi.get(clock)
    ref = s_t["polar_det"]
    rows = []
    for name, ts in s_t.items():
        per = Stat.of([t / n for t in ts])
        rows.append(
            [
                f"`{name}`",
                "1",
                per.ms(2),
                paired_ratios(ts, ref).ratio(),
                paired_ratios(ts, s_t["lora_det"]).ratio(),
            ]
        )
    m_ref = m_t["polar_det"]
    for name, ts in m_t.items():
        if name == "polar_det":
            continue
        passes = suite.n_mc if name.startswith("mc_dropout") else suite.n_members
        per = Stat.of([t / n for t in ts])
        rows.append([f"`{name}`", str(passes), per.ms(2), paired_ratios(ts, m_ref).ratio(), "-"])
    rep.add(
        f"Setup: {shape.describe()}; fp32; {n} test prompts ({args.n_batches} batches of {args.batch} x "
        f"{args.seq} tokens); adapters rank {args.rank} on q, k, v, up, down; K=4 classes; VBLL diagonal "
        f"covariance, MC predictive with 1000 logit samples. Clock: {clock} time. One-pass rows: "
        f"{args.warmup} warmup + {args.reps} interleaved repetitions; MC dropout / ensemble: "
        f"{args.multi_reps} repetitions interleaved with `polar_det`. Per-example ms: median (IQR); ratios: "
        "median (IQR) of per-round ratios."
        "\n\n"
        + md_table(
            [
                "predictor",
                "backbone passes",
                "ms / example",
                "x deterministic forward (`polar_det`)",
                "x LoRA deterministic forward",
            ],
            rows,
        )
    )
    rep.data.update(single_s=single, multi_s=multi, n_examples=n)
    r_mc = paired_ratios(s_t["polar_vbll_mc"], ref)
    r_probit = paired_ratios(s_t["polar_vbll_probit"], ref)
    r_merged = paired_ratios(s_t["polar_merged_vbll_mc"], s_t["polar_merged_det"])
    rep.verdict("PoLAR-VBLL (MC predictive) / deterministic forward", r_mc.median, 1.05)
    rep.verdict("PoLAR-VBLL (probit predictive) / deterministic forward", r_probit.median, 1.05)
    rep.verdict("merged PoLAR-VBLL (MC) / merged deterministic forward", r_merged.median, 1.05)
    rep.finish(args.out)


if __name__ == "__main__":
    main()
