"""The GPU check's CPU dry run (issue #20, item 4): the same shell script and Python script that one device
call runs on an H100, on the CPU with a tiny model, every section of it; and the exported data is exactly
what the main job reads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data = tmp_path_factory.mktemp("gpu-data")
    subprocess.run([sys.executable, "bench/gpu_check.py", "--export", "--tiny", "--data", str(data)], cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    return data


def test_the_exported_splits_are_the_main_jobs_examples_token_for_token(exported):
    from polar_vbll.config import ModelConfig
    from polar_vbll.features import encode_examples
    from polar_vbll.models import load_tokenizer
    from polar_vbll.tasks import load_task

    tok = load_tokenizer(ModelConfig())
    for split, n in (("train", 16), ("validation", 12), ("test", 12)):
        # the same examples (a JSONL folder's rows come in its own seeded order), the same prompts and labels
        built_in = sorted(load_task("sst2", split, seed=0, limit=n), key=lambda e: e.uid)
        exported_rows = sorted(load_task(f"jsonl:{exported / 'sst2'}", split), key=lambda e: e.uid)
        assert [e.uid for e in built_in] == [e.uid for e in exported_rows], split
        a = encode_examples(split, built_in, tok, 300, False)
        b = encode_examples(split, exported_rows, tok, 300, False)
        assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist(), split
    assert (exported / "tokenizer" / "tokenizer_config.json").is_file()


@pytest.mark.slow  # over 20 s on 2 CPU cores (CI durations, 2026-12-07); -m slow runs it
def test_the_gpu_check_runs_end_to_end_on_the_cpu(exported, tmp_path):
    """``scripts/gpu_check.sh --device cpu --tiny``: every section ends ok and the report holds its table."""
    has_ds = importlib.util.find_spec("deepspeed") is not None
    out = tmp_path / "out"
    env = {**os.environ, "DATA": str(exported), "PYTHON": sys.executable, "OUT": str(out), "BUDGET_S": "240"}
    sections = [] if has_ds else ["--sections", "main,step,fits"]
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--tiny", *sections], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert report.count("Status: ok") == (4 if has_ds else 3), report
    assert "| PoLAR-VBLL |" in report and "| PoLAR-MLE + TS |" in report  # (a) the main job's table
    assert "| PEFT LoRA (reference, plain loop) |" in report and "polar-vbll PoLAR-VBLL (Trainer)" in report
    if has_ds:
        assert "DeepSpeed ZeRO-3, 1 rank" in report
    assert "VBLL eta-phase L-BFGS" in report  # (d) the head fits' timings
    assert (out / "gpu_check.json").is_file()
