"""Item 2 of issue #6: the share of a PoLAR-VBLL training step spent in the Stiefel optimizer step, for
each retraction (CholQR2, QR, polar) of the Riemannian method and for the landing field (target <= 2%).

Part A: full PoLAR-VBLL training steps on the small CPU model, one model copy per optimizer variant,
interleaved; the Stiefel phase is timed inside each step. A LoRA step is included as the reference for
what an ordinary AdamW step on the same number of adapter weights costs.

Part B: the Stiefel step alone on the factor layout of the TinyLlama-1.1B shape (every U and V of q, k, v,
up, down at rank 8: 220 factors in 3 shape groups) with random gradients, to show how it scales to the GPU
benchmark's model (whose training step only the GPU can time: see bench/gpu.py).

    python bench/stiefel_share.py [--threads 1] [--reps 10] [--out DIR]
"""

from __future__ import annotations

import warnings

import torch
from common import (
    DEFAULT_TARGETS,
    TINYLLAMA,
    AdapterSpec,
    OptimSpec,
    Report,
    Shape,
    Stat,
    TrainStep,
    attach_adapter,
    build_llama,
    common_args,
    interleaved,
    make_batch,
    make_head,
    md_table,
    set_threads,
)

VARIANTS = {
    "landing": OptimSpec(method="landing"),
    "riemannian/cholqr2": OptimSpec(retraction="cholqr2"),
    "riemannian/qr": OptimSpec(retraction="qr"),
    "riemannian/polar": OptimSpec(retraction="polar"),
}


def tinyllama_groups(r: int = 8, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[tuple[int, int, int]]:
    """(G, n, r) of the bank groups PoLAR builds for the TinyLlama shape (one U and one V per layer)."""
    s = TINYLLAMA
    kv = s.hidden // s.heads * s.kv_heads
    dims = {  # name -> (in, out)
        "q_proj": (s.hidden, s.hidden),
        "k_proj": (s.hidden, kv),
        "v_proj": (s.hidden, kv),
        "o_proj": (s.hidden, s.hidden),
        "gate_proj": (s.hidden, s.intermediate),
        "up_proj": (s.hidden, s.intermediate),
        "down_proj": (s.intermediate, s.hidden),
    }
    counts: dict[int, int] = {}
    for t in targets:
        i, o = dims[t]
        for n in (o, i):
            counts[n] = counts.get(n, 0) + s.layers
    return [(g, n, r) for n, g in sorted(counts.items())]


def part_b(reps: int, warmup: int) -> tuple[str, dict]:
    from polar_vbll.manifold import random_stiefel
    from polar_vbll.optim import StiefelOptimizer

    groups = tinyllama_groups()
    fns = {}
    gen = torch.Generator().manual_seed(0)
    for name, o in VARIANTS.items():
        params = [torch.nn.Parameter(random_stiefel(g, n=n, r=r, generator=gen)) for g, n, r in groups]
        for p in params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
        opt = StiefelOptimizer(
            params, lr=o.lr, method=o.method, retraction=o.retraction, second_moment=o.second_moment
        )
        fns[name] = opt.step
    adam_params = [torch.nn.Parameter(torch.randn(g * n * r // 8, 8)) for g, n, r in groups]
    for p in adam_params:
        p.grad = torch.randn_like(p)
    fns["AdamW on the same number of weights"] = torch.optim.AdamW(adam_params).step
    times = interleaved(fns, reps=reps, warmup=warmup).cpu
    n_f = sum(g for g, _, _ in groups)
    rows = [[f"`{k}`", Stat.of(v).ms(1)] for k, v in times.items()]
    layout = ", ".join(f"{g} x ({n}, {r})" for g, n, r in groups)
    text = (
        f"Part B: the Stiefel step alone at the TinyLlama-1.1B factor layout ({n_f} factors: {layout}), "
        f"fp32 on this CPU, {reps} interleaved repetitions; CPU ms median (IQR):\n\n"
        + md_table(["optimizer step", "ms"], rows)
    )
    return text, {"groups": groups, "times_s": times}


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--skip-part-b", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    shape = Shape.from_args(args)
    rep = Report("stiefel_share", "2. Stiefel step share of a PoLAR-VBLL training step")
    batch = make_batch(args.batch, args.seq, shape.vocab)

    steps: dict[str, TrainStep] = {}
    base = build_llama(shape)
    import copy

    for name, o in VARIANTS.items():
        model = copy.deepcopy(base)
        steps[name] = TrainStep(
            attach_adapter(model, AdapterSpec("polar", r=args.rank)), make_head(model, "vbll"), o
        )
    model = copy.deepcopy(base)
    steps["LoRA (reference)"] = TrainStep(
        attach_adapter(model, AdapterSpec("lora", r=args.rank)), make_head(model, "det"), OptimSpec()
    )
    del base
    phases: dict[str, list[dict[str, float]]] = {n: [] for n in steps}

    def run(name: str) -> None:
        d: dict[str, float] = {}
        steps[name](batch, d)
        phases[name].append(d)

    timings = interleaved(
        {n: (lambda n=n: run(n)) for n in steps},
        reps=args.reps,
        warmup=args.warmup,
        on_warm=lambda: [v.clear() for v in phases.values()],
    )
    times = timings.cpu
    rows = []
    shares = {}
    for n, ts in times.items():
        opt_key = "stiefel" if n in VARIANTS else "adamw"
        opt_t = [d[opt_key + "_cpu"] for d in phases[n]]
        share = Stat.of([o / t for o, t in zip(opt_t, ts, strict=True)])
        shares[n] = share
        rows.append(
            [
                f"`{n}`",
                Stat.of(ts).ms(1),
                Stat.of(opt_t).ms(2),
                f"{100 * share.median:.2f}% ({100 * share.q25:.2f}–{100 * share.q75:.2f})",
                f"{100 * Stat.of(opt_t).median / Stat.of(ts).median:.2f}%",
            ]
        )
    rep.add(
        f"Part A: {shape.describe()}; fp32; batch {args.batch} x {args.seq}; PoLAR rank {args.rank} on "
        f"q, k, v, up, down; VBLL head; {args.warmup} warmup + {args.reps} timed steps per variant, "
        "interleaved; CPU time of the process (one torch thread). The optimizer column is the Stiefel step "
        "for PoLAR, the AdamW step on A, B for LoRA."
        "\n\n"
        + md_table(
            [
                "variant",
                "step ms",
                "optimizer step ms",
                "share (median of per-step shares)",
                "ratio of medians",
            ],
            rows,
        )
    )
    rep.data.update(times_s=times, phases_s=phases, shares=shares)
    if not args.skip_part_b:
        text, data = part_b(max(3, args.reps // 2), 1)
        rep.add(text)
        rep.data["part_b"] = data
    for n in VARIANTS:
        rep.verdict(f"Stiefel step share, {n}", 100 * shares[n].median, 2.0, unit="%")
    rep.finish(args.out)


if __name__ == "__main__":
    main()
