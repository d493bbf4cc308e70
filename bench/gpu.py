"""Item 6 of issue #6: the GPU benchmark. Items 1-3 (training step vs PEFT LoRA, Stiefel step share,
test-time cost of uncertainty) on a random-weight Llama of the TinyLlama-1.1B shape (hidden 2048, 22 layers,
32 heads, 4 KV heads, intermediate 5632) in bf16, with tokens/s and model FLOP utilisation (MFU) against a
bf16 matmul peak measured here, and the frozen-backbone floor (forward + backward to the input embeddings;
target >= 35% of that peak). Needs only torch, transformers, peft and the working tree's polar_vbll.

    python bench/gpu.py --out $OUT                # H200: ~2-4 min eager; --compile adds compilations
    python bench/gpu.py --out DIR --tiny          # dry run on CPU (tiny model), checks the code path

Writes ``gpu.md`` and ``gpu.json`` into ``--out``. A global time budget (``--budget-s``) skips what would
not fit, and says so in the table, so that the command always ends in time.

FLOP model (per step, T = batch x seq tokens, s = seq, d = hidden, L = blocks, P = weights of the decoder
blocks' linear layers): frozen forward 2 P T + attention 4 T s d L; backward to the inputs (no weight
gradients) 2 P T + attention 8 T s d L (attention counted without causal halving, as in PaLM's MFU);
adapters 6 r A T (+ 6 r^2 T per adapted linear for PoLAR's core; A = sum over adapted linears of in + out).
MFU = model FLOPs / step time / measured peak. The LM head is not run (features come from the decoder).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from common import (
    DEFAULT_TARGETS,
    PHASES,
    TINYLLAMA,
    AdapterSpec,
    OptimSpec,
    Report,
    Shape,
    Stat,
    TrainStep,
    attach_adapter,
    build_llama,
    build_uncertainty_suite,
    cuda_sync,
    interleaved,
    make_batch,
    make_head,
    md_table,
    no_sync,
    paired_ratios,
    set_threads,
)

TINY = Shape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1024)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, need: float) -> bool:
        return self.left() > need


def linear_dims(shape: Shape) -> dict[str, tuple[int, int]]:
    from scaling import linear_dims as dims

    return dims(shape)


def flops(shape: Shape, batch: int, seq: int, r: int = 0, polar: bool = False) -> float:
    """Model FLOPs of one frozen-backbone forward + backward to the inputs, plus adapters at rank r."""
    dims = linear_dims(shape)
    p = sum(i * o for i, o in dims.values())
    t = batch * seq
    attn = 4 * t * seq * shape.hidden * shape.layers
    total = 4 * p * t * shape.layers + 3 * attn
    if r:
        a = sum(i + o for n, (i, o) in dims.items() if n in DEFAULT_TARGETS)
        total += shape.layers * t * (6 * r * a + (6 * r * r * len(DEFAULT_TARGETS) if polar else 0))
    return float(total)


def forward_flops(shape: Shape, batch: int, seq: int) -> float:
    """Model FLOPs of one frozen forward (no adapters): 2 P T + attention 4 T s d L."""
    p = sum(i * o for i, o in linear_dims(shape).values())
    t = batch * seq
    return float(2 * p * t * shape.layers + 4 * t * seq * shape.hidden * shape.layers)


def matmul_peak(device: str, n: int, iters: int) -> float:
    """Best of 3 trials of ``iters`` bf16 n x n x n matmuls, FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = cuda_sync if device == "cuda" else no_sync
    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t))
    return best


def floor_fn(model, batch, compiled: bool):
    """Frozen backbone: decoder forward from the input embeddings (which require grad) to the last-token
    features, then backward to the embeddings."""
    from polar_vbll.backbone import decoder_of, gather_last, position_ids_from_mask

    dec = decoder_of(model)
    pos = position_ids_from_mask(batch.mask)

    def feats(emb, mask):
        out = dec(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False)
        return gather_last(out.last_hidden_state, mask)

    f = torch.compile(feats) if compiled else feats
    emb0 = dec.embed_tokens(batch.ids).detach()

    def run():
        emb = emb0.clone().requires_grad_(True)
        f(emb, batch.mask).float().sum().backward()

    return run


