"""The ``polar-vbll`` command.

Bad input of any kind (config, data, model path, checkpoint) ends with one readable line naming the file,
row or field, and exit status 2: never a traceback from deep inside.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from polar_vbll.errors import UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML config file, or a packaged one: cpu, full, tiny"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config value, e.g. --set train.steps=50 (repeatable)"),
]


def packaged_config(kind: str, name: str) -> Path:
    """Path of a config shipped inside the package (``polar_vbll/configs/<kind>/<name>.yaml``)."""
    return Path(str(resources.files("polar_vbll") / "configs" / kind / f"{name}.yaml"))


def packaged_names(kind: str) -> list[str]:
    return sorted(p.stem for p in Path(str(resources.files("polar_vbll") / "configs" / kind)).glob("*.yaml"))


def _resolve_config(config: str | None, kind: str = "run") -> Path | None:
    """A path, or the name of a packaged config of this kind (``run`` or ``compare``)."""
    if config is None:
        return None
    p = Path(config)
    if not p.exists() and "/" not in config and not config.endswith((".yaml", ".yml")):
        packaged = packaged_config(kind, config)
        if packaged.is_file():
            return packaged
        raise UserInputError(
            f"config {config!r} is neither a file nor a packaged {kind} config ({', '.join(packaged_names(kind))})"
        )
    return p


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's latest checkpoint")] = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            help="train on N Ray Train workers with DeepSpeed (needs the `dist` extra); local Ray "
            "unless --address or RAY_ADDRESS names a cluster"
        ),
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (with --workers)")] = None,
    zero_stage: Annotated[
        int, typer.Option(help="DeepSpeed ZeRO stage of the backbone (with --workers)")
    ] = 3,
    track: Annotated[
        bool,
        typer.Option(
            help="with --workers: record the run in MLflow (the run folder's local store, or "
            "MLFLOW_TRACKING_URI); on by default when mlflow is installed"
        ),
    ] = True,
) -> None:
    """Zero-shot evaluation, fine-tuning, evaluation again; writes the run folder."""
    from polar_vbll.config import load_config
    from polar_vbll.run import run_training
    from polar_vbll.train import TrainingDiverged

    try:
        cfg = load_config(_resolve_config(config, "run"), set_ or [])
        if workers is None and address is None:
            run_training(cfg, resume=resume, progress=progress)
            return
        try:  # the distributed layer sits above polar_vbll: imported only when asked for
            from distributed.config import DistConfig
            from distributed.launch import DistributedRunError, train_distributed
        except ImportError as exc:
            raise UserInputError(
                f"--workers needs the distributed extra (pip install -e '.[dist]'): {exc}"
            ) from None
        try:
            dist = DistConfig(workers=workers or 2, zero_stage=zero_stage)
            if track and importlib.util.find_spec("mlflow") is None:
                typer.echo("note: mlflow is not installed (the `track` extra); this run is not tracked")
                track = False
            train_distributed(cfg, workers=workers, address=address, dist=dist, resume=resume, track=track)
        except DistributedRunError as exc:
            _fail(exc)
    except (UserInputError, TrainingDiverged) as exc:
        _fail(exc)


@app.command()
def compare(
    config: Annotated[
        str, typer.Option("--config", "-c", help="compare YAML, or a packaged one: main, quick, full")
    ],
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Train and evaluate methods x tasks x seeds; writes a Markdown table, a CSV and reliability diagrams.

    Resumable: finished runs are kept in the output folder's records.jsonl and skipped on a rerun."""
    from polar_vbll.compare.config import load_compare_config
    from polar_vbll.compare.runner import run_compare
    from polar_vbll.train import TrainingDiverged

    try:
        ccfg = load_compare_config(_resolve_config(config, "compare"), set_ or [])
        run_compare(ccfg, progress=progress)
    except (UserInputError, TrainingDiverged) as exc:
        _fail(exc)


def _import_tune():
    """The search layer sits above polar_vbll: imported only when asked for."""
    try:
        from tune_spaces import driver, runs
    except ImportError as exc:
        raise UserInputError(
            f"searches need the dist and track extras (pip install -e '.[dist,track]'): {exc}"
        ) from None
    return driver, runs


