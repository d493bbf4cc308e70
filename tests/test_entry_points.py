"""Every field of the run config against every entry point: honoured there, or refused with one line and
exit status 2. A field added to the config and not to :data:`TABLE` fails
``test_the_table_covers_every_field``.

"Honoured" is checked at the seam where an entry point hands the config to the shared code (the one
trainer and the one evaluation): the config that arrives there carries the value the user gave. The
seams are ``polar_vbll.runner.run_method`` (``train``), ``CompareRunner.run_config`` (``compare``: each
run's config), ``distributed.launch.prepare_run``'s result (``train --workers``: what the workers receive)
and the base config of a search (``polar-vbll tune``) together with ``trial_config`` (what each trial
trains). A spy there records the config and stops the command before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from polar_vbll.config import RunConfig, packaged_config
from polar_vbll.support import config_fields, field_value
from polar_vbll_cli.app import app
from tests.optional import for_entry

H, R = "honoured", "refused"
ENTRIES = ("train", "workers", "compare", "tune")
#: The entry points that need optional packages: their names in polar_vbll.extras.ENTRIES.
NEEDS = {"workers": "polar-vbll train --workers", "tune": "polar-vbll tune"}
ALL = {e: H for e in ENTRIES}
NOT_COMPARE = {**ALL, "compare": R}  # set by the comparison for every run (tasks, seeds, methods, names)

#: Every field: a valid value other than the packaged ``tiny`` config's, and what each entry point does.
TABLE: dict[str, tuple[Any, dict[str, str]]] = {
    "name": ("probe", NOT_COMPARE),
    "output_dir": ("elsewhere", NOT_COMPARE),
    "method": ("polar_vbll", NOT_COMPARE),
    "model.source": ("smollm2", ALL),
    "model.path": ("/no/such/model", ALL),
    "model.revision": ("v1.0", ALL),
    "model.dtype": ("bfloat16", ALL),
    "model.device": ("cpu", ALL),
    "model.add_bos": (True, ALL),
    "model.max_length": (200, ALL),
    "model.tiny_hidden": (32, ALL),
    "model.tiny_layers": (3, ALL),
    "model.tiny_seed": (1, ALL),
    "data.task": ("openbookqa", NOT_COMPARE),
    "data.split_seed": (1, ALL),
    "data.train_split": ("validation", ALL),
    "data.val_split": ("train", ALL),
    "data.eval_split": ("validation", ALL),
    "data.train_limit": (8, ALL),
    "data.val_limit": (8, ALL),
    "data.eval_limit": (8, ALL),
    "data.ood_tasks": (["arc_challenge"], ALL),  # compare without an `ood:` section; refused with one
    "data.ood_split": ("validation", ALL),
    "data.ood_limit": (4, ALL),
    # refused beside tiny's built-in task (a mapping is for hf:/csv:/parquet:/json: sources, where every entry
    # point reads it through the one session.load_examples: tests/test_data_sources.py trains with one)
    "data.columns": ({"answer": "label"}, {e: R for e in ENTRIES}),
    "polar.r": (2, ALL),
    "polar.alpha": (4.0, ALL),
    "polar.target_modules": (["q_proj"], ALL),
    "polar.layers": ([-2], ALL),
    "polar.dropout": (0.1, ALL),
    "polar.init_seed": (3, NOT_COMPARE),
    "lora.r": (2, ALL),
    "lora.alpha": (4.0, ALL),
    "lora.target_modules": (["v_proj"], ALL),
    "lora.layers": ([-2], ALL),
    "lora.dropout": (0.2, ALL),
    "lora.init_seed": (3, NOT_COMPARE),
    "blob.r": (2, ALL),
    "blob.alpha": (4.0, ALL),
    "blob.target_modules": (["v_proj"], ALL),
    "blob.layers": ([-2], ALL),
    "blob.dropout": (0.2, ALL),
    "blob.init_seed": (3, NOT_COMPARE),
    "blob.eps": (-2.0, ALL),
    "blob.beta": (0.5, ALL),
    "blob.kl_lr": (0.02, ALL),
    "blob.kl_reweighting": (False, ALL),
    "blob.dataset_rescaling": (False, ALL),
    "blob.gamma": (4.0, ALL),
    "blob.eval_samples": (3, ALL),
    "polar_blob.r": (2, ALL),
    "polar_blob.alpha": (4.0, ALL),
    "polar_blob.target_modules": (["v_proj"], ALL),
    "polar_blob.layers": ([-2], ALL),
    "polar_blob.dropout": (0.2, ALL),
    "polar_blob.init_seed": (3, NOT_COMPARE),
    "polar_blob.eps": (-2.0, ALL),
    "polar_blob.beta": (0.5, ALL),
    "polar_blob.kl_lr": (0.02, ALL),
    "polar_blob.kl_reweighting": (False, ALL),
    "polar_blob.dataset_rescaling": (False, ALL),
    "polar_blob.gamma": (4.0, ALL),
    "polar_blob.eval_samples": (3, ALL),
    "tfb.min_std": (0.002, ALL),
    "tfb.max_std": (0.02, ALL),
    "tfb.threshold": (0.01, ALL),
    "tfb.iterations": (3, ALL),
    "tfb.search_samples": (4, ALL),
    "tfb.eval_samples": (4, ALL),
    "tfb.anchor": ("validation", ALL),
    "tfb.criterion": ("relative", ALL),
    "optim.method": ("landing", ALL),
    "optim.retraction": ("qr", ALL),
    "optim.second_moment": ("factor", ALL),
    "optim.lr_stiefel": (0.01, ALL),
    "optim.lr_theta": (0.02, ALL),
    "optim.landing_lambda": (0.01, ALL),
    "optim.landing_safe_distance": (0.05, ALL),
    "optim.betas": ([0.8, 0.99], ALL),
    "optim.eps": (1e-6, ALL),
    "optim.theta_weight_decay": (0.01, ALL),
    "optim.warmup_ratio": (0.1, ALL),
    "optim.schedule": ("constant", ALL),
    "optim.max_grad_norm": (1.0, ALL),
    "train.steps": (4, ALL),
    "train.batch_size": (8, ALL),
    "train.eval_batch_size": (8, ALL),
    "train.seed": (5, NOT_COMPARE),
    "train.cache_frozen_prefix": (False, ALL),
    "train.prefix_cache": ("memory", ALL),
    "train.prefix_cache_dtype": ("float32", ALL),
    "train.eval_every": (2, ALL),
    "train.checkpoint_every": (2, ALL),
    "train.keep_checkpoints": (3, ALL),
    "train.alternation": ("per_step", ALL),
    "train.round_steps": (2, ALL),
    "train.final_head_refit": (False, ALL),
    "head.vbll.cov": ("lowrank", ALL),
    "head.vbll.cov_rank": (2, ALL),
    "head.vbll.prior_scale": (2.0, ALL),
    "head.vbll.prior_mean": ("init", ALL),
    "head.vbll.noise_init": (0.2, ALL),
    "head.vbll.wishart_scale": (2.0, ALL),
    "head.vbll.dof": (2.0, ALL),
    "head.vbll.init_cov_scale": (0.01, ALL),
    "head.vbll.predictive": ("probit", ALL),
    "head.features.standardize": (False, ALL),
    "head.features.bias": (False, ALL),
    "head.vbll.prior_fit": ("empirical_bayes", ALL),
    "head.linear.prior": ("gaussian", ALL),
    "head.linear.prior_scale": (2.0, ALL),
    "head.linear.lr": (0.01, ALL),
    "head.fit.optimizer": ("adam", ALL),
    "head.fit.max_iter": (50, ALL),
    "head.fit.tolerance": (1e-4, ALL),
    "head.fit.prior_rounds": (5, ALL),
    "head.fit.prior_tolerance": (1e-3, ALL),
    "eval.temperature_scaling": (False, ALL),
    "head.vbll.mc_samples": (100, ALL),
    "head.vbll.mc_seed": (1, ALL),
    "head.vbll.init_seed": (2, NOT_COMPARE),
    "head.vbll.allow_large_dense": (True, ALL),
    "head.vbll.elbo": ("mc", ALL),
    "head.vbll.elbo_samples": (8, ALL),
    "head.fit.lr": (0.05, ALL),
    "head.fit.betas": ([0.8, 0.99], ALL),
    "head.fit.steps": (10, ALL),
    "head.fit.batch_size": (4, ALL),
    "head.fit.seed": (3, NOT_COMPARE),
    "head.laplace.structure": ("kron", ALL),
    "head.laplace.mean": ("trained", ALL),
    "head.laplace.predictive": ("mc", ALL),
    "head.laplace.mc_samples": (100, ALL),
    "head.laplace.mc_seed": (1, ALL),
    "eval.mc_dropout_samples": (5, ALL),
    "eval.ensemble_members": (2, ALL),
    "train.activation_checkpointing": (True, ALL),
    "train.compile": (True, {"train": H, "workers": R, "compare": H, "tune": R}),
    "decision.risk": (0.2, ALL),
    "decision.delta": (0.05, ALL),
    "decision.fwer": ("bonferroni", ALL),
    "decision.alpha": (0.2, ALL),
    "decision.ood_pass": (0.9, ALL),
    "decision.thresholds": (20, ALL),
}

runner = CliRunner()


class Captured(Exception):
    """Raised by a spy at an entry point's seam, carrying the config that arrived there."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__("captured")
        self.cfg = cfg


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=list))


