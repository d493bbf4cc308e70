"""``DistConfig.data_split: shard`` (issue #25 part 2): each rank prepares and keeps the cached frozen prefix
of its own contiguous shard of every split and draws its slice of every step from that shard.

Without Ray: the batch rule (``distributed.sharding.shard_step_micro_batches``), the lock-step prefix
batches, and ``FeatureSource.prepare`` of a subset on a tiny random Llama. With Ray (the tiny Llama, real
ARC-Easy questions, 2 CPU workers): a ZeRO-3 run on uneven shards (33 training questions: 17 and 16, so
the ranks' prefix passes need 2 and 1 batches and one is padded); slow: 1 worker in shard mode against
1 worker in replicate mode, and 2 workers stopped after a checkpoint, resumed on 1 worker in shard mode and
in replicate mode (a change of ``data_split``), each against the one-process resume of the same checkpoint.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from distributed.config import DistConfig, dist_config_from
from distributed.sharding import (
    check_shards,
    lockstep_batches,
    prefix_batches,
    shard_bounds,
    shard_indices,
    shard_step_micro_batches,
    step_micro_batches,
)
from polar_vbll.errors import ConfigError
from polar_vbll.features import FeatureSource
from polar_vbll.prefix_cache import PrefixCache
from polar_vbll.training import batch_indices
from tests.conftest import make_tiny_llama
from tests.optional import for_entry
from tests.test_train import _split

WORKERS = for_entry("polar-vbll train --workers")


# ------------------------------------------------------------------------------------- the batch rule
@pytest.mark.parametrize("n", [20, 21, 33])
@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_each_rank_draws_its_slice_of_every_step_from_its_own_shard(n, world, accum):
    batch = 12  # divides by world x accum in every case
    for rank in range(world):
        start, stop = shard_bounds(n, rank, world)
        per_rank = batch // world
        seen: list[int] = []
        for step in range(8):
            micro = shard_step_micro_batches(step, n, batch, 7, rank, world, accum)
            assert micro == shard_step_micro_batches(step, n, batch, 7, rank, world, accum)  # deterministic
            assert [len(mb) for mb in micro] == [per_rank // accum] * accum  # equal sizes on every rank
            flat = [i for mb in micro for i in mb]
            assert all(start <= i < stop for i in flat), (rank, step, flat)
            seen += flat
        # an epoch of the shard: every example of it once before any repeats (per-epoch permutations)
        assert len(seen) >= stop - start and sorted(seen[: stop - start]) == list(range(start, stop))
    # the ranks' batches differ from one another's and from one process's slice of the global batch
    if world > 1:
        assert shard_step_micro_batches(0, n, batch, 7, 0, world, accum) != step_micro_batches(
            0, n, batch, 7, 0, world, accum
        )


def test_one_worker_draws_the_one_process_batch():
    for n, batch, accum in ((20, 4, 1), (21, 6, 2), (7, 7, 1), (5, 10, 2)):  # the last wraps into epoch 2
        for step in range(6):
            micro = shard_step_micro_batches(step, n, batch, 3, 0, 1, accum)
            assert [i for mb in micro for i in mb] == batch_indices(step, n, batch, 3)
            assert micro == step_micro_batches(step, n, batch, 3, 0, 1, accum)


def test_fewer_training_examples_than_workers_are_refused_in_one_line():
    check_shards(2, 2)
    with pytest.raises(ConfigError, match=r"^--dist-set data_split=shard needs at least one .* 3 examples for 4 "):
        check_shards(3, 4)
    with pytest.raises(ConfigError, match="data_split=shard"):
        shard_step_micro_batches(0, 1, 2, 0, 1, 2, 1)


def test_data_split_is_a_dist_setting_with_replicate_by_default():
    assert DistConfig().data_split == "replicate"
    assert dist_config_from(None, ["data_split=shard"]).data_split == "shard"
    with pytest.raises(ConfigError, match=r"--dist-set data_split: .*'replicate' or 'shard'"):
        dist_config_from(None, ["data_split=halves"])


@WORKERS
def test_the_command_line_passes_data_split_to_the_workers_and_refuses_a_bad_one(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import distributed.launch
    from polar_vbll_cli.app import app

    seen = {}

    def fake(cfg, address=None, dist=None, resume=True, track=False):
        seen["dist"] = dist
        raise ConfigError("stop here")

    monkeypatch.setattr(distributed.launch, "train_distributed", fake)
    args = ["train", "--config", "tiny", "--workers", "2", "--no-track", "--set", f"output_dir={tmp_path}"]
    result = CliRunner().invoke(app, [*args, "--dist-set", "data_split=shard"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["dist"].data_split == "shard" and seen["dist"].workers == 2
    result = CliRunner().invoke(app, [*args, "--dist-set", "data_split=rows"])
    assert result.exit_code == 2 and "--dist-set data_split" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@WORKERS
def test_a_tracked_run_logs_data_split_with_the_other_dist_settings(monkeypatch, tmp_path):
    """The MLflow params a tracked ``train --workers`` opens its run with carry every DistConfig field as
    ``dist.<field>`` (stopped before Ray starts)."""
    import polar_vbll.tracking
    from distributed.launch import train_distributed
    from polar_vbll.config import load_config, packaged_config

    seen = {}

    def tracked(folder, experiment, name, params, *args, **kwargs):
        seen.update(params)
        raise ConfigError("stop here")

    monkeypatch.setattr(polar_vbll.tracking, "tracked", tracked)
    cfg = load_config(packaged_config("run", "tiny"), [f"output_dir={tmp_path}", "name=t"])
    with pytest.raises(ConfigError, match="stop here"):
        train_distributed(cfg, dist=DistConfig(workers=2, data_split="shard"), track=True)
    assert seen["dist.data_split"] == "shard" and seen["dist.workers"] == 2 and seen["dist.zero_stage"] == 3
    assert set(DistConfig.model_fields) == {k.removeprefix("dist.") for k in seen if k.startswith("dist.")}
    assert seen["train.steps"] == cfg.train.steps  # beside the run config's


# --------------------------------------------------------------------------- lock-step prefix batches
def test_every_rank_runs_as_many_prefix_batches_as_the_largest_shard():
    for n in range(0, 40):
        for world in (1, 2, 3, 4):
            for bs in (1, 3, 16):
                want = prefix_batches(n, world, bs)
                counts = [math.ceil(len(shard_indices(n, r, world)) / bs) for r in range(world)]
                assert max(counts, default=0) == want and all(c <= want for c in counts), (n, world, bs)
                # what the lock-step feature passes read is what the shard's prefix pass prepared
                for r in range(world):
                    read = {i for b in lockstep_batches(n, r, world, bs) for i in b.idx}
                    assert read <= set(shard_indices(n, r, world)), (n, world, bs, r)


def _source(tmp_path: Path) -> FeatureSource:
    from polar_vbll.adapters import inject_polar
    from polar_vbll.config import PolarConfig

    model = make_tiny_llama(seed=0)
    polar = inject_polar(model, PolarConfig(r=4, alpha=8, layers=[-1]))
    return FeatureSource(polar.base_model, pad_id=0, cache_prefix=True, disk=PrefixCache(tmp_path / "cache"))


def test_a_shards_prefix_pass_is_padded_to_the_common_number_of_batches(tmp_path):
    """33 examples over 2 ranks, batches of 16: rank 0's 17 need 2 batches, rank 1's 16 need 1 and get one
    padding pass, whose output is dropped (its example's states are those of its real batch)."""
    source = _source(tmp_path)
    calls: list[int] = []
    real = source.split.prefix_states
    source.split.prefix_states = lambda ids, mask: calls.append(ids.shape[0]) or real(ids, mask)
    whole = _split(33)
    source.prepare(whole, 16, progress=False)
    for rank in (0, 1):
        enc = _split(33)
        calls.clear()
        own = shard_indices(33, rank, 2)
        source.prepare(enc, 16, progress=False, indices=own, min_batches=prefix_batches(33, 2, 16))
        assert len(calls) == 2, calls
        assert calls == [16, 1]  # rank 0: 16 + 1 examples; rank 1: its 16, then a padding pass of one
        assert enc.prepared() == len(own) and all((s is None) == (i not in own) for i, s in enumerate(enc.states))
        for i in own:  # the same states as the whole split's pass (other batch widths: within rounding)
            torch.testing.assert_close(enc.states[i].float(), whole.states[i].float(), atol=2e-3, rtol=0)


def test_a_prepared_subset_is_cached_under_its_own_key_and_other_examples_are_refused(tmp_path):
    source = _source(tmp_path)
    enc = _split(20)
    own = list(range(10, 20))
    assert not source.on_disk(enc, own)
    source.prepare(enc, 8, progress=False, indices=own)
    assert source.on_disk(enc, own) and not source.on_disk(enc) and not source.on_disk(enc, list(range(10)))
    phi = source.features(enc, [12, 19])
    assert phi.shape[0] == 2 and torch.isfinite(phi).all()
    with pytest.raises(ValueError, match=r"example\(s\) \[3\] have no frozen-prefix states .* 10 of 20"):
        source.features(enc, [12, 3])  # never a silent recompute of the whole split
    again = _split(20)  # a rerun on the same examples and shard: read from disk, the same states
    source.split.prefix_states = None  # a prefix pass would fail
    source.prepare(again, 8, progress=False, indices=own)
    assert all(torch.equal(again.states[i], enc.states[i]) for i in own) and again.states[0] is None


# --------------------------------------------------------------------------------------- Ray workers
SETTINGS = ["method=polar_vbll", "head.vbll.predictive=probit", "train.alternation=per_round",
            "train.round_steps=2", "train.checkpoint_every=3", "train.steps=6"]  # fmt: skip
N_TRAIN = 33  # uneven shards: 17 and 16
STOP = 3
TOL = 2e-5


def _cfg(root: Path, name: str):
    from polar_vbll.config import load_config, packaged_config

    return load_config(packaged_config("run", "tiny"),
                       [f"output_dir={root}", f"name={name}", f"data.train_limit={N_TRAIN}", *SETTINGS])  # fmt: skip


def _dist(stage: int, data_split: str, workers: int) -> DistConfig:
    return DistConfig(workers=workers, zero_stage=stage, data_split=data_split, health_check_interval_s=0.1,
                      sync_check_every=2, param_persistence_threshold=0)  # fmt: skip


def _one_process(cfg) -> dict[str, Any]:
    from polar_vbll.runner import run_method

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_method(cfg, zero_shot=False, progress=False).results


class Runs:
    """Each run once per module, on first use: ``get(key) -> (results, run folder)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, tuple[dict[str, Any], Path]] = {}
        self.seconds: dict[str, float] = {}

    def _workers(self, name: str, dist: DistConfig, stop: int | None = None) -> dict[str, Any]:
        from distributed.faults import StopAfter
        from distributed.launch import DistributedRunError, train_distributed

        cfg = _cfg(self.root, name)
        if stop is None:
            return train_distributed(cfg, dist=dist)
        with pytest.raises(DistributedRunError, match="stopped after step"):
            train_distributed(cfg, dist=dist, hooks=[StopAfter(stop)])
        return {}

    def get(self, key: str) -> tuple[dict[str, Any], Path]:
        if key in self.done:
            return self.done[key]
        t = time.perf_counter()
        name = key
        if key == "z3w2":
            res = self._workers(key, _dist(3, "shard", 2))
        elif key in ("w1_shard", "w1_replicate"):
            res = self._workers(key, _dist(0, key.split("_")[1], 1))
        elif key == "stopped":  # 2 workers, ZeRO-0, shard: stopped after the step-3 checkpoint
            res = self._workers(key, _dist(0, "shard", 2), stop=STOP)
            for copy in ("stopped_replicate", "stopped_one_process"):
                shutil.copytree(self.root / key, self.root / copy)
        elif key == "to_w1_shard":
            self.get("stopped")
            name = "stopped"
            res = self._workers(name, _dist(0, "shard", 1))
        elif key == "to_w1_replicate":
            self.get("stopped")
            name = "stopped_replicate"
            res = self._workers(name, _dist(0, "replicate", 1))
        elif key == "to_one_process":
            self.get("stopped")
            name = "stopped_one_process"
            res = _one_process(_cfg(self.root, name))
        else:
            raise KeyError(key)
        self.seconds[key] = time.perf_counter() - t
        self.done[key] = (res, self.root / name)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("data_split"))


def _losses(results: dict[str, Any], after: int = -1) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in results["training"]["history"] if h["step"] > after}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _largest_difference(a: dict, a_dir: Path, b: dict, b_dir: Path, after: int = -1) -> float:
    la, lb = _losses(a, after), _losses(b, after)
    assert la.keys() == lb.keys() and la
    ta, tb = _adapter(a_dir), _adapter(b_dir)
    assert ta.keys() == tb.keys()
    return max([*(abs(la[s] - lb[s]) for s in la), *((ta[k] - tb[k]).abs().max().item() for k in ta)])


@WORKERS
def test_two_workers_at_zero3_train_on_their_own_shards_and_stay_bitwise_identical(runs):
    res, run_dir = runs.get("z3w2")
    d, training = res["distributed"], res["training"]
    assert (d["world_size"], d["zero_stage"], d["data_split"], training["steps"]) == (2, 3, "shard", 6)
    assert d["replica_digests"][0] == d["replica_digests"][1]  # U, V, Theta, the head, the moments
    assert all(math.isfinite(h["loss"]) for h in training["history"]) and training["refits"] == 4
    sizes = res["split_sizes"]
    assert sizes["train"] == N_TRAIN
    for rank, record in enumerate(sorted(d["prefix"], key=lambda p: p["rank"])):
        for split, held in record["examples"].items():  # each rank's states: exactly its own shard
            start, stop = shard_bounds(sizes[split], rank, 2)
            assert held == stop - start, (rank, split, held)
            assert record["bytes"][split] > 0
        assert record["train_seconds"] > 0
    assert res["timings"]["prefix_s"] == max(p["train_seconds"] for p in d["prefix"])
    assert res["params"]["train.steps"] == 6 and (run_dir / "distributed.json").is_file()
    assert '"data_split": "shard"' in (run_dir / "distributed.json").read_text()
    from polar_vbll.checkpoint import load_checkpoint

    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]  # Ray names them by time
    assert load_checkpoint(latest / "state")["backend"]["data_split"] == "shard"  # what a resume compares


@WORKERS
@pytest.mark.slow
def test_one_worker_in_shard_mode_is_the_replicate_run(runs):
    shard, shard_dir = runs.get("w1_shard")
    replicate, replicate_dir = runs.get("w1_replicate")
    assert (shard["distributed"]["data_split"], replicate["distributed"]["data_split"]) == ("shard", "replicate")
    assert shard["distributed"]["prefix"][0]["examples"]["train"] == N_TRAIN
    worst = _largest_difference(shard, shard_dir, replicate, replicate_dir)
    print(f"1 worker, shard vs replicate: largest difference {worst:.3g}")
    assert worst <= 1e-6
    assert shard["metrics"]["eval"]["nll"] == pytest.approx(replicate["metrics"]["eval"]["nll"], abs=1e-6)


@WORKERS
@pytest.mark.slow
def test_two_workers_in_shard_mode_resumed_on_one_worker_follow_its_rule(runs):
    """The rule (docs/distributed.md): after a resume the steps follow the resuming run's worker count and
    data_split; at 1 worker, shard or replicate, that is one process's batch, so the resumed runs continue
    as the one-process resume of the same checkpoint does (within the sum-order tolerance)."""
    reference, reference_dir = runs.get("to_one_process")
    for key in ("to_w1_shard", "to_w1_replicate"):  # the second changes data_split at the resume: allowed
        res, run_dir = runs.get(key)
        assert res["training"]["resumed_from_step"] == STOP and res["training"]["steps"] == 6
        assert res["distributed"]["data_split"] == key.rsplit("_", 1)[1]
        worst = _largest_difference(res, run_dir, reference, reference_dir, after=STOP)
        print(f"2 workers (shard) resumed on 1 worker ({key}) vs one process: largest difference {worst:.3g}")
        assert worst <= TOL, key
