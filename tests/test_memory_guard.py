"""A worker's memory budget (``dist.worker_memory_mb``, ``distributed.memory_guard``): the guard's reading,
its one line, the cluster check, and (slow) a real 2-worker run held under a budget that ZeRO-0 exceeds and
ZeRO-3 meets."""

from __future__ import annotations

import re
import time

import pytest
from pydantic import ValidationError

from distributed.cluster import check_worker_memory
from distributed.config import DistConfig
from distributed.memory_guard import MIB, MemoryGuard, resident_peak
from polar_vbll.errors import UserInputError


def test_the_guard_reports_a_peak_over_the_budget_once_with_rank_phase_and_setting():
    seen: list[str] = []
    peak = resident_peak()
    assert peak is not None and peak > 10 * MIB
    guard = MemoryGuard(peak // 2, rank=3, on_exceed=seen.append, kill=False)
    guard.phase = "the zero-shot evaluation"
    assert guard.check() and guard.check()  # the second reading does not report again
    assert len(seen) == 1
    line = seen[0]
    assert "\n" not in line and line.startswith("WorkerMemoryExceeded: rank 3 reached")
    reached = int(re.search(r"reached ([\d,]+) MiB", line).group(1).replace(",", ""))
    assert reached >= round(peak / MIB) and f"dist.worker_memory_mb={peak // 2 // MIB}" in line
    assert "during the zero-shot evaluation" in line and "--zero-stage 3" in line


def test_the_guard_passes_a_peak_within_the_budget_and_a_phase_peak_read_elsewhere_counts():
    seen: list[str] = []
    guard = MemoryGuard(2**50, rank=0, on_exceed=seen.append, kill=False)
    assert not guard.check()
    assert guard.check(peak=2**51)  # a phase's peak (PhasePeaks) over the budget
    assert len(seen) == 1


def test_the_guard_thread_catches_an_allocation_that_crosses_the_budget():
    seen: list[str] = []
    budget = resident_peak() + 64 * MIB
    with MemoryGuard(budget, rank=1, on_exceed=seen.append, interval_s=0.01, kill=False) as guard:
        assert not seen
        block = bytearray(160 * MIB)  # zero-filled pages: touch them so they become resident
        block[:: 4096] = b"\x01" * len(block[:: 4096])
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
    assert len(seen) == 1 and guard.exceeded == seen[0]


def test_a_budget_no_node_can_give_is_refused_in_one_line_and_one_that_fits_passes():
    nodes = [{"Resources": {"CPU": 2, "memory": 10 * 2**30}}, {"Resources": {"CPU": 2, "memory": 3 * 2**30}}]
    check_worker_memory(3, 3 * 1024, nodes)  # 3 on the first node, 1 on the second
    check_worker_memory(4, 3 * 1024, nodes)
    check_worker_memory(4, None, [])  # no budget: nothing asked of the cluster
    with pytest.raises(UserInputError) as err:
        check_worker_memory(5, 3 * 1024, nodes)
    msg = str(err.value)
    assert "\n" not in msg and "dist.worker_memory_mb=3072" in msg and "room for 4 such worker(s)" in msg
    assert "10,240 MiB" in msg


def test_the_budget_must_be_positive():
    assert DistConfig().worker_memory_mb is None
    assert DistConfig(worker_memory_mb=512).worker_memory_mb == 512
    with pytest.raises(ValidationError):
        DistConfig(worker_memory_mb=0)


# ------------------------------------------------------------------------------------------------- a real run
def _scaled_run(root, name: str, stage: int, budget_mb: int | None):
    """2 CPU workers on a random Llama scaled so that the backbone dominates a worker's memory (hidden 1536,
    16 blocks, vocab 49k, tied: 415M parameters, 1.66 GB in float32; written once to the model cache), 2
    steps on a few questions."""
    from distributed.launch import train_distributed
    from polar_vbll.config import load_config, packaged_config

    cfg = load_config(packaged_config("run", "tiny"), [
        f"output_dir={root}", f"name={name}", "model.tiny_hidden=1536", "model.tiny_layers=16",
        "method=polar_vbll", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
        "data.train_limit=8", "data.val_limit=4", "data.eval_limit=4", "model.max_length=64",
    ])  # fmt: skip
    dist = DistConfig(zero_stage=stage, health_check_interval_s=0.1, max_failures=0, worker_memory_mb=budget_mb)
    return train_distributed(cfg, workers=2, dist=dist)


@pytest.mark.slow  # four 2-worker runs of a 1.66 GB model
def test_a_budget_zero0_exceeds_is_met_by_zero3_on_the_same_model(tmp_path):
    """The issue's test (#25 part 1): a per-worker memory budget between the two stages' measured peaks ends
    the ZeRO-0 run in one line (rank, phase, setting) and lets the ZeRO-3 run finish. The budget is set from
    the unbudgeted runs' own peaks (``distributed.memory`` in results.json), so it holds on any machine
    whose floor differs from this one's; ZeRO-3 must save at least a fifth of the model per worker (measured
    on this 2-core VM: 1,454 vs 1,292 MB at half this model's size, hence the larger model)."""
    pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    from distributed.launch import DistributedRunError

    def peak(res) -> int:
        return max(m["peak_rss_run"] for m in res["distributed"]["memory"])

    zero0 = _scaled_run(tmp_path, "z0", 0, None)
    zero3 = _scaled_run(tmp_path, "z3", 3, None)
    full = zero0["distributed"]["memory"][0]["full"]
    assert full > 1500 * MIB
    p0, p3 = peak(zero0), peak(zero3)
    assert p0 - p3 > full // 5, (p0 / MIB, p3 / MIB, full / MIB)  # half the model per worker, less the transients
    budget_mb = (p0 + p3) // 2 // MIB
    with pytest.raises(DistributedRunError) as err:
        _scaled_run(tmp_path, "z0-budget", 0, budget_mb)
    line = str(err.value)
    assert "WorkerMemoryExceeded: rank" in line and f"dist.worker_memory_mb={budget_mb}" in line, line
    assert "\n" not in line.strip()
    held = _scaled_run(tmp_path, "z3-budget", 3, budget_mb)
    assert held["training"]["steps"] == 2
    assert peak(held) <= budget_mb * MIB
