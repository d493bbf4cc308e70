"""Item 1 of issue #6: one training step of PoLAR(-VBLL) against PEFT LoRA, same model, rank, targets,
batch and sequence length (CPU; fp32 backbone, or ``--dtype bfloat16``): step time and peak memory ratios,
and where the time goes.

Configurations (each on its own copy of the same random backbone):

- ``lora``: peft LoRA + the deterministic head (frozen LM-head answer rows, CE loss); AdamW on A, B.
- ``polar``: PoLAR + the same deterministic head; StiefelOptimizer on U, V (the trainer's defaults:
  Riemannian Adam, CholQR2, elementwise second moment), AdamW on Theta. The adapter-only comparison.
- ``polar_vbll``: PoLAR + the VBLL head (its ELBO as the loss, and the per-step eta-phase: one Adam step of
  the head on the detached features). The with-head comparison.

Timing: round-robin over the configurations (``common.interleaved``), ratios are medians of per-round
ratios. Memory: one fresh subprocess per configuration (``bench/memprobe.py``).

    python bench/train_step.py [--threads 2] [--reps 10] [--profile] [--dtype bfloat16] [--out bench/out]
"""

from __future__ import annotations

import warnings

import torch
from common import (
    PHASES,
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
    paired_ratios,
    probe_memory,
    set_threads,
)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CONFIGS = {  # name -> (adapter kind, head kind)
    "lora": ("lora", "det"),
    "polar": ("polar", "det"),
    "polar_vbll": ("polar", "vbll"),
}


def profile_table(steps: dict[str, TrainStep], batch, rows: int = 12) -> str:
    """Top operators by self CPU time over 3 steps of each configuration (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(batch)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        table = md_table(
            ["op", "calls / step", "self CPU ms / step", "share"],
            [
                [
                    f"`{e.key}`",
                    f"{e.count / 3:.0f}",
                    f"{e.self_cpu_time_total / 3e3:.1f}",
                    f"{100 * e.self_cpu_time_total / total:.1f}%",
                ]
                for e in events
            ],
        )
        out.append(f"Profile of `{name}` (top {rows} ops by self CPU time, mean of 3 steps):\n\n{table}")
    return "\n\n".join(out)


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table per configuration")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="clock of the table and ratios")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="backbone dtype (adapters, factors and heads stay fp32 either way)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    shape = Shape.from_args(args)
    targets = tuple(args.targets.split(","))
    suffix = "" if args.dtype == "float32" else "_bf16"
    rep = Report(f"train_step{suffix}", f"1. Training step: PoLAR(-VBLL) vs PEFT LoRA ({args.dtype} backbone)")

    batch = make_batch(args.batch, args.seq, shape.vocab)
    steps: dict[str, TrainStep] = {}
    for name, (kind, head) in CONFIGS.items():
        model = build_llama(shape, dtype=DTYPE[args.dtype])
        adapter = attach_adapter(model, AdapterSpec(kind, r=args.rank, targets=targets))
        steps[name] = TrainStep(adapter, make_head(model, head), OptimSpec())
    n_layers = len(steps["polar"].adapter.theta_parameters())

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
    times = timings.get(args.clock)
    sfx = "_cpu" if args.clock == "cpu" else ""
    stats = {n: Stat.of(t) for n, t in times.items()}
    tok = args.batch * args.seq

    rep.add(
        f"Setup: {shape.describe()}; backbone {args.dtype}; batch {args.batch} x {args.seq} tokens; "
        f"rank {args.rank} on "
        f"{', '.join(targets)} of every block ({n_layers} adapted linears); {args.warmup} warmup + "
        f"{args.reps} timed steps per configuration, interleaved. Times: median (IQR) in ms of {args.clock} "
        "time (CPU time of the process with one torch thread: the work done, little affected by the other "
        "jobs sharing the machine; wall time shown for reference)."
    )
    rows = []
    for n, s in stats.items():
        ph = {k: Stat.of([d.get(k + sfx, 0.0) for d in phases[n]]).median for k in PHASES}
        rows.append(
            [f"`{n}`", s.ms(), Stat.of(timings.wall[n]).ms(0), f"{tok / s.median:.0f}"]
            + [f"{ph[k] * 1e3:.1f}" if ph[k] > 0 else "-" for k in PHASES]
        )
    rep.add(
        md_table(
            ["config", f"step ms ({args.clock})", "step ms (wall)", "tokens/s"] + [f"{k} ms" for k in PHASES],
            rows,
        )
    )
    r_adapter = paired_ratios(times["polar"], times["lora"])
    r_head = paired_ratios(times["polar_vbll"], times["lora"])
    r_headcost = paired_ratios(times["polar_vbll"], times["polar"])
    ratio_rows = [
        ["PoLAR / LoRA (adapter only, both deterministic head)", r_adapter.ratio()],
        ["PoLAR-VBLL / LoRA (with head: VBLL ELBO + eta step vs CE)", r_head.ratio()],
        ["PoLAR-VBLL / PoLAR (cost of the VBLL head)", r_headcost.ratio()],
    ]
    rep.add(
        "Step-time ratios (median (IQR) of per-round ratios):\n\n" + md_table(["ratio", "value"], ratio_rows)
    )
    r_wall = paired_ratios(timings.wall["polar_vbll"], timings.wall["lora"])
    rep.add(f"For reference, the same PoLAR-VBLL / LoRA ratio in wall time: {r_wall.ratio()}.")
    rep.data.update(timings=timings, phases_s=phases, ratio_adapter=r_adapter, ratio_with_head=r_head)

    if not args.no_memory:
        mem = {}
        for name, (kind, head) in CONFIGS.items():
            spec = {
                "shape": shape.__dict__,
                "adapter": {"kind": kind, "r": args.rank, "targets": list(targets)},
                "head": head,
                "batch": args.batch,
                "seq": args.seq,
                "threads": args.threads,
                "dtype": args.dtype,
            }
            mem[name] = probe_memory(spec)
        base = mem["lora"]
        mrows = [
            [
                f"`{n}`",
                f"{m['rss_setup_kib'] / 1024:.0f}",
                f"{m['peak_kib'] / 1024:.0f}",
                f"{m['overhead_kib'] / 1024:.0f}",
                f"{m['peak_kib'] / base['peak_kib']:.3f}",
                f"{m['overhead_kib'] / max(base['overhead_kib'], 1):.3f}",
            ]
            for n, m in mem.items()
        ]
        rep.add(
            "Peak memory (fresh process per configuration, 3 steps; RSS in MiB; 'training' = peak minus RSS "
            "after setup, i.e. activations + gradients + optimizer state):\n\n"
            + md_table(
                ["config", "RSS after setup", "peak RSS", "training", "peak / LoRA", "training / LoRA"], mrows
            )
        )
        rep.data["memory_kib"] = mem

    if args.profile:
        rep.add(profile_table(steps, batch))

    rep.verdict("PoLAR step time / LoRA (adapter only)", r_adapter.median, 1.0)
    rep.verdict("PoLAR-VBLL step time / LoRA (with head)", r_head.median, 1.0)
    rep.finish(args.out)


if __name__ == "__main__":
    main()
