"""Issue #14, item 1: peak resident memory per worker at ZeRO-0 and ZeRO-3, for 1, 2 and 4 workers, on the
bundled SmolLM2-135M and on a larger random Llama (about 430M parameters, 1.7 GB in fp32).

Each configuration is one ``polar-vbll train --workers N`` (a fresh local Ray, CPU workers, gloo) of the
``cpu`` config cut to a few examples and 2 training steps; the numbers are what every worker records in
``results.json`` (``distributed.memory``): RSS before the backbone loads, the parameter bytes it holds, and
its peak RSS over loading, DeepSpeed's init, the zero-shot evaluation and training (``peak_rss_run``, Linux
VmHWM). ZeRO-3 is measured with the sharded load (the default) and, at 2 workers, with
``dist.sharded_load=false`` (every worker loads the whole model, then DeepSpeed partitions it: the state
before issue #14). Every run starts with an empty frozen-prefix cache, so each computes its prefix states
(under ZeRO-3 that pass gathers the embedding, the largest single parameter, on every rank).

The larger model is written once, tensor by tensor, from a config instantiated on the meta device (random
normal weights, std 0.02; norms 1), with the bundled tokenizer: no process ever holds it whole while writing.

    python bench/zero_memory.py [--out DIR] [--only smollm2|llama430m]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 14, "num_attention_heads": 12,
         "num_key_value_heads": 4, "vocab_size": 49152, "tie_word_embeddings": True,
         "max_position_embeddings": 2048}  # fmt: skip
RUN = [
    "data.train_limit=16", "data.val_limit=8", "data.eval_limit=8", "train.steps=2", "train.batch_size=4",
    "train.round_steps=2", "train.checkpoint_every=2", "train.eval_batch_size=4", "model.max_length=96",
    "method=polar_vbll",
]  # fmt: skip
GRID = [(1, 0), (1, 3), (2, 0), (2, 3), (4, 0), (4, 3)]


def write_random_llama(target: Path) -> Path:
    """A random Llama of ``LLAMA``'s shape as a safetensors folder (written once; about 1.7 GB)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from polar_vbll.models import bundled_tokenizer_dir

    config = LlamaConfig(**LLAMA)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}  # tied lm_head appears once
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, index = {}, 0, index + 1

    for name, shape in shapes.items():
        t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.02
        shard[name] = t
        size += t.numel() * 4
        if size > 400 * 2**20:
            flush()
    flush()
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir())).save_pretrained(str(tmp))
    os.replace(tmp, target)
    return target


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_one(
    model_args: list[str], workers: int, stage: int, sharded: bool, out: Path, name: str, ckpt: bool = False
) -> dict:
    cmd = [str(Path(sys.executable).parent / "polar-vbll"), "train", "--config", "cpu", "--workers", str(workers),
           "--zero-stage", str(stage), "--no-track", "--no-progress",
           "--dist-set", "health_check_interval_s=0.1", "--dist-set", f"sharded_load={str(sharded).lower()}",
           "--set", f"output_dir={out}", "--set", f"name={name}"]  # fmt: skip
    for s in RUN + model_args + (["train.activation_checkpointing=true"] if ckpt else []):
        cmd += ["--set", s]
    t = time.time()
    load = load_average()
    with tempfile.TemporaryDirectory(prefix="prefix-cache-") as cache:  # cold: every run computes its prefix
        env = {**os.environ, "POLAR_VBLL_PREFIX_CACHE": cache}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    mem = json.loads((out / name / "results.json").read_text())["distributed"]["memory"]
    mib = 2**20
    return {
        "name": name, "workers": workers, "zero_stage": stage, "sharded_load": sharded and stage == 3,
        "activation_checkpointing": ckpt,
        "wall_s": round(time.time() - t, 1), "load_average_start": load,
        "held_mib": max(m["local"] for m in mem) / mib, "full_mib": mem[0]["full"] / mib,
        "rss_before_load_mib": max(m["rss_before_load"] for m in mem) / mib,
        "peak_after_init_mib": max(m["peak_rss"] for m in mem) / mib,
        "peak_mib": max(m["peak_rss_run"] for m in mem) / mib,
        "peak_by_rank_mib": [round(m["peak_rss_run"] / mib) for m in mem],
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| model | workers | ZeRO | load | held by a worker (MB) | RSS before load | peak RSS (max over ranks) "
        "| peak − before load | peak / ZeRO-0 same N |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    zero0 = {(r["model"], r["workers"]): r for r in rows
             if r["zero_stage"] == 0 and not r.get("activation_checkpointing")}  # fmt: skip
    for r in rows:
        ref = zero0.get((r["model"], r["workers"]))
        ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref and r is not ref else "—"
        if r.get("activation_checkpointing"):  # against ZeRO-0 with checkpointing too, when measured
            same = [x for x in rows if x["model"] == r["model"] and x["workers"] == r["workers"]
                    and x["zero_stage"] == 0 and x.get("activation_checkpointing")]  # fmt: skip
            ratio = f"{r['peak_mib'] / same[0]['peak_mib']:.2f} (vs ZeRO-0 + ckpt)" if same and same[0] is not r else "—"  # noqa: E501
        load = "sharded" if r["sharded_load"] else "whole, then partitioned" if r["zero_stage"] == 3 else "whole"
        if r.get("activation_checkpointing"):
            load += " + activation checkpointing"
        lines.append(
            f"| {r['model']} | {r['workers']} | {r['zero_stage']} | {load} | {r['held_mib']:,.0f} of "
            f"{r['full_mib']:,.0f} | {r['rss_before_load_mib']:,.0f} | {r['peak_mib']:,.0f} | "
            f"{r['peak_mib'] - r['rss_before_load_mib']:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zero_memory")
    ap.add_argument("--only", choices=["smollm2", "llama430m"])
    ap.add_argument("--only-checkpointing", action="store_true",
                    help="only the rows with train.activation_checkpointing (ZeRO-0 and ZeRO-3 at 2 workers)")
    ap.add_argument("--append", action="store_true", help="add the rows to an existing zero_memory.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from polar_vbll.models import cache_root

    models = {
        "smollm2": ["model.source=smollm2"],
        "llama430m": ["model.source=path", f"model.path={write_random_llama(cache_root() / 'bench-llama430m')}"],
    }
    rows = []
    runs = Path(tempfile.mkdtemp(prefix="zero-memory-"))
    for model, model_args in models.items():
        if args.only and model != args.only:
            continue
        grid = [(w, s, True, False) for w, s in GRID] + [(2, 3, False, False), (2, 0, True, True), (2, 3, True, True)]
        if args.only_checkpointing:
            grid = [g for g in grid if g[3]]
        for workers, stage, sharded, ckpt in grid:
            name = f"{model}-w{workers}-z{stage}{'' if sharded else '-wholeload'}{'-ckpt' if ckpt else ''}"
            row = {"model": model, **run_one(model_args, workers, stage, sharded, runs, name, ckpt)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(runs / name, ignore_errors=True)
    if args.append and (args.out / "zero_memory.json").is_file():
        rows = json.loads((args.out / "zero_memory.json").read_text()) + rows
    (args.out / "zero_memory.json").write_text(json.dumps(rows, indent=1))
    (args.out / "zero_memory.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
