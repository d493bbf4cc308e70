"""The distributed building blocks without Ray: sharding, the coordinator actor's body, the collectives on
two real gloo processes, and the consolidated DeepSpeed optimizer state at every ZeRO stage."""

from __future__ import annotations

import asyncio
import datetime
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from tests.optional import skip_module_unless

skip_module_unless("deepspeed")

from distributed.config import DistConfig, check_batch_layout  # noqa: E402
from distributed.head_actor import HeadCoordinatorService, StaleGeneration  # noqa: E402
from distributed.sharding import lockstep_batches, shard_bounds, step_micro_batches  # noqa: E402
from polar_vbll.config import HeadFitConfig, parse_config  # noqa: E402
from polar_vbll.errors import ConfigError  # noqa: E402
from polar_vbll.heads import VBLLHead  # noqa: E402
from polar_vbll.training import HeadCoordinator, batch_indices  # noqa: E402

from .conftest import make_tiny_llama  # noqa: E402

# ------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_rank_micro_batches_reassemble_the_global_batch(world, accum):
    for step in (0, 3, 7):  # step 7 crosses an epoch boundary of n=20, batch 8
        parts = [step_micro_batches(step, 20, 8, 5, r, world, accum) for r in range(world)]
        assert all(len(p) == accum and all(len(mb) == 8 // (world * accum) for mb in p) for p in parts)
        assert [i for p in parts for mb in p for i in mb] == batch_indices(step, 20, 8, 5)


@pytest.mark.parametrize("n,world,bs", [(32, 2, 16), (33, 2, 16), (5, 4, 2), (3, 4, 8), (1, 2, 4), (0, 2, 4)])
def test_lockstep_batches_cover_each_example_once_in_equal_counts(n, world, bs):
    per_rank = [lockstep_batches(n, r, world, bs) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1  # every rank runs the same number of forward passes (ZeRO-3 gathers)
    assert [len(b.idx) for b in per_rank[0]] == [len(b.idx) for b in per_rank[-1]]
    real = [i for batches in per_rank for b in batches for i in b.idx[: b.n_real]]
    assert real == list(range(n))  # rank order = example order
    for r, batches in enumerate(per_rank):
        start, stop = shard_bounds(n, r, world)
        assert [i for b in batches for i in b.idx[: b.n_real]] == list(range(start, stop))
        assert all(0 <= i < max(n, 1) for b in batches for i in b.idx)


def test_a_global_batch_that_does_not_split_is_refused():
    cfg = parse_config({"train": {"batch_size": 6}})
    assert check_batch_layout(cfg, DistConfig(workers=2)) == 3
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_batch_layout(cfg, DistConfig(workers=2, grad_accum=2))


# ------------------------------------------------------------------------------- coordinator service


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g), torch.full((n,), 3)


def test_coordinator_service_refits_once_on_all_shards_in_rank_order():
    fit = HeadFitConfig(lr=0.05, steps=4, batch_size=4)  # minibatches: the row order matters
    shards = [_rows(5, 1), _rows(6, 2)]

    async def scenario():
        service = HeadCoordinatorService()
        gen = await service.start(VBLLHead(8, 3, dataset_size=11), fit, None)
        # rank 1 arrives first: the result must not depend on arrival order
        answers = await asyncio.gather(
            service.refit_shard(gen, 0, 1, 2, *shards[1], None),
            service.refit_shard(gen, 0, 0, 2, *shards[0], None),
        )
        with pytest.raises(StaleGeneration):
            await service.refit_shard(gen - 1, 1, 0, 2, *shards[0], None)
        return answers, await service.state_dict()

    (a, b), state = asyncio.run(scenario())
    assert a is b and a["refits"] == 1 and state["refits"] == 1

    reference = HeadCoordinator(VBLLHead(8, 3, dataset_size=11), fit)
    f, y, c = (torch.cat([s[j] for s in shards]) for j in range(3))
    expected = reference.refit(f, y, c)
    for k, v in expected.items():
        assert torch.equal(a["head"][k], v), k


def test_coordinator_service_restart_releases_waiters_of_the_old_group():
    async def scenario():
        service = HeadCoordinatorService()
        gen = await service.start(VBLLHead(8, 3, dataset_size=5), HeadFitConfig(steps=1), None)
        waiting = asyncio.ensure_future(service.refit_shard(gen, 0, 0, 2, *_rows(5, 0), None))
        await asyncio.sleep(0)  # rank 1 never comes: its worker died
        await service.start(VBLLHead(8, 3, dataset_size=5), HeadFitConfig(steps=1), None)
        with pytest.raises(StaleGeneration):
            await waiting

    asyncio.run(scenario())


# ------------------------------------------------------------------------- two gloo processes, no Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, out: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, tmp_path: Path, world: int = 2, *args) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; their return values, by rank."""
    torch.multiprocessing.spawn(_entry, args=(world, _free_port(), fn, str(tmp_path), args), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _tiny_polar():
    from polar_vbll.adapters import PolarConfig, inject_polar

    return inject_polar(make_tiny_llama(seed=0), PolarConfig(r=4, alpha=8))


def _toy_batch(n: int = 8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (n, 10), generator=g)
    return ids, torch.ones_like(ids), torch.randn(4, 64, generator=g), torch.randint(0, 4, (n,), generator=g)


def _collectives(rank: int, world: int) -> dict:
    from distributed.collectives import (
        ReplicaDivergence,
        allreduce_mean_,
        bank_gradients,
        gather_rows,
        verify_replicas,
    )
    from distributed.sharding import rank_slice
    from polar_vbll.backbone import last_token_features

    polar = _tiny_polar()
    with torch.no_grad():  # Theta != 0, otherwise every U, V gradient is exactly zero
        for t in polar.theta_parameters():
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(7)))
    ids, mask, w, y = _toy_batch()
    factors = polar.stiefel_parameters()

    def grads_of(rows: list[int]) -> list[torch.Tensor]:
        for p in factors:
            p.grad = None
        phi = last_token_features(polar.base_model, ids[rows], mask[rows])
        torch.nn.functional.cross_entropy(phi @ w.T, y[rows]).backward()
        return bank_gradients(factors)

    out = {"full": [g.clone() for g in grads_of(list(range(8)))]}
    mine = grads_of(rank_slice(list(range(8)), rank, world))
    out["local"] = [g.clone() for g in mine]
    allreduce_mean_(mine)
    out["averaged"] = [g.clone() for g in mine]

    named = polar.adapter_state_dict()
    out["digest"] = verify_replicas(named, "before")
    key = "polar_bank.polar_groups.n64_r4"
    if rank == 1:  # one ulp on one entry of one rank
        named[key].view(-1)[5] = torch.nextafter(named[key].view(-1)[5], torch.tensor(2.0))
    try:
        verify_replicas(named, "after step 3")
        out["error"] = None
    except ReplicaDivergence as exc:
        out["error"] = str(exc)
    out["rows"] = gather_rows(torch.full((rank + 1, 2), float(rank)))
    return out


def _both(rank: int, world: int) -> dict:
    return {"collectives": _collectives(rank, world), "theta": _theta_state(rank, world, (0, 1, 2, 3))}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """One spawn of two gloo processes for every check below (starting them costs ~10 s on 2 cores)."""
    return _spawn(_both, tmp_path_factory.mktemp("ranks"))


def test_two_rank_collectives(two_ranks):
    """One flat all-reduce of half-batch gradients gives the full-batch gradient; a one-ulp difference on
    one rank is caught and named on every rank; rows of uneven length gather in rank order."""
    results = [r["collectives"] for r in two_ranks]
    for r in results:
        for avg, full, local in zip(r["averaged"], r["full"], r["local"], strict=True):
            torch.testing.assert_close(avg, full, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(local, full, atol=1e-4)  # each half alone is not the full gradient
        assert r["error"] is not None
        assert "after step 3" in r["error"] and "rank 1 differs" in r["error"]
        assert "polar_bank.polar_groups.n64_r4" in r["error"]
        assert "n128_r4" not in r["error"] and "polar_theta" not in r["error"]
        assert torch.equal(r["rows"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert results[0]["digest"] == results[1]["digest"]
    for a, b in zip(results[0]["averaged"], results[1]["averaged"], strict=True):
        assert torch.equal(a, b)  # the replicas step on bitwise the same gradient


# ------------------------------------------------------------------- DeepSpeed: Theta optimizer state


def _theta_state(rank: int, world: int, stages: tuple[int, ...]) -> dict:
    """Per stage: 2 steps, consolidate the Theta AdamW state, 1 more step; then a fresh engine restored
    from the consolidated state (Theta loaded before deepspeed.initialize) takes that step again."""
    from distributed.engine import (
        build_engine,
        deepspeed_config,
        gathered,
        load_theta_optimizer_state,
        local_parameter_bytes,
        theta_optimizer_state,
    )
    from distributed.sharding import rank_slice
    from polar_vbll.heads import DeterministicHead
    from polar_vbll.training import build_optimizers

    from .test_train import _split

    cfg = parse_config({"optim": {"lr_theta": 0.05}, "train": {"batch_size": 8, "cache_frozen_prefix": False}})
    enc = _split(n=16)

    def build(stage: int, theta: list[torch.Tensor] | None):
        polar = _tiny_polar()
        head = DeterministicHead(polar.base_model.lm_head.weight[3:7])  # before ZeRO-3 partitions it
        if theta is not None:
            with torch.no_grad():
                for p, v in zip(polar.theta_parameters(), theta, strict=True):
                    p.copy_(v)
        _, theta_opt = build_optimizers(polar, cfg.optim)
        ds = deepspeed_config(cfg, DistConfig(zero_stage=stage, param_persistence_threshold=0), 4)
        engine, _ = build_engine(polar.base_model, theta_opt, ds, pad_id=0, train_cfg=cfg.train)
        return polar, head, engine

    def step(polar, head, engine, s: int) -> None:
        idx = rank_slice(batch_indices(s, 16, 8, 0), rank, world)
        engine.backward(head.loss(engine(enc, idx), enc.labels[idx], enc.n_choices[idx]))
        engine.step()

    def full_theta(polar, engine) -> list[torch.Tensor]:
        params = list(polar.theta_parameters())
        with gathered(engine, params):
            return [p.detach().clone() for p in params]

    out = {}
    for stage in stages:
        polar, head, engine = build(stage, None)
        mem = local_parameter_bytes(polar.base_model)
        for s in range(2):
            step(polar, head, engine, s)
        theta2 = full_theta(polar, engine)
        state = theta_optimizer_state(engine, list(polar.theta_parameters()))
        step(polar, head, engine, 2)
        straight = full_theta(polar, engine)

        polar_b, head_b, engine_b = build(stage, theta2)
        load_theta_optimizer_state(engine_b, list(polar_b.theta_parameters()), state)
        step(polar_b, head_b, engine_b, 2)
        out[stage] = {
            "state": state,
            "straight": straight,
            "resumed": full_theta(polar_b, engine_b),
            "mem": mem,
        }
    return out


def test_consolidated_theta_optimizer_state_at_every_zero_stage(two_ranks):
    """At ZeRO 1-3 DeepSpeed keeps Theta's AdamW moments in flat partitions; the consolidated state equals
    ZeRO-0's (= torch.optim.AdamW's own state_dict), and restoring it continues bit for bit."""
    results = [r["theta"] for r in two_ranks]
    for r in results:
        reference = r[0]["state"]
        assert reference["state"] and float(reference["state"][0]["step"]) == 2.0
        for stage, res in r.items():
            st = res["state"]
            assert sorted(st["state"]) == sorted(reference["state"]), stage
            for i, s in st["state"].items():
                assert float(s["step"]) == 2.0
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(s[key], reference["state"][i][key], atol=1e-6, rtol=1e-4)
            assert {k: v for k, v in st["param_groups"][0].items() if k != "params"}.keys() >= {"lr", "betas"}
            for a, b in zip(res["straight"], res["resumed"], strict=True):
                assert torch.equal(a, b), f"stage {stage}: resumed step differs"
            assert any(t.abs().max() > 0 for t in res["straight"])
        # ZeRO-3 holds half of the backbone per rank; the other stages hold all of it
        assert r[3]["mem"]["local"] * 2 == pytest.approx(r[3]["mem"]["full"], rel=0.01)
        assert r[0]["mem"]["local"] == r[0]["mem"]["full"]
    # the consolidated state loads into a one-process torch AdamW over the same Thetas
    polar = _tiny_polar()
    opt = torch.optim.AdamW(list(polar.theta_parameters()), lr=0.05)
    opt.load_state_dict(results[0][3]["state"])
    assert math.isclose(float(opt.state[polar.theta_parameters()[0]]["step"]), 2.0)


# ------------------------------------------------------------- DeepSpeed: memory settings (issue #25 part 1)


def test_zero3_gathering_is_memory_first_on_cpu_workers_and_deepspeeds_own_on_gpus():
    """CPU workers release each gathered block at once and prefetch nothing (the 2B benchmark's run peak
    per worker: 2,514 -> 1,873 MB at 4 workers); GPU workers keep DeepSpeed's defaults; a set value wins."""
    from distributed.engine import deepspeed_config

    cfg = parse_config({"model": {"dtype": "bfloat16"}})
    keys = ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size")
    cpu = deepspeed_config(cfg, DistConfig(zero_stage=3), 4)
    assert {k: cpu["zero_optimization"][k] for k in keys} == dict.fromkeys(keys, 0)
    gpu = deepspeed_config(cfg, DistConfig(zero_stage=3, use_gpu=True), 4)
    assert not set(keys) & set(gpu["zero_optimization"])
    mine = deepspeed_config(cfg, DistConfig(zero_stage=3, max_live_parameters=10**8, reduce_bucket_size=123), 4)
    assert mine["zero_optimization"]["stage3_max_live_parameters"] == 10**8
    assert mine["zero_optimization"]["reduce_bucket_size"] == 123
    assert deepspeed_config(cfg, DistConfig(zero_stage=0), 4)["zero_optimization"] == {"stage": 0}
    # DeepSpeed's bf16 mode: at ZeRO-3 only (zero.Init partitions in it); stages 0-2 keep torch's AdamW
    assert [deepspeed_config(cfg, DistConfig(zero_stage=s), 4)["bf16"]["enabled"] for s in (0, 1, 2, 3)] == [
        False, False, False, True,
    ]


def test_the_reduction_bucket_is_sized_to_the_trainable_parameters_unless_set():
    from distributed.engine import with_bucket_size

    base = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    sized = with_bucket_size(base, 4096)
    assert sized["zero_optimization"]["reduce_bucket_size"] == 4096
    assert "reduce_bucket_size" not in base["zero_optimization"]  # the caller's config is not changed
    assert sized["bf16"] == base["bf16"]
    kept = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 10}}
    assert with_bucket_size(kept, 4096) == kept
    assert with_bucket_size({"zero_optimization": {"stage": 0}}, 4096) == {"zero_optimization": {"stage": 0}}
