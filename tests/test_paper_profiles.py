"""The paper's protocol as compare profiles (`paper`, `paper-tiny`, `paper-cpu`), `extends:`, and the
comparison's cost columns (backbone passes, seconds per 1,000 questions, peak memory, stable rank)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import yaml
from typer.testing import CliRunner

from polar_vbll.compare.config import load_compare_config
from polar_vbll.compare.report import aggregate, markdown_table
from polar_vbll.config import packaged_config
from polar_vbll.errors import ConfigError
from polar_vbll.methods import METHODS
from polar_vbll.peak import PeakMemory
from polar_vbll_cli.app import app

runner = CliRunner()

#: The methods of the paper's comparison (BLoB's table plus the PoLAR rows), as the registry names them.
PAPER_METHODS = {"lora_mle", "lora_map", "mc_dropout", "ensemble", "laplace", "blob", "tfb", "polar_mle",
                 "polar_map", "polar_laplace", "polar_blob", "polar_vbll", "polar_vbll_la"}  # fmt: skip
BLOB_TASKS = ["winogrande", "arc_challenge", "arc_easy", "openbookqa", "boolq"]
OOD_SETS = ["arc_challenge", "arc_easy", "mmlu:college_chemistry", "mmlu:college_physics"]
SAMPLED = {"mc_dropout": 10, "ensemble": 3, "blob": 10, "polar_blob": 10, "tfb": 10}
MODEL = "/models/Llama-3.1-8B"  # never read: validating the profile loads no model


def _paper(*sets: str):
    return load_compare_config(packaged_config("compare", "paper"), [f"base.model.path={MODEL}", *sets])


def test_paper_is_refused_in_one_line_without_a_model_path():
    with pytest.raises(ConfigError, match=r"model.path is not set.*--set base.model.path=") as err:
        load_compare_config(packaged_config("compare", "paper"))
    assert "\n" not in str(err.value)
    result = runner.invoke(app, ["compare", "--config", "paper", "--no-track"])
    assert result.exit_code == 2 and "base.model.path" in result.output


def test_paper_expands_to_valid_run_configs_with_the_blob_protocol():
    c = _paper()
    assert c.tasks == BLOB_TASKS and c.seeds == [0, 1, 2] and set(c.methods) == PAPER_METHODS
    assert c.ood is not None and c.ood.train_task == "openbookqa" and c.ood.eval_tasks == OOD_SETS
    assert c.ood.limit is None  # the whole OOD sets
    seen = 0
    for method in c.methods:
        m = METHODS[method]
        for task in c.tasks:
            for seed in c.seeds:
                cfg = c.run_config(method, task, seed)  # validated (RunConfig): no model is read
                seen += 1
                adapter = m.adapter_kind.settings(cfg)
                assert (adapter.r, adapter.target_modules, adapter.layers) == (8, ["q_proj", "v_proj"], None)
                assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seed) == (5000, 4, seed)
                assert (cfg.model.source, cfg.model.path, cfg.model.max_length) == ("path", MODEL, 300)
                assert not cfg.train.cache_frozen_prefix  # every block adapted: nothing to cache
                assert cfg.data.ood_tasks == (OOD_SETS if task == "openbookqa" else [])
                assert m.predictive_kind.passes(cfg) == SAMPLED.get(method, 1)
                if m.adapter in ("lora", "blob"):  # the reference's LoRA-family optimizer
                    assert (cfg.optim.lr_theta, cfg.optim.warmup_ratio, adapter.alpha) == (1e-4, 0.06, 16)
                else:
                    assert (cfg.optim.lr_theta, adapter.alpha) == (4e-3, 32)
                # the output layer: BLoB's LoRA on the LM head -> a trainable head from the answer rows
                assert m.head_kind.training in ("theta", "eta")
    assert seen == 13 * 5 * 3


def _skeleton(model_type: str, **shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape))


#: the 8B backbones the profile documents, at their real shapes (built on the meta device: no weights)
EIGHT_B = {
    "llama": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256),
    "qwen3": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936),
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(EIGHT_B))
def test_paper_targets_q_and_v_of_every_block_of_an_8b_backbone(model_type):
    c = _paper()
    model = _skeleton(model_type, **EIGHT_B[model_type])
    blocks = EIGHT_B[model_type]["num_hidden_layers"]
    for kind in {METHODS[m].adapter for m in c.methods}:  # polar, lora, blob, polar_blob
        method = next(m for m in c.methods if METHODS[m].adapter == kind)
        cfg = c.run_config(method, "arc_easy", 0)
        a = METHODS[method].adapter_kind
        chosen = [t.name for t in a.select(model, a.settings(cfg))]
        assert len(chosen) == 2 * blocks
        assert {n.rsplit(".", 1)[-1] for n in chosen} == {"q_proj", "v_proj"}


def test_paper_cpu_and_tiny_extend_paper():
    paper = _paper()
    for name in ("paper-tiny", "paper-cpu"):
        c = load_compare_config(packaged_config("compare", name))
        assert c.name == name and set(c.methods) == set(paper.methods)
        cfg = c.run_config("polar_vbll", c.tasks[0], c.seeds[0])
        assert (cfg.polar.r, cfg.polar.target_modules) == (8, ["q_proj", "v_proj"])
    tiny = load_compare_config(packaged_config("compare", "paper-tiny"))
    assert (
        tiny.tasks == BLOB_TASKS
        and tiny.ood.eval_tasks == OOD_SETS
        and tiny.base["model"]["source"] == "tiny"
    )
    cpu = load_compare_config(packaged_config("compare", "paper-cpu"))
    assert cpu.tasks == ["sst2", "rte", "mrpc", "cb"] and cpu.base["model"]["source"] == "smollm2"
    assert cpu.run_config("lora_mle", "sst2", 0).optim.lr_theta == 1e-3  # its own, over paper's 1e-4


def test_extends_merges_over_the_parent_and_refuses_loops_and_unknown_parents(tmp_path):
    parent = {"name": "p", "tasks": ["sst2"], "seeds": [0], "methods": ["polar_mle"],
              "base": {"model": {"source": "tiny"}, "train": {"steps": 3, "batch_size": 2}}}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(parent))
    child = {"extends": "p.yaml", "name": "c", "seeds": [1, 2], "base": {"train": {"steps": 5}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(child))
    c = load_compare_config(tmp_path / "c.yaml", ["base.train.batch_size=4"])
    assert (c.name, c.tasks, c.seeds) == ("c", ["sst2"], [1, 2])  # lists replace, unset keys inherit
    assert c.base["train"] == {"steps": 5, "batch_size": 4} and c.base["model"] == {"source": "tiny"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**parent, "extends": "c.yaml"}))
    with pytest.raises(ConfigError, match="loops"):
        load_compare_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**child, "extends": "no-such-profile"}))
    with pytest.raises(ConfigError, match="neither a packaged profile"):
        load_compare_config(tmp_path / "c.yaml")


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory("cpu") as before:
        pass
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert peak.report()["kind"] in ("rss_peak", "rss_process_peak")
    if peak.kind == "rss_peak":  # the peak was reset at the start: the block's allocation shows, then is gone
        assert peak.bytes - before.bytes > 48 * 2**20


def test_the_lifetime_peak_keeps_what_a_phase_reset_hides():
    """A phase's measurement resets ``VmHWM``; the process's whole-run peak (what a command's memory is
    checked by, tests/child_peak.py) must still hold an allocation made and freed before that reset."""
    from polar_vbll.peak import lifetime_resident_peak, resident_peak

    if resident_peak() is None:
        pytest.skip("no /proc/self/status")
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    high = resident_peak()
    del block
    with PeakMemory("cpu") as phase:
        pass
    if phase.kind != "rss_peak":
        pytest.skip("VmHWM cannot be reset here")
    assert resident_peak() < high - 128 * 2**20  # the reset hid the block from VmHWM
    assert lifetime_resident_peak() > high - 8 * 2**20  # not from the lifetime peak (RSS counters lag by pages)


# ------------------------------------------------------------------------ paper-tiny, end to end
#: a subset of paper-tiny's methods run by default: every kind of predictive (one pass, MC dropout, ensemble,
#: BLoB sampling, TFB) and both LoRA's and PoLAR's stable ranks, on the OOD protocol's training task
SUBSET = ["lora_mle", "mc_dropout", "ensemble", "blob", "tfb", "polar_vbll"]


def _run(tmp, *sets: str):
    out = tmp / "runs"
    result = runner.invoke(app, ["compare", "--config", "paper-tiny", "--no-progress", "--no-track",
                                 "--set", f"output_dir={out}", *sets])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out / "paper-tiny", result


@pytest.fixture(scope="module")
def tiny_subset(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("paper"), "--set", "tasks=[openbookqa]", "--set", f"methods={SUBSET}")


def _check_costs(out, result, tasks, methods):
    ccfg = load_compare_config(packaged_config("compare", "paper-tiny"))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {(r["task"], r["method"]) for r in records} == {(t, m) for t in tasks for m in methods}
    for r in records:
        cfg = ccfg.run_config(r["method"], r["task"], r["seed"])
        method = METHODS[r["method"]]
        # passes: the configured sample counts (3 in paper-tiny), members for an ensemble, 1 otherwise
        assert r["passes_per_example"] == method.predictive_kind.passes(cfg)
        expected = {"mc_dropout": cfg.eval.mc_dropout_samples, "ensemble": cfg.eval.ensemble_members,
                    "blob": cfg.blob.eval_samples, "polar_blob": cfg.polar_blob.eval_samples,
                    "tfb": cfg.tfb.eval_samples}.get(r["method"], 1)  # fmt: skip
        assert r["passes_per_example"] == expected
        results = json.loads((out / r["task"] / r["method"] / "seed0" / "results.json").read_text())
        n = results["metrics"]["eval"]["n"]
        assert r["s_per_1k"] == pytest.approx(results["timings"]["test_predict_s"] / n * 1000)
        assert 0 < results["timings"]["test_predict_s"] <= results["timings"]["test_s"]
        assert r["peak_memory_kind"] in ("rss_peak", "rss_process_peak")  # the CPU
        assert 2**20 < r["peak_memory_bytes"] < 64 * 2**30
        rank = r["stable_rank_mean"]  # the adapters' final update: finite, at least 1 once trained, at most r
        assert math.isfinite(rank) and 1.0 - 1e-6 <= rank <= method.adapter_kind.settings(cfg).r + 1e-6
    md = (out / "results.md").read_text()
    assert "| s / 1k q. | peak mem (GiB) | stable rank |" in md
    rows = aggregate([{**r, "method": METHODS[r["method"]].label} for r in records])
    for row in rows:
        cells = markdown_table([row]).splitlines()[-1].split(" | ")
        assert cells[9] == f"{row['passes_per_example']:g}" and cells[12] == f"{row['stable_rank_mean']:.2f}"
        assert cells[11].startswith(f"{row['peak_memory_gib']:.2f}")
    assert "| openbookqa | arc_challenge |" in md and "mmlu:college_physics" in md  # the OOD sets


def test_paper_tiny_subset_end_to_end_with_cost_columns(tiny_subset):
    out, result = tiny_subset
    _check_costs(out, result, ["openbookqa"], SUBSET)


@pytest.mark.slow
def test_paper_tiny_whole_profile_end_to_end(tmp_path):
    # 13 methods x 5 tasks, OOD on 4 sets: about 4 min of CPU on 2 cores, 5-7 min wall
    out, result = _run(tmp_path)
    ccfg = load_compare_config(packaged_config("compare", "paper-tiny"))
    _check_costs(out, result, ccfg.tasks, ccfg.methods)