def _tiny_base() -> dict[str, Any]:
    """The packaged tiny config as a comparison's ``base`` (without the keys a comparison sets itself)."""
    data = yaml.safe_load(packaged_config("run", "tiny").read_text())
    data["data"].pop("task")
    return {k: v for k, v in data.items() if k not in ("name", "output_dir", "method")}


def _spies(monkeypatch, entry: str) -> None:
    if entry == "train":
        import polar_vbll.runner

        def seam(cfg, **kw):
            raise Captured(cfg)

        monkeypatch.setattr(polar_vbll.runner, "run_method", seam)
    elif entry == "compare":
        from polar_vbll.compare.runner import CompareRunner

        real = CompareRunner.run_config

        def seam(self, method, task, seed):
            raise Captured(real(self, method, task, seed))

        monkeypatch.setattr(CompareRunner, "run_config", seam)
    elif entry == "workers":
        import distributed.launch as launch

        real = launch.prepare_run

        def seam(cfg, dist, *args, **kwargs):
            raise Captured(real(cfg, dist, *args, **kwargs))

        monkeypatch.setattr(launch, "prepare_run", seam)
    else:  # tune: the base config every trial starts from, after every check of the search
        import tune_spaces.driver as driver
        from tune_spaces import spaces

        monkeypatch.setitem(spaces.SPACES, "probe", dict)  # searches nothing: the base alone decides

        def seam(folder, name, settings, space, cfg, *args):
            raise Captured(cfg)

        monkeypatch.setattr(driver, "_open_parent", seam)


