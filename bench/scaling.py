"""Item 5 of issue #6: how the training-step cost of PoLAR-VBLL (and of PEFT LoRA, the reference) grows
with the work: adapter rank (4-64), sequence length, and number of adapted blocks (the top k blocks),
compared with what a FLOP count predicts.

FLOP model (per step, matmuls only; T tokens, P = weights of the linear layers of one block,
A = sum over the adapted linears of one block of (in + out), L = blocks, k = adapted top blocks):

- backbone forward over all L blocks: 2 P T L, plus attention 4 T s d per block (s = sequence length);
- backward through the k adapted blocks only (autograd stops below the lowest block with a trainable
  parameter; the backbone is frozen, so only input gradients): 2 P T k, attention 8 T s d per block;
- adapters: 6 r A T k (+ 6 r^2 T per linear for PoLAR's core), forward, input and weight gradients;
- optimizer: AdamW is O(n r) per factor; the Riemannian Stiefel step is O(n r^2) per factor (Gram
  matrices, projections, the retraction's triangular products) plus O(r^3) (Cholesky), independent of T.

Elementwise work (norms, activations, the adapter's scale and add) is not in the model, so measured time
grows less than FLOPs wherever matmuls are not all the cost. Each point times LoRA and PoLAR-VBLL
interleaved (CPU time of the process, one thread).

    python bench/scaling.py [--threads 1] [--reps 4] [--out DIR]
"""

from __future__ import annotations

import copy
import warnings

from common import (
    DEFAULT_TARGETS,
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
    set_threads,
)


def linear_dims(shape: Shape) -> dict[str, tuple[int, int]]:
    kv = shape.hidden // shape.heads * shape.kv_heads
    h, i = shape.hidden, shape.intermediate
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def step_flops(shape: Shape, batch: int, seq: int, r: int, k: int, polar: bool) -> float:
    """Matmul FLOPs of one training step (see the module docstring)."""
    dims = linear_dims(shape)
    p = sum(i * o for i, o in dims.values())
    a = sum(i + o for n, (i, o) in dims.items() if n in DEFAULT_TARGETS)
    n_lin = len(DEFAULT_TARGETS)
    t = batch * seq
    attn_fwd = 4 * t * seq * shape.hidden
    fwd = shape.layers * (2 * p * t + attn_fwd)
    bwd = k * (2 * p * t + 2 * attn_fwd)
    adapters = k * t * (6 * r * a + (6 * r * r * n_lin if polar else 0))
    return float(fwd + bwd + adapters)


def run_pair(
    base, shape: Shape, batch_size: int, seq: int, r: int, k: int, reps: int, warmup: int
) -> dict[str, list[float]]:
    """CPU seconds of LoRA and PoLAR-VBLL steps at one point, interleaved."""
    layers = tuple(range(-k, 0)) if k < shape.layers else None
    steps = {}
    for name, kind, head in (("lora", "lora", "det"), ("polar_vbll", "polar", "vbll")):
        model = copy.deepcopy(base)
        steps[name] = TrainStep(
            attach_adapter(model, AdapterSpec(kind, r=r, layers=layers)), make_head(model, head), OptimSpec()
        )
    b = make_batch(batch_size, seq, shape.vocab)
    phases: dict[str, list[dict[str, float]]] = {n: [] for n in steps}

    def run(n: str) -> None:
        d: dict[str, float] = {}
        steps[n](b, d)
        phases[n].append(d)

    t = interleaved(
        {n: (lambda n=n: run(n)) for n in steps},
        reps=reps,
        warmup=warmup,
        on_warm=lambda: [v.clear() for v in phases.values()],
    )
    out = dict(t.cpu)
    out["stiefel"] = [d["stiefel_cpu"] for d in phases["polar_vbll"]]
    out["adamw_lora"] = [d["adamw_cpu"] for d in phases["lora"]]
    return out


def sweep(rep: Report, base, shape: Shape, args, what: str, values: list[int]) -> None:
    rows = []
    data = {}
    first: dict[str, float] = {}
    for v in values:
        seq = v if what == "seq" else args.seq
        r = v if what == "rank" else args.rank
        k = v if what == "blocks" else shape.layers
        t = run_pair(base, shape, args.batch, seq, r, k, args.reps, args.warmup)
        data[v] = t
        med = {n: Stat.of(x).median for n, x in t.items()}
        fl = {n: step_flops(shape, args.batch, seq, r, k, n == "polar_vbll") for n in ("lora", "polar_vbll")}
        if not first:
            first = {n: med[n] for n in med} | {f"flops_{n}": fl[n] for n in fl}
        per_tok = med["polar_vbll"] / (args.batch * seq) * 1e3
        rows.append(
            [
                str(v),
                Stat.of(t["lora"]).ms(0),
                Stat.of(t["polar_vbll"]).ms(0),
                paired_ratios(t["polar_vbll"], t["lora"]).ratio(),
                f"{med['polar_vbll'] / first['polar_vbll']:.2f}",
                f"{fl['polar_vbll'] / first['flops_polar_vbll']:.2f}",
                f"{med['lora'] / first['lora']:.2f}",
                f"{fl['lora'] / first['flops_lora']:.2f}",
                f"{per_tok:.3f}",
                f"{fl['polar_vbll'] / med['polar_vbll'] / 1e9:.1f}",
                f"{med['stiefel'] * 1e3:.1f}",
                f"{med['adamw_lora'] * 1e3:.1f}",
            ]
        )
    label = {"rank": "rank r", "seq": "sequence length", "blocks": "adapted top blocks k"}[what]
    fixed = {
        "rank": f"seq {args.seq}, all {shape.layers} blocks",
        "seq": f"rank {args.rank}, all {shape.layers} blocks",
        "blocks": f"rank {args.rank}, seq {args.seq}",
    }[what]
    rep.add(
        f"Step time vs {label} ({fixed}; batch {args.batch}; CPU ms median (IQR); growth relative to the first "
        "row, measured and FLOP-model):\n\n"
        + md_table(
            [
                label,
                "LoRA ms",
                "PoLAR-VBLL ms",
                "PoLAR-VBLL / LoRA",
                "PoLAR-VBLL growth",
                "PoLAR-VBLL FLOP growth",
                "LoRA growth",
                "LoRA FLOP growth",
                "PoLAR-VBLL ms / token",
                "PoLAR-VBLL GFLOP/s",
                "Stiefel step ms",
                "LoRA AdamW ms",
            ],
            rows,
        )
    )
    rep.data[what] = {str(k): v for k, v in data.items()}


def main() -> None:
    p = common_args(__doc__.splitlines()[0], reps=4, warmup=1)
    p.add_argument("--ranks", default="4,8,16,32,64")
    p.add_argument("--seqs", default="32,64,128,256")
    p.add_argument("--blocks", default=None, help="adapted top blocks to try (default 1..layers)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    shape = Shape.from_args(args)
    rep = Report("scaling", "5. Scaling of the training-step cost with work")
    rep.add(
        f"Model: {shape.describe()}; fp32; adapters on q, k, v, up, down; {args.warmup} warmup + {args.reps} "
        "interleaved steps per point (LoRA and PoLAR-VBLL alternate)."
    )
    base = build_llama(shape)
    sweep(rep, base, shape, args, "rank", [int(x) for x in args.ranks.split(",")])
    sweep(rep, base, shape, args, "seq", [int(x) for x in args.seqs.split(",")])
    blocks = [int(x) for x in args.blocks.split(",")] if args.blocks else list(range(1, shape.layers + 1))
    sweep(rep, base, shape, args, "blocks", blocks)
    rep.finish(args.out)


if __name__ == "__main__":
    main()