def compiled_features(model):
    from polar_vbll.backbone import last_token_features

    return torch.compile(lambda ids, mask: last_token_features(model, ids, mask))


def graph_breaks() -> int:
    """Graph breaks dynamo has counted so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def gpu_mem_probe(fn, steps: int, device: str) -> dict[str, float] | None:
    """Peak bytes allocated over ``steps`` calls above what was allocated before (CUDA only)."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"before_gib": before / 2**30, "peak_gib": peak / 2**30, "overhead_gib": (peak - before) / 2**30}


def model_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.md and gpu.json")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: a dry run of the code path")
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd floor / LoRA / PoLAR-VBLL"
    )
    p.add_argument("--batch", type=int, default=None, help="default 16 (tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 256 (tiny: 32)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10, tiny 2)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would not fit")
    p.add_argument("--sections", default="peak,floor,train,stiefel,uncertainty,bank")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    budget = Budget(args.budget_s)
    missing = [
        m for m in ("transformers", "peft", "pydantic", "yaml", "tqdm") if importlib.util.find_spec(m) is None
    ]
    if missing:
        sys.exit(
            f"bench/gpu.py: missing Python packages {missing}. polar_vbll imports pydantic, pyyaml and tqdm; "
            "carry their wheels for this Python (pydantic needs pydantic_core, annotated_types, "
            "typing_inspection) with the working tree and `pip install --no-deps` them first."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if not args.tiny and device != "cuda":
        sys.exit("no CUDA device: run with --tiny for a CPU dry run")
    if device == "cpu":
        set_threads(1)
    shape = TINY if args.tiny else TINYLLAMA
    batch_size = args.batch or (2 if args.tiny else 16)
    seq = args.seq or (32 if args.tiny else 256)
    reps = args.reps or (2 if args.tiny else 10)
    warm = 1 if args.tiny else 3
    sync = cuda_sync if device == "cuda" else no_sync
    dtype = torch.bfloat16
    sections = set(args.sections.split(","))
    rep = Report(
        "gpu",
        "GPU benchmark (bench/gpu.py)" + (" — TINY CPU DRY RUN, numbers meaningless" if args.tiny else ""),
    )
    if args.tiny:  # every target line of a dry run says so
        verdict = rep.verdict
        rep.verdict = lambda what, *a, **k: verdict(
            "DRY RUN on a tiny CPU model, not a result: " + what, *a, **k
        )
    rep.info.update(
        device=device, shape=shape.__dict__, batch=batch_size, seq=seq, rank=args.rank, compile=args.compile
    )
    tokens = batch_size * seq
    batch = make_batch(batch_size, seq, shape.vocab, device=device)
    rep.add(
        f"Model: {shape.describe()}, bf16 weights (adapter factors, Theta and heads fp32 as the library "
        f"requires); batch {batch_size} x {seq} = {tokens} tokens; rank {args.rank} on "
        f"{', '.join(DEFAULT_TARGETS)}; {warm} warmup + {reps} timed repetitions, interleaved, each call "
        "bracketed by a device synchronisation; ms median (IQR)."
    )
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the library's own fp32 matmuls are IEEE anyway

    def save_partial() -> None:  # a timeout still leaves what was measured
        (args.out / "gpu.partial.json").write_text(json.dumps(rep.data, indent=2, default=str))

    # ---------------------------------------------------------------------------------------------- peak
    peak = float("nan")
    if "peak" in sections:
        n = 512 if args.tiny else 8192
        peak = matmul_peak(device, n, 3 if args.tiny else 50)
        rep.add(f"Measured bf16 matmul peak ({n}^3, best of 3 trials): **{peak / 1e12:.1f} TFLOP/s**.")
        rep.data["peak_flops"] = peak
        save_partial()

    def mfu(fl: float, seconds: float) -> str:
        return f"{100 * fl / seconds / peak:.1f}%" if peak == peak else "-"

    # --------------------------------------------------------------------------------------------- floor
    f_floor = flops(shape, batch_size, seq)
    if "floor" in sections:
        model = build_llama(shape, dtype=dtype, device=device)
        from polar_vbll.backbone import last_token_features

        fns = {"floor eager": floor_fn(model, batch, compiled=False)}

        @torch.no_grad()
        def fwd_only():
            return last_token_features(model, batch.ids, batch.mask)

        fns["forward only eager"] = fwd_only
        compile_note = ""
        if args.compile:
            if budget.allows(240):
                t0 = time.perf_counter()
                before = graph_breaks()
                fns["floor compiled"] = floor_fn(model, batch, compiled=True)
                fns["floor compiled"]()
                sync()
                took = time.perf_counter() - t0
                compile_note = f" (compilation took {took:.0f} s, {graph_breaks() - before} graph breaks)"
            else:
                compile_note = " (compiled floor skipped: time budget)"
        t = interleaved(fns, reps=reps, warmup=warm, sync=sync).wall
        rows = []
        for name, ts in t.items():
            fl = f_floor if "floor" in name else forward_flops(shape, batch_size, seq)
            s = Stat.of(ts)
            rows.append(
                [
                    f"`{name}`",
                    s.ms(1),
                    f"{tokens / s.median:,.0f}",
                    f"{fl / s.median / 1e12:.1f}",
                    mfu(fl, s.median),
                ]
            )
        rep.add(
            f"Frozen-backbone floor (forward + backward to the input embeddings; {f_floor / 1e12:.2f} TFLOP per "
            f"step){compile_note}:\n\n" + md_table(["run", "ms", "tokens/s", "TFLOP/s", "MFU"], rows)
        )
        rep.data["floor_s"] = t
        for name, ts in t.items():
            if "floor" in name:
                rep.verdict(
                    f"{name} MFU", 100 * f_floor / Stat.of(ts).median / peak, 35.0, unit="%", le=False
                )
        free(model, fns)
        save_partial()

    # --------------------------------------------------------------------------------------------- train
    if "train" in sections and budget.allows(90):
        configs = {  # name -> (adapter kind, head, fixes)
            "lora": ("lora", "det", None),
            "polar": ("polar", "det", None),
            "polar_vbll": ("polar", "vbll", None),
            "polar_vbll[fold+unbind]": ("polar", "vbll", "fold+unbind"),
            "polar_vbll[fold+unbind+vt]": ("polar", "vbll", "fold+unbind+vt"),
        }
        steps: dict[str, TrainStep] = {}
        mem: dict[str, dict | None] = {}
        gib = 0.0
        for name, (kind, head, fix) in configs.items():
            model = build_llama(shape, dtype=dtype, device=device)
            gib = model_gib(model)
            adapter = attach_adapter(model, AdapterSpec(kind, r=args.rank))
            if fix:
                import fixes

                fixes.apply(adapter, fix)
            steps[name] = TrainStep(adapter, make_head(model, head), OptimSpec())
            mem[name] = gpu_mem_probe(lambda s=steps[name]: s(batch), 2, device)
        t = interleaved(
            {n: (lambda n=n: steps[n](batch)) for n in steps}, reps=reps, warmup=warm, sync=sync
        ).wall
        phases: dict[str, dict[str, float]] = {}
        for name, s in steps.items():  # a separate, synchronised pass for the phase breakdown
            acc: dict[str, float] = {}
            for _ in range(max(2, reps // 3)):
                s(batch, acc, sync=sync)
            phases[name] = {k: v / max(2, reps // 3) for k, v in acc.items()}
        rows = []
        for name, ts in t.items():
            st = Stat.of(ts)
            polar = "polar" in name
            fl = flops(shape, batch_size, seq, args.rank, polar)
            m = mem.get(name)
            rows.append(
                [
                    f"`{name}`",
                    st.ms(1),
                    paired_ratios(ts, t["lora"]).ratio(),
                    f"{tokens / st.median:,.0f}",
                    mfu(fl, st.median),
                    f"{m['overhead_gib']:.2f}" if m else "-",
                    f"{(gib + m['overhead_gib']):.2f}" if m else "-",
                ]
                + [f"{phases[name].get(k, 0) * 1e3:.1f}" for k in PHASES]
            )
        rep.add(
            "1. Training step (eager unless marked compiled); memory: peak allocated during 2 steps above what "
            f"was allocated before (activations, gradients, optimizer state), and that plus the {gib:.2f} GiB "
            "bf16 model:\n\n"
            + md_table(
                ["config", "step ms", "/ LoRA", "tokens/s", "MFU", "training GiB", "model+training GiB"]
                + [f"{k} ms" for k in PHASES],
                rows,
            )
        )
        rep.data.update(train_s=t, train_phases_s=phases, train_mem=mem)
        if mem["lora"]:
            for name in ("polar", "polar_vbll"):
                r_mem = (gib + mem[name]["overhead_gib"]) / (gib + mem["lora"]["overhead_gib"])
                rep.add(f"Peak memory {name} / LoRA (model + training): {r_mem:.3f}")
        rep.verdict(
            "GPU PoLAR / LoRA step time (adapter only)", paired_ratios(t["polar"], t["lora"]).median, 1.0
        )
        rep.verdict(
            "GPU PoLAR-VBLL / LoRA step time (with head)",
            paired_ratios(t["polar_vbll"], t["lora"]).median,
            1.0,
        )
        free(steps)
        save_partial()
    elif "train" in sections:
        rep.add("1. Training step: skipped (time budget).")

    # ------------------------------------------------------------------------------------------- stiefel
    if "stiefel" in sections and budget.allows(60):
        model = build_llama(shape, dtype=dtype, device=device)
        adapter = attach_adapter(model, AdapterSpec("polar", r=args.rank))
        head = make_head(model, "vbll")
        variants = {
            "landing": OptimSpec(method="landing"),
            "riemannian/cholqr2": OptimSpec(retraction="cholqr2"),
            "riemannian/qr": OptimSpec(retraction="qr"),
            "riemannian/polar": OptimSpec(retraction="polar"),
        }
        # one adapter, one optimizer per variant (they take turns on the same factors: fine for timing)
        steps = {n: TrainStep(adapter, head, o) for n, o in variants.items()}
        t = interleaved(
            {n: (lambda n=n: steps[n](batch)) for n in steps}, reps=reps, warmup=warm, sync=sync
        ).wall
        rows = []
        for name, s in steps.items():
            acc: dict[str, float] = {}
            k = max(3, reps // 2)
            for _ in range(k):
                s(batch, acc, sync=sync)
            st_ms = acc["stiefel"] / k
            total = Stat.of(t[name]).median
            rows.append(
                [f"`{name}`", Stat.of(t[name]).ms(1), f"{st_ms * 1e3:.2f}", f"{100 * st_ms / total:.2f}%"]
            )
            rep.verdict(f"GPU Stiefel step share, {name}", 100 * st_ms / total, 2.0, unit="%")
        n_f = sum(p.shape[0] for p in adapter.stiefel_parameters())
        rep.add(
            f"2. Stiefel step share of a PoLAR-VBLL step ({n_f} factors in "
            f"{len(adapter.stiefel_parameters())} shape groups; Stiefel step timed between synchronisations):\n\n"
            + md_table(["variant", "step ms", "Stiefel step ms", "share"], rows)
        )
        rep.data["stiefel_s"] = t
        free(model, adapter, steps)
        save_partial()
    elif "stiefel" in sections:
        rep.add("2. Stiefel share: skipped (time budget).")

    # --------------------------------------------------------------------------------------- uncertainty
    if "uncertainty" in sections and budget.allows(60):
        batches = [make_batch(batch_size, seq, shape.vocab, device=device, seed=100 + i) for i in range(2)]
        suite = build_uncertainty_suite(shape, batches, r=args.rank, dtype=dtype, device=device)
        single = interleaved(suite.single, reps=reps, warmup=warm, sync=sync).wall
        multi = interleaved(suite.multi, reps=max(2, reps // 3), warmup=1, sync=sync).wall
        n = suite.n_examples
        rows = []
        for name, ts in single.items():
            rows.append(
                [
                    f"`{name}`",
                    "1",
                    Stat.of([x / n for x in ts]).ms(3),
                    paired_ratios(ts, single["polar_det"]).ratio(),
                ]
            )
        for name, ts in multi.items():
            if name != "polar_det":
                k = suite.n_mc if name.startswith("mc_dropout") else suite.n_members
                rows.append(
                    [
                        f"`{name}`",
                        str(k),
                        Stat.of([x / n for x in ts]).ms(3),
                        paired_ratios(ts, multi["polar_det"]).ratio(),
                    ]
                )
        rep.add(
            f"3. Test-time cost per example ({n} prompts of {seq} tokens, batches of {batch_size}):\n\n"
            + md_table(
                ["predictor", "backbone passes", "ms / example", "x deterministic forward (`polar_det`)"],
                rows,
            )
        )
        rep.data.update(uncertainty_single_s=single, uncertainty_multi_s=multi)
        rep.verdict(
            "GPU PoLAR-VBLL (MC) / deterministic forward",
            paired_ratios(single["polar_vbll_mc"], single["polar_det"]).median,
            1.05,
        )
        rep.verdict(
            "GPU PoLAR-VBLL (probit) / deterministic forward",
            paired_ratios(single["polar_vbll_probit"], single["polar_det"]).median,
            1.05,
        )
        free(suite)
        save_partial()
    elif "uncertainty" in sections:
        rep.add("3. Uncertainty: skipped (time budget).")

    # ---------------------------------------------------------------------------------- train, compiled
    if args.compile and "train" in sections:
        steps = {}
        for name, kind, head in (("lora", "lora", "det"), ("polar_vbll", "polar", "vbll")):
            if not budget.allows(200):
                rep.add(f"`{name}` compiled: skipped (time budget).")
                continue
            model = build_llama(shape, dtype=dtype, device=device)
            adapter = attach_adapter(model, AdapterSpec(kind, r=args.rank))
            eager = TrainStep(adapter, make_head(model, head), OptimSpec())
            t0 = time.perf_counter()
            before = graph_breaks()
            c = TrainStep(eager.adapter, eager.head, OptimSpec(), feature_fn=compiled_features(model))
            c(batch)
            sync()
            steps[f"{name} eager"] = eager
            steps[f"{name} compiled"] = c
            rep.add(
                f"`{name} compiled`: compilation took {time.perf_counter() - t0:.0f} s, "
                f"{graph_breaks() - before} graph breaks."
            )
        if steps:
            t = interleaved(
                {n: (lambda n=n: steps[n](batch)) for n in steps}, reps=reps, warmup=warm, sync=sync
            ).wall
            ref = "lora compiled" if "lora compiled" in t else next(iter(t))
            rows = []
            for name, ts in t.items():
                st = Stat.of(ts)
                fl = flops(shape, batch_size, seq, args.rank, "polar" in name)
                rows.append(
                    [
                        f"`{name}`",
                        st.ms(1),
                        paired_ratios(ts, t[ref]).ratio(),
                        f"{tokens / st.median:,.0f}",
                        mfu(fl, st.median),
                    ]
                )
            rep.add(
                "1b. Training step with the feature function under `torch.compile` (optimizer steps and the "
                "head eager), each next to its own eager step:\n\n"
                + md_table(["config", "step ms", f"/ {ref}", "tokens/s", "MFU"], rows)
            )
            rep.data["train_compiled_s"] = t
            if "lora compiled" in t and "polar_vbll compiled" in t:
                rep.verdict(
                    "GPU compiled PoLAR-VBLL / compiled LoRA step time",
                    paired_ratios(t["polar_vbll compiled"], t["lora compiled"]).median,
                    1.0,
                )
        free(steps)
        save_partial()

    # -------------------------------------------------------------------------------------------- bank
    if "bank" in sections and budget.allows(30):
        from polar_fixes import adapter_path_bench

        b = adapter_path_bench(tokens, args.rank, reps, warm, device=device, sync=sync)
        rows = [[f"`{k}`", Stat.of(b[k]).ms(2)] for k in ("select", "unbind")]
        rep.add(
            "Bank gradient path (fix 2): adapter path alone at the TinyLlama-1.1B layout (110 adapted linears, "
            f"220 factors; {tokens} tokens), forward + backward, "
            f"factors read as `group[idx]` (library) or via one `unbind` per forward; unbind / select = "
            f"{paired_ratios(b['unbind'], b['select']).ratio()}:\n\n"
            + md_table(["factor access", "ms"], rows)
        )
        rep.data["bank_s"] = b

    rep.add(f"Total wall time of this run: {time.perf_counter() - budget.t0:.0f} s.")
    rep.finish(args.out)


if __name__ == "__main__":
    main()
