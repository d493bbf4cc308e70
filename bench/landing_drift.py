"""How far the landing field lets U, V leave the Stiefel manifold on real losses (issue #21, item 8).

Each case trains through the product's own path (``session.build_session``, the local backend, the one
``Trainer``; no evaluation) with ``optim.method=landing`` and records ``max ||X^T X - I||_F`` over every U
and V after every step: the final value, the largest over the run and the step it was reached.

    python bench/landing_drift.py --config tiny --lr 4e-3 1e-2 --r 4 8 --steps 40
    python bench/landing_drift.py --config cpu --lr 4e-3 1e-2 --r 8 64 --steps 40 --set train.batch_size=8
    python bench/landing_drift.py ... --set optim.landing_safe_distance=null   # the unguarded landing

``--set`` takes any run-config override (as ``polar-vbll train --set``). Prints one Markdown row per case
and writes them as JSON with the machine and its load average (``--out``).

    python bench/landing_drift.py --time-step [--reps 20]

times the landing step alone, guarded and unguarded, at the TinyLlama-1.1B factor layout of
``bench/stiefel_share.py`` (220 factors at r = 8, random gradients; CPU, interleaved repetitions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_vbll.config import load_config, resolve_config  # noqa: E402
from polar_vbll.runner import _open_member  # noqa: E402
from polar_vbll.training import LocalCoordinator, Trainer  # noqa: E402


def run_case(config: str, sets: list[str], out: str) -> dict:
    cfg = load_config(resolve_config(config, "run"), [f"output_dir={out}", "train.checkpoint_every=0", *sets])
    session, backend, store, _ = _open_member(cfg, None, None, resume=False)
    errors: list[float] = []

    def record(trainer, step):
        errors.append(float(trainer.adapter.orthogonality_error()))

    coordinator = LocalCoordinator(session.head, cfg.head.fit, None)
    trainer = Trainer(cfg, session.adapter, session.head, session.splits, backend, coordinator, store,
                      hooks=[record], progress=False)  # fmt: skip
    t = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t
    val = trainer.validate()  # the validation split, the trained head, one pass
    worst = max(range(len(errors)), key=errors.__getitem__)
    o = cfg.optim
    return {
        "config": config, "sets": sets, "steps": len(errors), "lr_stiefel": o.lr_stiefel, "r": cfg.polar.r,
        "landing_lambda": o.landing_lambda, "landing_safe_distance": getattr(o, "landing_safe_distance", None),
        "final": errors[-1], "max": errors[worst], "max_step": worst + 1, "per_step": errors,
        "loss": trainer.state.history[-1]["loss"] if trainer.state.history else None,
        "val_acc": val["val_acc"], "val_nll": val["val_nll"], "seconds": seconds, "method": o.method,
    }  # fmt: skip


def time_step(reps: int) -> None:
    import torch
    from common import Stat, interleaved
    from stiefel_share import tinyllama_groups

    from polar_vbll.manifold import random_stiefel
    from polar_vbll.optim import StiefelOptimizer

    groups = tinyllama_groups()
    fns = {}
    variants = {"landing, unguarded": ("landing", None), "landing, safeguard 0.1": ("landing", 0.1),
                "riemannian/cholqr2 (reference)": ("riemannian", None)}  # fmt: skip
    for name, (method, safe) in variants.items():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(random_stiefel(g, n=n, r=r, generator=gen)) for g, n, r in groups]
        for p in params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
        fns[name] = StiefelOptimizer(params, lr=4e-3, method=method, landing_safe_distance=safe).step
    times = interleaved(fns, reps=reps, warmup=3).cpu
    print(f"{sum(g for g, _, _ in groups)} factors: " + ", ".join(f"{g} x ({n}, {r})" for g, n, r in groups))
    for name, ts in times.items():
        print(f"| {name} | {Stat.of(ts).ms(1)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-step", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--lr", type=float, nargs="+", default=[4e-3, 1e-2])
    ap.add_argument("--r", type=int, nargs="+", default=[4])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--method", default="polar_vbll")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.time_step:
        time_step(args.reps)
        return
    rows = []
    print("| config | extra settings | steps | lr | r | final ‖UᵀU − I‖ | max (step) | last loss | val ACC | val NLL "
          "| s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in args.r:
        for lr in args.lr:
            sets = [f"method={args.method}", "optim.method=landing", f"train.steps={args.steps}",
                    f"optim.lr_stiefel={lr}", f"polar.r={r}", *args.sets]  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="landing-drift-") as out:
                row = run_case(args.config, sets, out)
            rows.append(row)
            print(f"| {args.config} | {' '.join(args.sets) or '-'} | {row['steps']} | {lr:g} | {r} | "
                  f"{row['final']:.3g} | {row['max']:.3g} ({row['max_step']}) | {row['loss']:.4g} | "
                  f"{100 * row['val_acc']:.1f}% | {row['val_nll']:.3f} | {row['seconds']:.0f} |",
                  flush=True)  # fmt: skip
    if args.out:
        meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
