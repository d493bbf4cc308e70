"""Evidence for the library fixes proposed in ``bench/fixes.py`` (applied by monkeypatching one model
instance in this process; the library is not modified): do they compute the same thing, and what do they
save?

Part 0: the fixed PoLAR gives the same loss and gradients as the library's (same weights, same batch).
Part A: training step (deterministic and VBLL heads) and inference forward on the small CPU model,
        LoRA vs PoLAR as the library has it vs PoLAR with each fix (CPU time, interleaved).
Part C: the first product alone, forward + backward, 512 tokens: ``h @ V`` with V ``(in, r)`` row-major
        (the library), ``F.linear(h, V.T.contiguous())`` (fix 3) and LoRA's ``F.linear(h, A)``.
Part B: the adapter path alone (no base matmuls) at the TinyLlama-1.1B layout, 110 adapted linears in
        22 blocks: forward + backward with factors read as ``group[idx]`` (the library) or through one
        ``unbind`` per forward (fix 2). Here G is 132 for the n = 2048 group, so the O(G^2 n r) cost shows.

    python bench/polar_fixes.py [--threads 1] [--reps 12] [--out DIR]
"""

from __future__ import annotations

import copy
import warnings

import fixes
import torch
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
from stiefel_share import tinyllama_groups

VARIANTS = ("library", "fold", "unbind", "vt", "fold+unbind+vt")
ALL = VARIANTS[-1]


def polar_copy(base, r: int, which: str, theta_seed: int = 0):
    model = copy.deepcopy(base)
    polar = attach_adapter(model, AdapterSpec("polar", r=r))
    g = torch.Generator().manual_seed(theta_seed)
    with torch.no_grad():
        for p in polar.theta_parameters():
            p.copy_(0.01 * torch.randn(p.shape, generator=g))
    if which != "library":
        fixes.apply(polar, which)
    return model, polar


def part0(base, batch, r: int) -> str:
    from polar_vbll.backbone import last_token_features

    rows = []
    ref = None
    for which in VARIANTS:
        model, polar = polar_copy(base, r, which)
        head = make_head(model, "det")
        loss = head.loss(last_token_features(model, batch.ids, batch.mask), batch.labels, batch.n_choices)
        loss.backward()
        grads = [p.grad for p in polar.stiefel_parameters()] + [p.grad for p in polar.theta_parameters()]
        if ref is None:
            ref = (loss.detach(), grads)
            rows.append([f"`{which}`", f"{loss.item():.6f}", "-", "-"])
            continue
        dl = abs(loss.item() - ref[0].item())
        dg = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(grads, ref[1], strict=True)
        )
        rows.append([f"`{which}`", f"{loss.item():.6f}", f"{dl:.1e}", f"{dg:.1e}"])
    return "Part 0: same loss and gradients (fp32):\n\n" + md_table(
        ["PoLAR variant", "loss", "|loss - library|", "max relative gradient difference"], rows
    )


def part_a(rep: Report, base, batch, args) -> dict:
    from polar_vbll.backbone import last_token_features

    steps = {}
    model = copy.deepcopy(base)
    steps["lora"] = TrainStep(
        attach_adapter(model, AdapterSpec("lora", r=args.rank)), make_head(model, "det"), OptimSpec()
    )
    for which in VARIANTS:
        model, polar = polar_copy(base, args.rank, which)
        steps[f"polar[{which}]"] = TrainStep(polar, make_head(model, "det"), OptimSpec())
    for which in ("library", ALL):
        model, polar = polar_copy(base, args.rank, which)
        steps[f"polar_vbll[{which}]"] = TrainStep(polar, make_head(model, "vbll"), OptimSpec())
    t = interleaved({n: (lambda n=n: steps[n](batch)) for n in steps}, reps=args.reps, warmup=args.warmup).cpu
    rows = [
        [
            f"`{n}`",
            Stat.of(x).ms(1),
            paired_ratios(x, t["lora"]).ratio(),
            paired_ratios(x, t["polar_vbll[library]" if "vbll" in n else "polar[library]"]).ratio()
            if n != "lora"
            else "-",
        ]
        for n, x in t.items()
    ]
    rep.add(
        f"Part A1: training step, CPU ms median (IQR), {args.warmup} warmup + {args.reps} interleaved steps:\n\n"
        + md_table(["config", "step ms", "/ LoRA", "/ same head, library PoLAR"], rows)
    )

    fwd = {"lora": steps["lora"].adapter.base_model}
    for which in ("library", "fold", "vt", ALL):
        fwd[f"polar[{which}]"] = steps[f"polar[{which}]"].adapter.base_model

    def infer(m):
        @torch.no_grad()
        def run():
            return last_token_features(m, batch.ids, batch.mask)

        return run

    f = interleaved({n: infer(m) for n, m in fwd.items()}, reps=2 * args.reps, warmup=args.warmup).cpu
    rows = [[f"`{n}`", Stat.of(x).ms(1), paired_ratios(x, f["lora"]).ratio()] for n, x in f.items()]
    rep.add(
        "Part A2: inference forward (no grad, unmerged adapters), CPU ms median (IQR):\n\n"
        + md_table(["config", "forward ms", "/ LoRA"], rows)
    )
    return {"step_s": t, "forward_s": f}


