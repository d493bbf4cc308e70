"""Run every CPU benchmark of ``bench/`` in turn (each in its own interpreter) and the GPU script's CPU dry
run, writing each one's ``<name>.md`` / ``<name>.json`` and a combined ``ALL.md`` into ``--out``.

    python bench/run_all.py --out /tmp/bench-out [--threads 1] [--skip gpu_tiny,scaling]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
JOBS = {  # name -> script and extra arguments
    "train_step": ["train_step.py"],
    "stiefel_share": ["stiefel_share.py"],
    "uncertainty": ["uncertainty.py"],
    "scaling": ["scaling.py"],
    "polar_fixes": ["polar_fixes.py"],
    "gpu_tiny": ["gpu.py", "--tiny"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="", help="comma-separated job names to skip")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    parts, failed = [], []
    for name, cmd in JOBS.items():
        if name in skip:
            continue
        out = args.out / name if name == "gpu_tiny" else args.out
        argv = [sys.executable, str(BENCH / cmd[0]), *cmd[1:], "--out", str(out)]
        if name != "gpu_tiny":
            argv += ["--threads", str(args.threads)]
        print(f"== {name}: {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(argv, check=False).returncode
        print(f"== {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
            continue
        md = out / ("gpu.md" if name == "gpu_tiny" else f"{name}.md")
        parts.append(md.read_text())
    (args.out / "ALL.md").write_text("\n\n".join(parts))
    print(f"wrote {args.out / 'ALL.md'}" + (f"; FAILED: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
