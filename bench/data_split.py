"""Issue #25 part 2: the frozen-prefix pass and a training epoch at 1, 2 and 4 CPU workers, with every rank
holding the whole split (``--dist-set data_split=replicate``) or its own shard (``data_split=shard``).

Each row is one ``polar-vbll train --config cpu --workers N --zero-stage 0 --dist-set data_split=...`` (a
fresh local Ray, CPU workers, gloo) on the bundled SmolLM2-135M and SST-2, cut to ``--train`` training
questions and one epoch of steps (``train.steps = train / batch``), with an empty frozen-prefix cache
(``POLAR_VBLL_PREFIX_CACHE`` a new temporary folder), so every rank computes its prefix states. From the
run's ``results.json``:

- ``prefix_s``: the training split's prefix pass, the slowest rank's (``timings.prefix_s``), and per rank
  the seconds, the examples whose states it holds and their bytes (``distributed.prefix``);
- ``epoch_examples_per_s``: ``steps x batch_size`` over the training loop's seconds (the trainer's
  ``seconds`` at the last step: from the first step to the last, head refits included, prefix pass not);
- the load average (1, 5, 15 min) at the start and at the end of each row: these are CPU timings on a
  shared machine, comparable only when the load stayed near zero.

Writes ``data_split.json`` and ``data_split.md`` (a table) into ``--out``.

    python bench/data_split.py [--out DIR] [--workers 1 2 4] [--train 256] [--batch 16]
    python bench/data_split.py --train 16 --batch 4 --steps 2 --workers 1 2 --eval 8   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("replicate", "shard")


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def command(workers: int, split: str, out: Path, name: str, args: argparse.Namespace, steps: int) -> list[str]:
    sets = [
        f"output_dir={out}", f"name={name}", "model.source=smollm2", "data.task=sst2",
        f"data.train_limit={args.train}", f"data.val_limit={args.eval}", f"data.eval_limit={args.eval}",
        f"train.steps={steps}", f"train.batch_size={args.batch}", f"train.checkpoint_every={steps}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "polar_vbll_cli", "train", "--config", "cpu", "--workers", str(workers),
           "--zero-stage", "0", "--no-track", "--no-progress", "--no-resume",
           "--dist-set", f"data_split={split}", "--dist-set", "health_check_interval_s=0.1"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_one(workers: int, split: str, out: Path, args: argparse.Namespace) -> dict:
    steps = args.steps or max(1, args.train // args.batch)  # one epoch
    name = f"w{workers}_{split}"
    cmd = command(workers, split, out, name, args, steps)
    load_start, t = load_average(), time.time()
    with tempfile.TemporaryDirectory(prefix="prefix-cache-") as cache:  # cold: every rank computes its prefix
        env = {**os.environ, "POLAR_VBLL_PREFIX_CACHE": cache,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout's code
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall, load_end = time.time() - t, load_average()
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    res = json.loads((out / name / "results.json").read_text())
    d, training, timings = res["distributed"], res["training"], res["timings"]
    loop_s = training["history"][-1]["seconds"]
    batch = training["batch_size"] or args.batch
    return {
        "name": name, "workers": workers, "data_split": d["data_split"], "zero_stage": d["zero_stage"],
        "train_examples": res["split_sizes"]["train"], "steps": training["steps"], "batch_size": batch,
        "prefix_s": timings["prefix_s"], "train_s": timings["train_s"], "loop_s": loop_s,
        "epoch_examples_per_s": training["steps"] * batch / loop_s, "wall_s": wall,
        "prefix_by_rank": [{"rank": p["rank"], "seconds": p["train_seconds"], "examples": p["examples"]["train"],
                            "bytes": p["bytes"]["train"]} for p in sorted(d["prefix"], key=lambda p: p["rank"])],
        "load_average_start": load_start, "load_average_end": load_end, "command": " ".join(cmd),
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| workers | data_split | prefix pass of the training split, s (slowest rank) | examples per rank | "
        "states per rank, MB | epoch, examples/s | loop, s | wall, s | load avg start -> end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ranks = r["prefix_by_rank"]
        examples = "/".join(str(p["examples"]) for p in ranks)
        mb = "/".join(f"{p['bytes'] / 2**20:.1f}" for p in ranks)
        load = f"{r['load_average_start'][0]:.2f} -> {r['load_average_end'][0]:.2f}"
        lines.append(
            f"| {r['workers']} | {r['data_split']} | {r['prefix_s']:.1f} | {examples} | {mb} | "
            f"{r['epoch_examples_per_s']:.2f} | {r['loop_s']:.1f} | {r['wall_s']:.0f} | {load} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_split")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    ap.add_argument("--train", type=int, default=256, help="training questions (SST-2)")
    ap.add_argument("--eval", type=int, default=32, help="validation and test questions each")
    ap.add_argument("--batch", type=int, default=16, help="train.batch_size (a multiple of every worker count)")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: one epoch, train / batch)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for workers in args.workers:
        for split in args.splits:
            row = run_one(workers, split, args.out, args)
            rows.append(row)
            print(f"{row['name']}: prefix {row['prefix_s']:.1f} s, {row['epoch_examples_per_s']:.2f} examples/s "
                  f"(load {row['load_average_start'][0]:.2f} -> {row['load_average_end'][0]:.2f})", flush=True)
            (args.out / "data_split.json").write_text(json.dumps(rows, indent=2))  # kept row by row
    (args.out / "data_split.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
