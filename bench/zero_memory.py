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
#: issue #25 part 1: a Llama of 2.07B parameters (28 blocks of hidden 2560, MLP 6912, 20 heads of 128 with 4
#: key-value heads; vocab 49152, tied), written in bfloat16 (4.1 GB) and run in bfloat16
LLAMA2B = {"hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 28, "num_attention_heads": 20,
           "num_key_value_heads": 4, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}  # fmt: skip
GRID = [(1, 0), (1, 3), (2, 0), (2, 3), (4, 0), (4, 3)]


def write_random_llama(target: Path, shape: dict | None = None, dtype: str = "float32") -> Path:
    """A random Llama of ``shape`` (default ``LLAMA``) as a safetensors folder in ``dtype`` (written once,
    tensor by tensor: about 1.7 GB for ``LLAMA`` in float32, 4.1 GB for ``LLAMA2B`` in bfloat16)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from polar_vbll.models import bundled_tokenizer_dir

    config = LlamaConfig(**(shape or LLAMA))
    torch_dtype = getattr(torch, dtype)
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
        shard[name] = t = t.to(torch_dtype)
        size += t.numel() * t.element_size()
        if size > 400 * 2**20:
            flush()
    flush()
    total = sum(torch.tensor([], dtype=torch_dtype).element_size() * torch.Size(s).numel() for s in shapes.values())
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
    model_args: list[str], workers: int, stage: int, sharded: bool, out: Path, name: str, ckpt: bool = False,
    dist_sets: tuple[str, ...] = (),
) -> dict:
    cmd = [str(Path(sys.executable).parent / "polar-vbll"), "train", "--config", "cpu", "--workers", str(workers),
           "--zero-stage", str(stage), "--no-track", "--no-progress",
           "--dist-set", "health_check_interval_s=0.1", "--dist-set", f"sharded_load={str(sharded).lower()}",
           "--set", f"output_dir={out}", "--set", f"name={name}"]  # fmt: skip
    for s in RUN + model_args + (["train.activation_checkpointing=true"] if ckpt else []):
        cmd += ["--set", s]
    for s in dist_sets:
        cmd += ["--dist-set", s]
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
        "dist_sets": list(dist_sets),
        "activation_checkpointing": ckpt,
        "wall_s": round(time.time() - t, 1), "load_average_start": load,
        "held_mib": max(m["local"] for m in mem) / mib, "full_mib": mem[0]["full"] / mib,
        "rss_before_load_mib": max(m["rss_before_load"] for m in mem) / mib,
        "peak_after_init_mib": max(m["peak_rss"] for m in mem) / mib,
        "peak_mib": max(m["peak_rss_run"] for m in mem) / mib,
        "peak_by_rank_mib": [round(m["peak_rss_run"] / mib) for m in mem],
        # the breakdown (issue #25 part 1): each phase's peak, max over ranks, and the prefix states held
        "phases_mib": {k: max(m.get("phases", {}).get(k, 0) for m in mem) / mib
                       for k in mem[0].get("phases", {})},
        "prefix_states_mib": max(m.get("prefix_states", 0) for m in mem) / mib,
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
    ap.add_argument("--only", choices=["smollm2", "llama430m", "llama2b"])
    ap.add_argument("--dist-set", action="append", default=[], help="extra DistConfig KEY=VALUE for every run")
    ap.add_argument("--tag", default="", help="appended to each run's name")
    ap.add_argument("--grid", default=None, help="workers:stage pairs to run, e.g. 1:0,2:3 (default: all six)")
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
    if args.only == "llama2b":  # only on request: 4.1 GB written once
        path = write_random_llama(cache_root() / "bench-llama2b", LLAMA2B, "bfloat16")
        models["llama2b"] = ["model.source=path", f"model.path={path}", "model.dtype=bfloat16"]
    rows = []
    runs = Path(tempfile.mkdtemp(prefix="zero-memory-"))
    for model, model_args in models.items():
        if args.only and model != args.only:
            continue
        grid = [(w, s, True, False) for w, s in GRID] + [(2, 3, False, False), (2, 0, True, True), (2, 3, True, True)]
        if args.grid:
            pairs = {tuple(int(x) for x in p.split(":")) for p in args.grid.split(",")}
            grid = [g for g in grid if (g[0], g[1]) in pairs and g[2] and not g[3]]
        if args.only_checkpointing:
            grid = [g for g in grid if g[3]]
        for workers, stage, sharded, ckpt in grid:
            name = f"{model}-w{workers}-z{stage}{'' if sharded else '-wholeload'}{'-ckpt' if ckpt else ''}{args.tag}"
            row = {"model": model, **run_one(model_args, workers, stage, sharded, runs, name, ckpt,
                                             tuple(args.dist_set))}  # fmt: skip
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