def adapter_path_bench(
    tokens: int, r: int, reps: int, warmup: int, device: str = "cpu", sync=None
) -> dict[str, list[float]]:
    """Forward + backward of the PoLAR adapter path of every adapted linear of the TinyLlama shape, factors
    read from a library ``StiefelBank`` as ``bank.factor(name)`` or from one ``unbind`` per forward.
    Returns wall seconds per variant (CPU time too on CPU, under the key ``<variant>_cpu``)."""
    from common import TINYLLAMA, no_sync
    from scaling import linear_dims

    from polar_vbll.adapters import SlotRequest, StiefelBank

    dims = linear_dims(TINYLLAMA)
    reqs, layers = [], []
    for i in range(TINYLLAMA.layers):
        for t in DEFAULT_TARGETS:
            d_in, d_out = dims[t]
            name = f"model.layers.{i}.{t}"
            reqs += [SlotRequest(f"{name}.U", d_out, r), SlotRequest(f"{name}.V", d_in, r)]
            layers.append((name, d_in))
    bank = StiefelBank.build(reqs, generator=torch.Generator().manual_seed(0), device=device)
    assert sorted(tuple(p.shape) for _, p in bank.groups()) == sorted(tinyllama_groups(r))
    thetas = [torch.nn.Parameter(0.01 * torch.randn(r, r, device=device)) for _ in layers]
    inputs = {d: torch.randn(tokens, d, device=device) for d in {d for _, d in layers}}
    slots = bank.slots

    def run(mode: str) -> None:
        views = {k: p.unbind(0) for k, p in bank.groups()} if mode == "unbind" else None

        def get(name: str) -> torch.Tensor:
            if views is None:
                return bank.factor(name)
            key, idx = slots[name]
            return views[key][idx]

        total = 0.0
        for (name, d_in), theta in zip(layers, thetas, strict=True):
            h = inputs[d_in]
            delta = ((h @ get(f"{name}.V")) @ theta.T) @ get(f"{name}.U").T
            total = total + delta.sum()
        total.backward()
        for _, p in bank.groups():
            p.grad = None
        for p in thetas:
            p.grad = None

    t = interleaved(
        {m: (lambda m=m: run(m)) for m in ("select", "unbind")}, reps, warmup, sync=sync or no_sync
    )
    out = dict(t.wall)
    out.update({f"{k}_cpu": v for k, v in t.cpu.items()})
    return out


def part_c(reps: int, r: int, tokens: int = 512) -> str:
    import torch.nn.functional as F

    rows = []
    for d_in in (576, 1536):
        h = torch.randn(tokens, d_in, requires_grad=True)
        v = torch.randn(d_in, r, requires_grad=True)
        a = torch.randn(r, d_in, requires_grad=True)
        g = torch.randn(tokens, r)
        fns = {
            "h @ V (library)": lambda h=h, v=v, g=g: (h @ v).backward(g),
            "F.linear(h, V.T.contiguous()) (fix vt)": lambda h=h, v=v, g=g: F.linear(
                h, v.T.contiguous()
            ).backward(g),
            "F.linear(h, A) (LoRA)": lambda h=h, a=a, g=g: F.linear(h, a).backward(g),
        }
        t = interleaved(fns, reps=reps, warmup=5).cpu
        for name, ts in t.items():
            rows.append([str(d_in), f"`{name}`", f"{Stat.of(ts).median * 1e6:.0f}"])
    return (
        f"Part C: first adapter product, forward + backward, {tokens} tokens, rank {r}; CPU us median:\n\n"
        + md_table(["in features", "formulation", "us"], rows)
    )


def main() -> None:
    p = common_args(__doc__.splitlines()[0], reps=12, warmup=2)
    p.add_argument("--tokens-b", type=int, default=512, help="tokens of the part B adapter path")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    shape = Shape.from_args(args)
    rep = Report("polar_fixes", "Evidence for the proposed PoLAR library fixes (bench/fixes.py)")
    rep.add(
        f"Model: {shape.describe()}; fp32; batch {args.batch} x {args.seq}; rank {args.rank} on "
        f"{', '.join(DEFAULT_TARGETS)}. Fixes: `fold` = the scale alpha/r folded into the r x r core in "
        "`PolarLinear.forward`; `unbind` = `StiefelBank` factors as views of one `unbind` per forward; "
        "`vt` = the first product as `F.linear(h, V.T.contiguous())` (V laid out like LoRA's A)."
    )
    base = build_llama(shape)
    batch = make_batch(args.batch, args.seq, shape.vocab)
    rep.add(part0(base, batch, args.rank))
    rep.data["part_a"] = part_a(rep, base, batch, args)
    del base
    rep.add(part_c(20 * args.reps, args.rank))
    b = adapter_path_bench(args.tokens_b, args.rank, max(3, args.reps // 3), 1)
    cpu = {k: v for k, v in b.items() if k.endswith("_cpu")}
    rows = [[f"`{k[:-4]}`", Stat.of(v).ms(0)] for k, v in cpu.items()]
    ratio = paired_ratios(cpu["unbind_cpu"], cpu["select_cpu"])
    rep.add(
        f"Part B: adapter path only, TinyLlama-1.1B layout (110 adapted linears, "
        f"{sum(g for g, _, _ in tinyllama_groups(args.rank))} factors), {args.tokens_b} tokens, forward + "
        f"backward, CPU ms median (IQR); unbind / select = {ratio.ratio()}:\n\n"
        + md_table(["factor access", "fwd+bwd ms"], rows)
    )
    rep.data["part_b"] = b
    rep.finish(args.out)


if __name__ == "__main__":
    main()