def _invoke(entry: str, path: str | None, value: Any, tmp: Path):
    prefix = "base." if entry == "compare" else ""  # a comparison's run settings live under `base`
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    sets = [] if path is None else ["--set", f"{prefix}{path}={text}"]
    if entry == "train":
        return runner.invoke(app, ["train", "--config", "tiny", "--no-track", "--no-progress", *sets])
    if entry == "workers":
        return runner.invoke(app, ["train", "--config", "tiny", "--workers", "2", "--no-track", *sets])
    if entry == "tune":
        return runner.invoke(app, ["tune", "--space", "probe", "--config", "tiny", *sets])
    compare = {"name": "c", "output_dir": str(tmp / "cmp"), "tasks": ["arc_easy"], "seeds": [0],
               "methods": ["polar_mle"], "base": _tiny_base()}  # fmt: skip
    (tmp / "c.yaml").write_text(yaml.safe_dump(compare))
    return runner.invoke(app, ["compare", "--config", str(tmp / "c.yaml"), "--no-track", "--no-progress", *sets])


def _arrived(entry: str, path: str, value: Any, cfg: RunConfig) -> bool:
    got = field_value(cfg, path)
    if path == "output_dir":  # the workers' storage path is made absolute
        return Path(got).resolve() == Path(value).resolve()
    if entry == "tune" and path not in ("name", "output_dir"):
        from tune_spaces.trial import trial_config

        trial = trial_config(cfg.model_dump(mode="json"), {}, "trial", "out")  # what each trial trains
        if _norm(field_value(trial, path)) != _norm(value):
            return False
    return _norm(got) == _norm(value)