@app.command()
def tune(
    space: Annotated[str, typer.Option(help="search space: priors, ranks, optimization, default")],
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="base run YAML, or a packaged one (tune, tiny, cpu)")
    ] = "tune",
    set_: SetOpt = None,
    name: Annotated[
        str | None, typer.Option(help="search name = folder under output_dir (default: tune-SPACE)")
    ] = None,
    trials: Annotated[int, typer.Option(help="number of sampled configurations")] = 4,
    concurrency: Annotated[
        int | None, typer.Option(help="trials at once (default: what the CPUs hold)")
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers per trial")] = 2,
    zero_stage: Annotated[int, typer.Option(help="DeepSpeed ZeRO stage of the backbone")] = 3,
    grace_steps: Annotated[
        int | None, typer.Option(help="ASHA: steps before a trial may be stopped (default: train.eval_every)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the random search")] = 0,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray)")] = None,
) -> None:
    """Ray Tune search (ASHA, objective: validation NLL) with MLflow tracking; resumable; writes the best
    configuration as a ready-to-use YAML (best_config.yaml in the search folder)."""
    from polar_vbll.config import load_config
    from polar_vbll.train import TrainingDiverged

    try:
        driver, runs = _import_tune()
        from distributed.config import DistConfig

        overrides = list(set_ or [])
        overrides.append(f"name={name or 'tune-' + space}")
        cfg = load_config(_resolve_config(config, "run"), overrides)
        settings = driver.SearchSettings(
            space=space, trials=trials, concurrency=concurrency, grace_steps=grace_steps, seed=seed
        )
        dist = DistConfig(workers=workers, zero_stage=zero_stage, health_check_interval_s=0.5)
        outcome = driver.run_search(cfg, settings, dist, address=address)
    except (UserInputError, TrainingDiverged) as exc:
        _fail(exc)
    print(driver.format_trials(outcome.rows))
    if outcome.interrupted:
        typer.secho(
            "search interrupted; its state is saved: rerun the same command to resume it",
            fg=typer.colors.YELLOW,
        )
        raise typer.Exit(130)
    if outcome.errors:
        print("\nfailed trials:\n" + "\n".join(f"  {t}: {e}" for t, e in outcome.errors.items()))
    if outcome.best is not None:
        best = outcome.best
        print(f"\nbest trial {best['trial']} (chosen on validation NLL):")
        for key, value in best.items():
            if key not in ("trial", "status"):
                print(f"  {key}: {value}")
        print(f"best config (ready to train): {outcome.best_config_path}")
    print(f"runs: polar-vbll runs {outcome.folder}")


@app.command()
def runs(
    search: Annotated[
        Path | None,
        typer.Argument(
            help="a search folder (runs/<name>), or a folder of them (runs/) to list the searches"
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="store to list searches from (default: MLFLOW_TRACKING_URI)")
    ] = None,
) -> None:
    """List a search's runs with their key metrics, read from the MLflow tracking store."""
    import os

    try:
        _, runs_mod = _import_tune()
        if search is not None and not (search / "search.json").is_file() and search.is_dir():
            header, rows = runs_mod.list_searches_under(search)  # e.g. `polar-vbll runs runs/`
        elif search is not None:
            header, rows = runs_mod.list_trials(search)
        else:
            uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise UserInputError("give a search folder, or --tracking-uri / MLFLOW_TRACKING_URI")
            header, rows = runs_mod.list_searches(uri)
    except UserInputError as exc:
        _fail(exc)
    print(runs_mod.render(header, rows))


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="a run folder written by `polar-vbll train`")],
    task: Annotated[str | None, typer.Option(help="evaluate on this task instead of the run's")] = None,
    split: Annotated[
        str | None, typer.Option(help="split to evaluate (default: the run's eval split)")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="first N examples only")] = None,
    progress: bool = True,
) -> None:
    """Evaluate a trained run's adapter (and the zero-shot model beside it) on a task split."""
    from polar_vbll.evaluate_run import evaluate_run

    try:
        results = evaluate_run(run, task=task, split=split, limit=limit, progress=progress)
    except UserInputError as exc:
        _fail(exc)
    print(json.dumps(results["metrics"], indent=2))


@app.command()
def tasks(seed: Annotated[int, typer.Option(help="split seed")] = 0) -> None:
    """List the built-in tasks with their split sizes."""
    from polar_vbll.tasks import available_tasks, split_sizes

    for name in available_tasks():
        try:
            sizes = split_sizes(name, seed)
        except UserInputError as exc:
            _fail(exc)
        print(f"{name:20s} " + "  ".join(f"{k}={v}" for k, v in sizes.items()))


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
