"""Driver memory of training on a user's large JSONL file (issue #25 part 4, training side).

Generates a seeded training file of ``--rows`` two-choice rows (sentiment-like sentences), then, each in a
child process that prints its own peak resident set (``VmHWM``: ``exec`` replaces the address space, so the
number is the child's, not this script's; with the peaks before the run's own ``VmHWM`` resets folded in,
``polar_vbll.peak.lifetime_resident_peak``: before 2026-12-08 this read the peak since the last reset only):

- ``stages``: the data path alone, as a run builds it: ``session.load_examples`` (read, check, split), then
  ``session.load_splits`` (prompts fitted and tokenised), the peak read after each;
- ``train``: ``polar-vbll train`` on the tiny random Llama (``method=polar_vbll``: the head is refitted on the
  whole training split's features), 2 steps, validation and evaluation limited to 64 rows; the frozen
  block's states cached per example in RAM (the default cheap path);
- ``train_full_path``: the same with ``train.cache_frozen_prefix=false`` (no per-example states: what is left
  per example is the data path's);
- ``train_stream_states``: ``train`` with ``train.prefix_cache=stream`` (the states written to the disk cache
  as the prefix pass goes and read back per batch, never all in memory);
- ``train_workers`` (``--workers 2``, Ray): ``train_full_path`` on two Ray Train workers; the driver's peak,
  and each worker's (``results.json``'s ``distributed.memory``) where recorded.

``--repo`` runs another checkout's code (e.g. a worktree at the commit before) with this same file. Results go
to ``<out>/<label>.json`` and ``.md`` with the load average before and after (the VM's cores are shared:
the times are not figures, the memory is).

    python bench/train_stream.py --label after [--repo .] [--rows 100000] [--runs train,train_full_path,train_workers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the", "film", "was", "good", "bad", "dull", "bright", "warm", "cold", "slow", "quick", "kind", "cruel",
         "plot", "acting", "score", "music", "story", "ending", "scenes", "cast", "lines", "moments", "pace",
         "humour", "tension", "drama", "camera", "light", "colour", "sound", "script", "director", "writer",
         "performance")  # fmt: skip


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` JSONL rows ``{"question", "choices": ["negative", "positive"], "answer": 0|1}``, seeded."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            n = rng.randint(8, 30)
            text = " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."
            row = {"question": f"What is the sentiment of: {text}", "choices": ["negative", "positive"],
                   "answer": rng.randint(0, 1)}  # fmt: skip
            fh.write(json.dumps(row) + "\n")


# the whole run's peak: VmHWM with the peaks before the run's own resets (PeakMemory) folded in
_PEAK = (
    "try:\n"
    "    from polar_vbll.peak import lifetime_resident_peak\n"
    "except ImportError:  # an older checkout (--repo): the bare VmHWM\n"
    "    def lifetime_resident_peak():\n"
    "        return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024\n"
    "print('\\nPEAK_BYTES', lifetime_resident_peak())\n"
)

_STAGES = (
    "import re, sys, time, json\n"
    "def peak():\n"
    "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
    "def rss():\n"
    "    return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
    "from polar_vbll.config import load_config, resolve_config\n"
    "from polar_vbll.models import load_tokenizer\n"
    "from polar_vbll.session import load_examples, load_splits\n"
    "cfg = load_config(resolve_config('tiny'), sys.argv[1:])\n"
    "tok = load_tokenizer(cfg.model)\n"
    "out = {'start': [peak(), rss(), 0.0]}\n"
    "t = time.perf_counter(); ex = load_examples(cfg)\n"
    "out['load_examples'] = [peak(), rss(), time.perf_counter() - t]\n"
    "t = time.perf_counter(); splits, _ = load_splits(cfg, tok, ex)\n"
    "out['load_splits'] = [peak(), rss(), time.perf_counter() - t]\n"
    "out['train_rows'] = len(splits['train'])\n"
    "print('\\nSTAGES', json.dumps(out))\n"
)

_CLI = (
    "import re, sys\n"
    "from polar_vbll_cli.app import app\n"
    "try:\n"
    "    app(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code or 0\n"
    "else:\n"
    "    code = 0\n" + _PEAK + "sys.exit(code)\n"
)


def _child(code: str, args: list[str], repo: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess,
                                                                               float]:  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=repo,
                          env={**os.environ, **env, "PYTHONPATH": str(repo)})  # fmt: skip
    return proc, time.perf_counter() - t


def _overrides(data: Path, out_dir: Path) -> list[str]:
    return [f"data.task=jsonl:{data}", "method=polar_vbll", "data.train_limit=null", "data.val_limit=64",
            "data.eval_limit=64", "train.steps=2", "train.round_steps=2", "train.checkpoint_every=0",
            f"output_dir={out_dir}"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="before / after: the name of the result files")
    p.add_argument("--repo", type=Path, default=HERE.parent, help="the checkout whose code runs")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--runs", default="train,train_full_path", help="of train, train_full_path, "
                   "train_stream_states, train_workers (--workers 2, on the full path; needs Ray)")
    p.add_argument("--extra", action="append", default=[], help="more --set overrides for every run")
    p.add_argument("--out", type=Path, default=HERE / "results" / "train_stream")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="train_stream-"))
    data = tmp / "train.jsonl"
    generate(data, a.rows)
    env = {"POLAR_VBLL_PREFIX_CACHE": str(tmp / "prefix"), "POLAR_VBLL_TOKEN_CACHE": str(tmp / "tokens")}
    record: dict = {"label": a.label, "rows": a.rows, "file_bytes": data.stat().st_size, "repo": str(a.repo.resolve()),
                    "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                             cwd=a.repo).stdout.strip(),
                    "host": platform.node(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                    "runs": {}}  # fmt: skip
    sets = [s for o in [*_overrides(data, tmp / "runs"), *a.extra] for s in ("--set", o)]
    proc, wall = _child(_STAGES, [o for o in [*_overrides(data, tmp / "runs"), *a.extra]], a.repo, env)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    stages = json.loads(proc.stdout.rpartition("\nSTAGES ")[2])
    record["runs"]["stages"] = {"wall_s": wall, **stages}
    base = ["train", "--config", "tiny", "--no-track", "--no-progress", *sets]
    full = ["--set", "train.cache_frozen_prefix=false"]
    runs = {"train": [*base, "--set", "name=tiny"],  # the cheap path: the frozen block's states cached in RAM
            "train_full_path": [*base, *full, "--set", "name=tiny_full"],  # no per-example states: the data path
            # the cheap path with the states on disk only, each batch's read back (train.prefix_cache=stream)
            "train_stream_states": [*base, "--set", "train.prefix_cache=stream", "--set", "name=tiny_stream"],
            "train_workers": [*base, *full, "--workers", "2", "--set", "name=tiny_workers"]}  # fmt: skip
    for name in filter(None, a.runs.split(",")):
        args = runs[name]
        proc, wall = _child(_CLI, args, a.repo, env)
        out, _, peak = proc.stdout.rpartition("\nPEAK_BYTES ")
        entry: dict = {"wall_s": wall, "rc": proc.returncode, "peak_rss_bytes": int(peak.strip() or 0),
                       "command": "polar-vbll " + " ".join(args)}  # fmt: skip
        if proc.returncode != 0:
            entry["tail"] = (out[-2000:] + proc.stderr[-2000:])
        results = tmp / "runs" / args[-1].removeprefix("name=") / "results.json"
        if results.is_file():
            r = json.loads(results.read_text())
            entry["workers_memory"] = (r.get("distributed") or {}).get("memory")
        record["runs"][name] = entry
    record["loadavg_after"] = os.getloadavg()
    (a.out / f"{a.label}.json").write_text(json.dumps(record, indent=1) + "\n")
    mib = 1 / (1 << 20)
    lines = [f"# train_stream: {a.label} ({a.rows:,} rows, {record['file_bytes'] * mib:.1f} MiB file)", "",
             f"commit {record['commit'][:10]}, {record['cpus']} shared cores, load average "
             f"{record['loadavg_before'][0]:.2f} before, {record['loadavg_after'][0]:.2f} after "
             "(times are not figures)",
             "", "| what | peak RSS MiB | wall s |", "|---|---|---|"]  # fmt: skip
    for stage in ("start", "load_examples", "load_splits"):
        pk, _, secs = stages[stage]
        lines.append(f"| stages: after {stage} | {pk * mib:.0f} | {secs:.1f} |")
    for name, entry in record["runs"].items():
        if name != "stages":
            rc = "" if entry["rc"] == 0 else f" (rc {entry['rc']})"
            lines.append(f"| {name}{rc} | {entry['peak_rss_bytes'] * mib:.0f} | {entry['wall_s']:.1f} |")
    (a.out / f"{a.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