def test_the_table_covers_every_field():
    fields = config_fields()
    missing = [f for f in fields if f not in TABLE]
    stale = [f for f in TABLE if f not in fields]
    assert not missing, f"classify these new config fields in TABLE (honoured or refused per entry point): {missing}"
    assert not stale, f"TABLE names fields the config no longer has: {stale}"
    tiny = RunConfig.model_validate(yaml.safe_load(packaged_config("run", "tiny").read_text()))
    same = [f for f, (v, _) in TABLE.items() if _norm(field_value(tiny, f)) == _norm(v)]
    assert not same, f"these TABLE values equal the tiny config's, so they prove nothing: {same}"


def _marked(entries):
    """The entry points as parameters, each marked with the optional packages it needs."""
    return [pytest.param(e, marks=for_entry(NEEDS[e])) if e in NEEDS else e for e in entries]


@pytest.mark.parametrize("entry", _marked(ENTRIES))
def test_every_field_is_honoured_or_refused(entry, tmp_path, monkeypatch):
    _spies(monkeypatch, entry)
    problems = []
    for path, (value, status) in TABLE.items():
        result = _invoke(entry, path, value, tmp_path)
        if status[entry] == H:
            if not isinstance(result.exception, Captured):
                problems.append(f"{path}: expected to reach the shared code, got exit {result.exit_code}: "
                                f"{result.output.strip()[-300:]}")  # fmt: skip
            elif not _arrived(entry, path, value, result.exception.cfg):
                problems.append(f"{path}: {value!r} did not arrive ({field_value(result.exception.cfg, path)!r})")
        else:
            one_line = result.exit_code == 2 and "Traceback" not in result.output
            if not (one_line and path in result.output):
                problems.append(f"{path}: expected exit 2 naming the field, got {result.exit_code}: {result.output}")
    assert not problems, f"{entry}:\n" + "\n".join(problems)


@pytest.mark.parametrize("entry", _marked(["workers", "tune"]))
@pytest.mark.parametrize("method", ["zero_shot", "ensemble"])
def test_methods_the_workers_do_not_run_are_refused_in_one_line(entry, method, tmp_path, monkeypatch):
    _spies(monkeypatch, entry)
    result = _invoke(entry, "method", method, tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"method = '{method}'" in result.output and "polar-vbll train" in result.output


def test_every_method_runs_in_train_and_compare(tmp_path, monkeypatch):
    from polar_vbll.methods import METHODS

    for entry in ("train", "compare"):
        _spies(monkeypatch, entry)
        for method in METHODS:
            if entry == "train":
                result = _invoke(entry, "method", method, tmp_path)
            else:  # a comparison names its methods in `methods:`
                compare = {"name": "c", "output_dir": str(tmp_path / "cmp"), "tasks": ["arc_easy"], "seeds": [0],
                           "methods": [method], "base": _tiny_base()}  # fmt: skip
                (tmp_path / "c.yaml").write_text(yaml.safe_dump(compare))
                result = runner.invoke(app, ["compare", "--config", str(tmp_path / "c.yaml"), "--no-track"])
            assert isinstance(result.exception, Captured), (entry, method, result.output)
            assert result.exception.cfg.method == method


def test_compare_refuses_ood_fields_in_base_when_it_has_an_ood_section(tmp_path):
    compare = {"name": "c", "output_dir": str(tmp_path), "tasks": ["openbookqa"], "seeds": [0],
               "methods": ["polar_mle"], "base": {**_tiny_base(), "data": {"ood_limit": 3}},
               "ood": {"train_task": "openbookqa", "eval_tasks": ["arc_easy"]}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(compare))
    result = runner.invoke(app, ["compare", "--config", str(tmp_path / "c.yaml"), "--no-track"])
    assert result.exit_code == 2 and "base.data.ood_limit" in result.output and "ood.limit" in result.output
