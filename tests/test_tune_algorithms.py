"""Searches with Ray Tune's own algorithms (tune_spaces.algorithms), YAML space files (tune_spaces.space_files)
and the best trial's model as a Tune checkpoint: the space files against hand-written domains, the early
one-line refusals (nothing written), the searchers and schedulers as Tune builds them, and one real
``polar-vbll tune --search optuna --trials 2`` run through the command line (tiny Llama, 4 steps, 2 CPU
workers per trial) whose experiment is then reopened with Tune's own API.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.optional import skip_module_unless

skip_module_unless("ray", "deepspeed", "mlflow")

from typer.testing import CliRunner  # noqa: E402

from polar_vbll.config import load_config, packaged_config  # noqa: E402
from polar_vbll.errors import ConfigError  # noqa: E402
from polar_vbll_cli.app import app  # noqa: E402
from tune_spaces import driver  # noqa: E402
from tune_spaces.algorithms import check_searcher, make_scheduler, make_searcher  # noqa: E402
from tune_spaces.space_files import load_space_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVERY_DOMAIN = """\
method: polar_vbll
optim.lr_theta: {loguniform: [1.0e-4, 1.0e-2]}
head.vbll.prior_scale: {uniform: [0.1, 1.0]}
polar.r: {choice: [2, 4]}
head.vbll.cov_rank: {randint: [1, 5]}
head.vbll.dof: {quniform: [1.0, 5.0, 0.5]}
optim.lr_stiefel: {qloguniform: [1.0e-3, 1.0e-2, 1.0e-3]}
head.fit.optimizer: {grid_search: [lbfgs, adam]}
polar.target_modules: [q_proj, v_proj]
"""


def _shape(dom):
    """A domain as plain data: its class, bounds, sampler, quantum and categories."""
    from ray.tune.search.sample import Quantized

    if not hasattr(dom, "get_sampler"):
        return dom
    sampler, q = dom.get_sampler(), None
    if isinstance(sampler, Quantized):
        sampler, q = sampler.sampler, sampler.q
    return (type(dom).__name__, getattr(dom, "lower", None), getattr(dom, "upper", None), type(sampler).__name__, q,
            list(getattr(dom, "categories", [])))  # fmt: skip


def _tiny_base(tmp_path):
    return load_config(packaged_config("run", "tiny"), [f"output_dir={tmp_path}"]).model_dump(mode="json")


# ------------------------------------------------------------------------------------- space files
def test_a_space_file_becomes_the_hand_written_tune_domains(tmp_path):
    from ray import tune

    path = tmp_path / "space.yaml"
    path.write_text(EVERY_DOMAIN)
    space, source = load_space_file(path)
    expected = {
        "method": "polar_vbll",
        "optim.lr_theta": tune.loguniform(1e-4, 1e-2),
        "head.vbll.prior_scale": tune.uniform(0.1, 1.0),
        "polar.r": tune.choice([2, 4]),
        "head.vbll.cov_rank": tune.randint(1, 5),
        "head.vbll.dof": tune.quniform(1.0, 5.0, 0.5),
        "optim.lr_stiefel": tune.qloguniform(1e-3, 1e-2, 1e-3),
        "head.fit.optimizer": tune.grid_search(["lbfgs", "adam"]),
        "polar.target_modules": ["q_proj", "v_proj"],
    }
    assert list(space) == list(expected)
    assert {k: _shape(v) for k, v in space.items()} == {k: _shape(v) for k, v in expected.items()}
    assert source.path == str(path.resolve()) and source.name == "space"
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    driver.check_space(space, _tiny_base(tmp_path), "s", "space file")  # every value fits the run config


def test_the_shipped_example_space_is_packaged_and_fits_the_tiny_config(tmp_path):
    import tomllib

    example = ROOT / "tune_spaces" / "examples" / "quick.yaml"
    space, _ = load_space_file(example)
    assert "examples/*.yaml" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["tune_spaces"]  # fmt: skip
    driver.check_space(space, _tiny_base(tmp_path), "s")
    for searcher in ("random", "optuna", "hyperopt"):
        check_searcher(searcher, space, str(example))


BAD_SPACES = {
    "bad yaml": ("polar.r: {choice: [2, 4]\n", ["not valid YAML", "(line 2, column 1)"]),
    "not a mapping": ("- polar.r\n", ["expected a mapping of dotted config keys"]),
    "unknown domain": ("polar.r: {normal: [0, 1]}\n", ["polar.r", "unknown domain normal", "loguniform", "choice"]),
    "wrong arguments": ("optim.lr_theta: {loguniform: [0.01]}\n", ["optim.lr_theta", "loguniform takes [low, high]"]),
    "log of zero": ("optim.lr_theta: {loguniform: [0, 0.01]}\n", ["optim.lr_theta", "0 < low"]),
    "bounds reversed": ("head.vbll.prior_scale: {uniform: [2.0, 1.0]}\n", ["head.vbll.prior_scale", "low < high"]),
    "float randint": ("polar.r: {randint: [1.5, 4]}\n", ["polar.r", "randint takes integers"]),
    "unknown key": ("train.lrr: {uniform: [0.1, 1.0]}\n", ["train.lrr", "unknown key"]),
    "invalid value": ("head.vbll.prior_scale: {choice: [1.0, -2.0]}\n",
                      ["head.vbll.prior_scale=-2.0", "greater than 0"]),
    "invalid bound": ("head.vbll.prior_scale: {uniform: [-1.0, 1.0]}\n", ["head.vbll.prior_scale=-1.0"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_a_bad_space_file_is_one_line_naming_the_file_and_the_key_and_nothing_is_written(case, tmp_path):
    text, wanted = BAD_SPACES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["tune", "--space", str(path), "--config", "tiny", "--trials", "2",
                                      "--set", f"output_dir={out}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and str(path.resolve()) in line, line
    for piece in wanted:
        assert piece in line, (piece, line)
    assert not out.exists()


def test_a_missing_space_file_and_an_unknown_name_are_one_line(tmp_path):
    missing = CliRunner().invoke(app, ["tune", "--space", str(tmp_path / "nope.yaml"), "--config", "tiny"])
    assert missing.exit_code == 2 and "nope.yaml not found" in missing.output
    unknown = CliRunner().invoke(app, ["tune", "--space", "nope", "--config", "tiny"])
    assert unknown.exit_code == 2 and "or a YAML space file" in unknown.output


# ------------------------------------------------------------------------------ searchers, schedulers
@pytest.mark.extras("optuna", "hyperopt")
@pytest.mark.parametrize("searcher", ["optuna", "hyperopt"])
def test_optuna_and_hyperopt_refuse_grid_search_before_anything_is_written(searcher, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("polar.r: {grid_search: [2, 4]}\n")
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["tune", "--space", str(path), "--config", "tiny", "--search", searcher,
                                      "--set", f"output_dir={out}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert f"--search {searcher} cannot search grid_search" in line and "polar.r" in line
    assert str(path.resolve()) in line
    assert not out.exists()
    check_searcher("random", load_space_file(path)[0], "f")  # the random search takes a grid


@pytest.mark.extras("optuna")
def test_optuna_refuses_a_quantised_log_domain_it_would_ignore(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("optim.lr_theta: {qloguniform: [1.0e-3, 1.0e-2, 1.0e-3]}\n")
    with pytest.raises(ConfigError, match=r"optim.lr_theta: --search optuna ignores the quantisation"):
        check_searcher("optuna", load_space_file(path)[0], "f")
    check_searcher("hyperopt", load_space_file(path)[0], "f")  # HyperOpt has hp.qloguniform


@pytest.mark.parametrize(
    ("args", "space", "wanted"),
    [
        (["--search", "optuna"], "priors", "--scheduler pbt makes the later configurations itself"),
        (["--perturbation-steps", "6", "--set", "train.steps=6"], "priors", "--perturbation-steps 6 is not below"),
        ([], "ranks", "none of the searched keys (polar.r, head.vbll.cov_rank) may change mid-run"),
        (["--scheduler", "asha", "--perturbation-steps", "2"], "priors", "perturbation_steps is PBT's setting"),
        (["--reduction-factor", "3"], "priors", "--scheduler pbt has no rungs"),
    ],
)
def test_pbt_settings_it_cannot_run_are_one_line_and_nothing_is_written(args, space, wanted, tmp_path):
    result = CliRunner().invoke(app, ["tune", "--space", space, "--config", "tiny", "--scheduler", "pbt", *args,
                                      "--set", f"output_dir={tmp_path / 'runs'}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert wanted in line, line
    assert not (tmp_path / "runs").exists()


def test_pbt_mutates_only_what_a_warm_start_may_change():
    from ray import tune

    from tune_spaces.pbt import mutations

    space = {"optim.lr_theta": tune.loguniform(1e-4, 1e-2), "polar.r": tune.choice([2, 4]), "method": "polar_vbll",
             "head.vbll.prior_scale": tune.uniform(0.1, 1.0),
             "optim.method": tune.choice(["riemannian", "landing"])}  # fmt: skip
    assert sorted(mutations(space, "s")) == ["head.vbll.prior_scale", "optim.lr_theta"]


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["--scheduler", "hyperband", "--grace-steps", "2"], "grace_steps is ASHA's setting"),
        (["--scheduler", "none", "--reduction-factor", "3"], "reduction_factor is ASHA's and HyperBand's"),
        (["--reduction-factor", "1"], "reduction_factor: Input should be greater than 1"),
        (["--search", "grid"], "searcher 'grid' is not one of random, optuna, hyperopt"),
        (["--scheduler", "median"], "scheduler 'median' is not one of asha, hyperband, pbt, none"),
        (["--grace-steps", "50", "--set", "train.steps=6"], "--grace-steps 50 is more than train.steps (6)"),
    ],
)
def test_bad_search_settings_are_one_line(args, wanted, tmp_path):
    result = CliRunner().invoke(app, ["tune", "--space", "priors", "--config", "tiny", *args,
                                      "--set", f"output_dir={tmp_path / 'runs'}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert wanted in line, line
    assert not (tmp_path / "runs").exists()


def test_the_schedulers_are_tunes_own_with_the_given_settings():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    asha = make_scheduler("asha", steps=40, grace_steps=5, reduction_factor=3)
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "step" and asha._max_t == 40 and asha._reduction_factor == 3
    assert [r[0] for r in asha._brackets[0]._rungs] == [15, 5]  # rungs at grace * 3^k below max_t = 40
    hb = make_scheduler("hyperband", steps=8, grace_steps=1, reduction_factor=2)
    assert isinstance(hb, HyperBandScheduler) and hb._time_attr == "step" and hb._max_t_attr == 8 and hb._eta == 2
    assert isinstance(make_scheduler("none", steps=8, grace_steps=1, reduction_factor=2), FIFOScheduler)
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from tune_spaces.pbt import make_pbt

    space = {"optim.lr_theta": tune.loguniform(1e-4, 1e-2), "polar.r": tune.choice([2, 4])}
    pbt = make_pbt(space, "s", interval=3, seed=1)
    assert isinstance(pbt, PopulationBasedTraining) and pbt._time_attr == "step" and pbt._perturbation_interval == 3
    assert pbt._synch and pbt._quantile_fraction == 0.25 and list(pbt._hyperparam_mutations) == ["optim.lr_theta"]
    with pytest.raises(ConfigError, match="make_pbt"):
        make_scheduler("pbt", steps=8, grace_steps=1, reduction_factor=2)


@pytest.mark.extras("optuna", "hyperopt")
@pytest.mark.parametrize("searcher", ["optuna", "hyperopt"])
def test_the_searchers_are_seeded_and_limited_to_the_concurrency(searcher):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    space = {"head.vbll.prior_scale": tune.loguniform(0.1, 10.0), "polar.r": tune.choice([2, 4, 8, 16])}

    def suggestions(seed):
        algo = make_searcher(searcher, seed, 3, "val_nll", "min")
        assert isinstance(algo, ConcurrencyLimiter) and algo.max_concurrent == 3
        assert algo.set_search_properties("val_nll", "min", space)
        return [algo.suggest(f"t{i}") for i in range(3)]

    first = suggestions(7)
    assert all(0.1 <= s["head.vbll.prior_scale"] <= 10.0 and s["polar.r"] in (2, 4, 8, 16) for s in first)
    assert first == suggestions(7)
    assert first != suggestions(8)


# ------------------------------------------------------------------------------- resuming a search
def test_a_resumed_search_with_an_edited_space_file_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("head.vbll.prior_scale: {loguniform: [0.1, 10.0]}\n")
    cfg = driver._prepare_base(load_config(packaged_config("run", "tiny"), [f"output_dir={tmp_path}", "name=s"]))
    settings = driver.search_settings(space=str(path))
    space, source = load_space_file(path)
    folder = tmp_path / "s"
    folder.mkdir()
    record = {"settings": driver.search_provenance(cfg, settings, space, source)}
    (folder / "search.json").write_text(json.dumps(record, default=str))
    driver.check_same_search(folder, cfg, settings, space, source)  # the same file: resumes
    moved = tmp_path / "elsewhere.yaml"
    moved.write_bytes(path.read_bytes())
    driver.check_same_search(folder, cfg, driver.search_settings(space=str(moved)), *load_space_file(moved))
    path.write_text("head.vbll.prior_scale: {loguniform: [0.1, 20.0]}\n")
    space2, source2 = load_space_file(path)
    with pytest.raises(ConfigError, match=r"was started with other settings.*space\.(head.vbll.prior_scale|sha256)"):
        driver.check_same_search(folder, cfg, settings, space2, source2)


# ----------------------------------------------------------------------- a real search, as a user runs it
SPACE = """\
method: polar_vbll
head.vbll.prior_scale: {loguniform: [0.1, 10.0]}
polar.r: {choice: [2, 4]}
"""


@pytest.fixture(scope="module")
def optuna_search(tmp_path_factory):
    """``polar-vbll tune --search optuna --trials 2 --scheduler none`` over a YAML space, through the
    command line, 4 steps, one trial at a time (both trials run to the end)."""
    root = tmp_path_factory.mktemp("tune-optuna")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    space = root / "space.yaml"
    space.write_text(SPACE)
    args = ["tune", "--config", "tiny", "--search", "optuna", "--trials", "2", "--space", str(space), "--seed", "5",
            "--scheduler", "none", "--concurrency", "1", "--name", "o", "--set", f"output_dir={root}",
            "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    return root / "o", space, result


@pytest.mark.extras("optuna")
def test_an_optuna_search_over_a_space_file_runs_end_to_end(optuna_search):
    from mlflow.tracking import MlflowClient

    from polar_vbll.tracking import local_store

    folder, space, result = optuna_search
    assert result.exit_code == 0, result.output[-3000:]
    assert "best config (ready to train)" in result.output and "Tune checkpoint" in result.output
    record = json.loads((folder / "search.json").read_text())
    sha = hashlib.sha256(space.read_bytes()).hexdigest()
    assert record["space"] == {"space.file": str(space.resolve()), "space.sha256": sha}
    settings = record["settings"]
    assert settings["search.searcher"] == "optuna" and settings["search.scheduler"] == "none"
    assert settings["space.head.vbll.prior_scale"] == "loguniform(0.1, 10)" and settings["space.sha256"] == sha
    parent = MlflowClient(local_store(folder)[0]).get_run(record["parent_run_id"])
    params = parent.data.params
    assert params["search.searcher"] == "optuna" and params["search.scheduler"] == "none"
    assert params["space.file"] == str(space.resolve()) and params["space.sha256"] == sha
    assert params["space.polar.r"] == "choice([2, 4])" and params["search.seed"] == "5"
    assert params["search.tune_checkpoints_kept"] == "1"
    # the trials are Optuna's: a fresh OptunaSearch with the search's seed suggests the same two points
    fresh = make_searcher("optuna", 5, 1, "val_nll", "min")
    fresh.set_search_properties("val_nll", "min", load_space_file(space)[0])
    want = []
    for i in range(2):
        point = fresh.suggest(f"t{i}")
        want.append((round(point["head.vbll.prior_scale"], 9), point["polar.r"]))
        fresh.on_trial_complete(f"t{i}", {"val_nll": 1.0})
    ran = []
    for trial_dir in sorted((folder / "trials").iterdir()):
        cfg = load_config(trial_dir / "config.yaml", [])
        assert cfg.method == "polar_vbll"
        ran.append((round(cfg.head.vbll.prior_scale, 9), cfg.polar.r))
    assert sorted(ran) == sorted(want)
    rows = [ln for ln in (folder / "trials.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 2 and all("completed" in r for r in rows[1:])


@pytest.mark.extras("optuna")
def test_the_best_results_tune_checkpoint_is_the_best_trials_model(optuna_search):
    """Reopened with Tune's own API: ``get_best_result(val_nll, min).checkpoint`` holds the best trial's
    config, adapter and head (byte for byte the trial's run folder), and is the trial best_config.yaml names."""
    from ray import tune

    from tune_spaces.trial import run_trial

    folder, _, result = optuna_search
    assert result.exit_code == 0, result.output[-3000:]
    grid = tune.Tuner.restore(str(folder), trainable=run_trial).get_results()
    assert len(grid) == 2 and grid.num_errors == 0
    best = grid.get_best_result(metric="val_nll", mode="min")
    header = (folder / "best_config.yaml").read_text().splitlines()[0]
    trial = Path(best.path).name.removeprefix("trial_")
    assert header.startswith(f"# Best trial {trial} ")
    assert best.checkpoint is not None
    with best.checkpoint.as_directory() as d:
        ckpt, run = Path(d), folder / "trials" / trial
        assert (ckpt / "adapter").is_dir()
        for name in ("head.safetensors", "config.yaml", "results.json", *(
                str(p.relative_to(run)) for p in (run / "adapter").rglob("*") if p.is_file())):  # fmt: skip
            assert (ckpt / name).read_bytes() == (run / name).read_bytes(), name
        nll = json.loads((ckpt / "results.json").read_text())["metrics"]["validation"]["nll"]
    assert best.metrics["val_nll"] == pytest.approx(nll)
    others = [r for r in grid if r.path != best.path]
    assert all(r.metrics["val_nll"] >= best.metrics["val_nll"] for r in others)
    assert f"best trial's model (Tune checkpoint): {best.checkpoint.path}\n" in result.output


PBT_SPACE = """\
optim.lr_theta: {loguniform: [1.0e-4, 1.0e-1]}
optim.lr_stiefel: {loguniform: [1.0e-4, 1.0e-1]}
"""


@pytest.fixture(scope="module")
def pbt_search(tmp_path_factory):
    """``polar-vbll tune --scheduler pbt --trials 2`` through the command line: 3 steps, perturbed at step 2
    (synchronous: the worse trial takes the better one's model there), 1 worker per trial."""
    root = tmp_path_factory.mktemp("tune-pbt")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    space = root / "space.yaml"
    space.write_text(PBT_SPACE)
    args = ["tune", "--config", "tiny", "--trials", "2", "--space", str(space), "--seed", "3", "--scheduler", "pbt",
            "--perturbation-steps", "2", "--concurrency", "2", "--workers", "1", "--name", "p",
            "--set", f"output_dir={root}", "--set", "train.steps=3", "--set", "train.eval_every=1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    return root / "p", result


@pytest.mark.slow  # 2 trials x 2 segments, each a worker-group start: 116 s at load 4-6
def test_pbt_trials_continue_from_each_others_models_with_perturbed_settings(pbt_search):
    """The exploited trial's history up to the exploit is the donor's, its next loss (taken before the
    step, on the weights it received) is the donor's too, and the settings it changed are PBT's
    perturbation of the donor's (x0.8, x1.2) or a redraw from the space; Tune's best result holds a model
    and its training state."""
    from ray import tune

    from tune_spaces.pbt import run_pbt_trial

    folder, result = pbt_search
    assert result.exit_code == 0, result.output[-3000:]
    trials = {p.name: json.loads((p / "results.json").read_text()) for p in (folder / "trials").iterdir()}
    assert len(trials) == 2 and all(r["training"]["steps"] == 3 for r in trials.values())
    exploited = {t: r for t, r in trials.items() if r["training"]["warm_starts"]}
    assert exploited, "synchronous PBT with 2 trials exploits at step 2"
    for trial, res in exploited.items():
        (donor,) = set(trials) - {trial}
        warm = res["training"]["warm_starts"][-1]
        s = warm["step"]
        assert s == 2
        mine = {h["step"]: h for h in res["training"]["history"]}
        theirs = {h["step"]: h for h in trials[donor]["training"]["history"]}
        assert [mine[k]["loss"] for k in range(1, s + 1)] == [theirs[k]["loss"] for k in range(1, s + 1)]
        assert mine[s + 1]["loss"] == pytest.approx(theirs[s + 1]["loss"], rel=1e-6)  # the donor's weights
        assert set(warm["changed"]) <= {"optim.lr_theta", "optim.lr_stiefel"} and warm["changed"]
        for then, now in warm["changed"].values():
            assert now / then == pytest.approx(0.8) or now / then == pytest.approx(1.2) or 1e-4 <= now <= 1e-1
        lineage = json.loads((folder / "trials" / trial / "pbt.json").read_text())
        assert lineage[-1]["exploited"] == donor and lineage[-1]["from_step"] == s
    record = json.loads((folder / "search.json").read_text())
    assert record["algorithms"]["search.perturbation_steps_used"] == 2
    header = [ln for ln in (folder / "best_config.yaml").read_text().splitlines() if ln.startswith("#")]
    best_trial = header[0].split()[3]
    if best_trial in exploited:  # its schedule: the donor's settings until step 2, then its own
        assert "PBT trained this model with a schedule" in header[2]
        assert header[4].startswith(f"#   from step 2, trial {best_trial}, taking trial ")
    grid = tune.Tuner.restore(str(folder), trainable=run_pbt_trial).get_results()
    assert len(grid) == 2 and grid.num_errors == 0
    best = grid.get_best_result(metric="val_nll", mode="min")
    with best.checkpoint.as_directory() as d:
        assert (Path(d) / "adapter").is_dir() and (Path(d) / "state" / "meta.json").is_file()
        assert json.loads((Path(d) / "pbt.json").read_text())["step"] == 3


def test_a_search_started_before_a_setting_existed_resumes_with_it_unset(tmp_path):
    """A search.json written before ``perturbation_steps`` existed (its settings lack the key) is the same
    search when the setting is left unset, and another one when it is set."""
    cfg = driver._prepare_base(load_config(packaged_config("run", "tiny"), [f"output_dir={tmp_path}"]), announce=False)
    space = driver.get_space("priors")
    old = driver.search_provenance(cfg, driver.search_settings(space="priors"), space)
    del old["search.perturbation_steps"]
    (tmp_path / "search.json").write_text(json.dumps({"settings": old}, default=str))
    driver.check_same_search(tmp_path, cfg, driver.search_settings(space="priors"), space)
    pbt = driver.search_settings(space="priors", scheduler="pbt", perturbation_steps=2)
    with pytest.raises(ConfigError, match="search.perturbation_steps"):
        driver.check_same_search(tmp_path, cfg, pbt, space)
