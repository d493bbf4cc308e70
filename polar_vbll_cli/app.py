"""The polar-vbll command: fine-tune LLMs with PoLAR adapters and a variational Bayesian last layer.

The top floor: it may import every package below it (``tune_spaces``, ``distributed``, ``polar_vbll``) and
nothing imports it. ``ray job submit -- polar-vbll train --workers N ...`` runs this same command inside a
job (Ray's ``RAY_ADDRESS`` makes it join the cluster). Packaged configs are resolved by
``polar_vbll.config.resolve_config``, the one rule for every command.

Bad input of any kind (config, data, model path, checkpoint) and run-time failures (a diverged loss, a head
refit gone non-finite, a distributed run that failed for good) end with one readable line and exit status
2: never a traceback from deep inside. So does a missing optional package: each command first asks
``polar_vbll.extras.require`` for what it needs (``--workers``: Ray and DeepSpeed, ``tune``: those and
MLflow, ...), which names the extra to install, before it reads or writes anything. Ctrl-C ends with
status 130 and says how to resume.
"""

from __future__ import annotations

import errno
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from polar_vbll.errors import RunFailure, UserInputError
from polar_vbll.extras import require

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML config file, or a packaged one: cpu, full, tiny, tune"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config value, e.g. --set train.steps=50 (repeatable)"),
]
ProgressOpt = Annotated[bool, typer.Option(help="show progress bars")]
DeviceOpt = Annotated[
    str | None,
    typer.Option(help="where the model runs: auto, cpu, cuda or cuda:N (default: the run's model.device)"),
]
TrackOpt = Annotated[
    bool | None,
    typer.Option(
        help="record in MLflow: the folder's local store, or MLFLOW_TRACKING_URI (the `track` extra; by "
        "default only when it is installed, --track insists on it)",
        show_default=False,
    ),
]


@app.callback()
def _setup() -> None:
    """Warnings as one plain line (``warning: ...``), as a user reads them, not as a source listing."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def _fail(exc: BaseException | str) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def _one_line_errors(resume_hint: str | None = None) -> Iterator[None]:
    """User-input errors and run-time failures as one line (exit 2); Ctrl-C as exit 130."""
    try:
        yield
    except (UserInputError, RunFailure) as exc:
        _fail(exc)
    except MemoryError:
        _fail("out of memory; lower train.batch_size / train.eval_batch_size, adapt fewer layers, or use --workers")
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch's CUDA / accelerator OOM
            raise
        _fail(f"out of accelerator memory ({str(exc).splitlines()[0][:200]}); lower train.batch_size / "
              "train.eval_batch_size or use model.dtype: bfloat16")  # fmt: skip
    except OSError as exc:
        _fail(os_error_line(exc))
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":  # safetensors' own error type for a failed write or read
            text = str(exc)
            if "No space left" in text:
                _fail(f"no space left on the device while writing a safetensors file ({text.splitlines()[0][:200]}); "
                      "free space and rerun (the last complete checkpoint is intact: checkpoints are written to a "
                      "temporary folder and renamed into place)")  # fmt: skip
            _fail(f"a safetensors file could not be written or read: {text.splitlines()[0][:300]}")
        raise
    except KeyboardInterrupt:
        hint = f"; {resume_hint}" if resume_hint else ""
        typer.secho(f"interrupted{hint}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None


_OS_HINTS = {
    errno.ENOSPC: "free space and rerun (the last complete checkpoint is intact: checkpoints are written to a "
    "temporary folder and renamed into place)",
    errno.EDQUOT: "the disk quota is exhausted: free space and rerun (the last complete checkpoint is intact)",
    errno.EROFS: "the file system is read-only: use a writable folder (a new run: --set output_dir=...; a saved "
    "run to calibrate: a writable copy of it)",
    errno.EACCES: "no permission: use a folder you can write (a new run: --set output_dir=...), or fix its "
    "permissions",
    errno.EPERM: "no permission: use a folder you can write (a new run: --set output_dir=...), or fix its "
    "permissions",
    errno.ENOENT: "it does not exist (was it moved or deleted while the command ran?)",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
}


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and what to do."""
    import shutil

    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        src, dst, why = exc.args[0][0]  # a copy of a folder: the first file that failed
        full = "No space left" in str(why)
        hint = _OS_HINTS[errno.ENOSPC] if full else "check the folder and rerun"
        return f"could not copy {src} to {dst} ({str(why).split(':')[0]}); {hint}"
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" on {exc.filename}" if exc.filename else ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    hint = _OS_HINTS.get(exc.errno or -1)
    return f"{what}{where}" + (f"; {hint}" if hint else "")


def _optional(command: str, **flags: bool) -> list[str]:
    """The entries of ``polar_vbll.extras.ENTRIES`` a command needs: the command, and each given flag
    (``--workers``, ``--track``) that is on."""
    return [command] + [f"{command} --{flag}" for flag, on in flags.items() if on]


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's latest checkpoint")] = True,
    progress: ProgressOpt = True,
    track: TrackOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="train on N Ray Train workers with DeepSpeed (needs the `dist` extra); local Ray "
            "unless --address or RAY_ADDRESS names a cluster"
        ),
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (implies --workers 2)")] = None,
    zero_stage: Annotated[
        int | None, typer.Option(help="DeepSpeed ZeRO stage of the backbone (with --workers; default 3)")
    ] = None,
    dist_set: Annotated[
        list[str] | None,
        typer.Option("--dist-set", help="distributed setting, e.g. --dist-set grad_accum=2 (repeatable)"),
    ] = None,
) -> None:
    """Zero-shot evaluation, fine-tuning with the config's method, evaluation again; writes the run folder
    (its path is printed at the start and the end)."""
    distributed = workers is not None or address is not None
    with _one_line_errors("rerun the same command to resume from the last checkpoint"):
        require(*_optional("polar-vbll train", workers=distributed, track=track is True))
        from polar_vbll.config import load_config, resolve_config

        cfg = load_config(resolve_config(config, "run"), set_ or [])
        if not distributed:
            if zero_stage is not None or dist_set:
                flag = "--zero-stage" if zero_stage is not None else "--dist-set"
                raise UserInputError(f"{flag} needs --workers N (or --address): one process has no ZeRO stage")
            from polar_vbll.runner import run_training

            run_training(cfg, resume=resume, progress=progress, track=track is not False)
            return
        from distributed.config import dist_config_from
        from distributed.launch import train_distributed

        values = {"workers": 2 if workers is None else workers, "zero_stage": 3 if zero_stage is None else zero_stage}
        dist = dist_config_from(values, dist_set or [])
        results = train_distributed(cfg, address=address, dist=dist, resume=resume, track=track is not False)
        summary = {k: results["metrics"][k] for k in ("eval", "validation")}
        print(json.dumps({"step": results["training"]["steps"], "method": results["method"], **summary}, indent=2))


CompareSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="override a comparison value, e.g. --set base.train.steps=50 or --set seeds=[0]"
    ),
]


@app.command()
def compare(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            "-c",
            help="compare YAML, or a packaged one: main, quick, full, tiny, paper, paper-tiny, paper-cpu",
        ),
    ],
    set_: CompareSetOpt = None,
    progress: ProgressOpt = True,
    track: TrackOpt = None,
) -> None:
    """Train and evaluate methods x tasks x seeds; writes a Markdown table, a CSV and reliability diagrams.

    Resumable: finished runs are kept in the output folder's records.jsonl and skipped on a rerun."""
    with _one_line_errors("rerun the same command to resume the comparison"):
        require(*_optional("polar-vbll compare", track=track is True))
        from polar_vbll.compare.config import load_compare_config
        from polar_vbll.compare.runner import run_compare
        from polar_vbll.config import resolve_config

        ccfg = load_compare_config(resolve_config(config, "compare"), set_ or [])
        run_compare(ccfg, progress=progress, track=track is not False)


@app.command()
def tune(
    space: Annotated[
        str, typer.Option(help="search space: priors, ranks, optimization, default, or a YAML space file")
    ],
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="base run YAML, or a packaged one (tune, tiny, cpu)")
    ] = "tune",
    set_: SetOpt = None,
    name: Annotated[
        str | None,
        typer.Option(help="search name = folder under output_dir (default: the config's name, else tune-SPACE)"),
    ] = None,
    trials: Annotated[int, typer.Option(help="number of sampled configurations")] = 4,
    concurrency: Annotated[int | None, typer.Option(help="trials at once (default: what the CPUs hold)")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers per trial")] = 2,
    zero_stage: Annotated[int, typer.Option(help="DeepSpeed ZeRO stage of the backbone")] = 3,
    search: Annotated[
        str, typer.Option(help="search algorithm: random, optuna, hyperopt (optuna, hyperopt: the `tune` extra)")
    ] = "random",
    scheduler: Annotated[
        str, typer.Option(help="trial scheduler: asha, hyperband, pbt, none (docs/tuning.md)")
    ] = "asha",
    grace_steps: Annotated[
        int | None, typer.Option(help="ASHA: steps before a trial may be stopped (default: train.eval_every)")
    ] = None,
    reduction_factor: Annotated[
        int, typer.Option(help="ASHA, HyperBand: keep the best 1/factor of the trials at each rung")
    ] = 2,
    perturbation_steps: Annotated[
        int | None, typer.Option(help="PBT: steps between exploits (default: train.eval_every)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the search algorithm")] = 0,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray)")] = None,
    dist_set: Annotated[
        list[str] | None,
        typer.Option("--dist-set", help="distributed setting of every trial, e.g. --dist-set use_gpu=true"),
    ] = None,
) -> None:
    """Ray Tune search (random, Optuna or HyperOpt; ASHA, HyperBand, PBT or none; objective: validation NLL) with
    MLflow tracking; resumable; writes the best configuration as a ready-to-use YAML (best_config.yaml in
    the search folder)."""
    with _one_line_errors("rerun the same command to resume the search"):
        extra = [f"polar-vbll tune --search {search}"] if search in ("optuna", "hyperopt") else []
        require("polar-vbll tune", *extra)  # Ray, DeepSpeed, MLflow; Optuna or HyperOpt: the `tune` extra
        from distributed.config import dist_config_from
        from polar_vbll.config import load_config, resolve_config
        from tune_spaces import driver
        from tune_spaces.space_files import looks_like_file

        given = {"reduction_factor": reduction_factor} if reduction_factor != 2 else {}  # only when set
        settings = driver.search_settings(space=space, trials=trials, concurrency=concurrency, searcher=search,
                                          scheduler=scheduler, grace_steps=grace_steps, seed=seed,
                                          perturbation_steps=perturbation_steps, **given)  # fmt: skip
        cfg = load_config(resolve_config(config, "run"), set_ or [])
        if name is not None or cfg.name == "run":
            default = Path(space).stem if looks_like_file(space) else space
            cfg = cfg.model_copy(update={"name": name or f"tune-{default}"})
        dist = dist_config_from({"workers": workers, "zero_stage": zero_stage, "health_check_interval_s": 0.5},
                                dist_set or [])
        outcome = driver.run_search(cfg, settings, dist, address=address)
    print(driver.format_trials(outcome.rows))
    if outcome.interrupted:
        typer.secho(
            "search interrupted; its state is saved: rerun the same command to resume it", fg=typer.colors.YELLOW
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
        if outcome.best_checkpoint:
            print(f"best trial's model (Tune checkpoint): {outcome.best_checkpoint}")
    print(f"search folder: {outcome.folder}")
    print(f"runs: polar-vbll runs {outcome.folder}")


@app.command()
def runs(
    search: Annotated[
        Path | None,
        typer.Argument(help="a search folder (runs/<name>), or a folder of them (runs/) to list the searches"),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="store to list searches from (default: MLFLOW_TRACKING_URI)")
    ] = None,
) -> None:
    """List a search's runs with their key metrics, read from the MLflow tracking store."""
    import os

    with _one_line_errors():
        require("polar-vbll runs")
        from tune_spaces import runs as runs_mod
        if search is not None and not (search / "search.json").is_file() and search.is_dir():
            header, rows = runs_mod.list_searches_under(search)  # e.g. `polar-vbll runs runs/`
        elif search is not None:
            header, rows = runs_mod.list_trials(search)
        else:
            uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise UserInputError("give a search folder, or --tracking-uri / MLFLOW_TRACKING_URI")
            header, rows = runs_mod.list_searches(uri)
    print(runs_mod.render(header, rows))


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="a run folder written by `polar-vbll train` or `compare`")],
    task: Annotated[str | None, typer.Option(help="evaluate on this task instead of the run's")] = None,
    split: Annotated[str | None, typer.Option(help="split to evaluate (default: the run's eval split)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N examples only")] = None,
    device: DeviceOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate a trained run's adapter and head (and the zero-shot model beside it) on a task split."""
    with _one_line_errors():
        require("polar-vbll eval")
        from polar_vbll.saved import evaluate_saved_run

        results = evaluate_saved_run(run, task=task, split=split, limit=limit, progress=progress, device=device)
    print(json.dumps(results["metrics"], indent=2))


def _rule_settings(values: dict[str, float | None]) -> dict[str, float | None]:
    """The decision settings given on the command line, each checked to lie in (0, 1) (coverage: (0, 1])."""
    for name, value in values.items():
        if value is None:
            continue
        hi_ok = name == "coverage" and value == 1.0
        if not (0.0 < value < 1.0 or hi_ok):
            raise UserInputError(f"--{name.replace('_', '-')} must lie in (0, 1), got {value:g}")
    if values.get("risk") is not None and values.get("coverage") is not None:
        raise UserInputError("give --risk or --coverage, not both")
    return values


def _decision_options(risk, coverage, delta, alpha, ood_pass) -> dict[str, float | None]:
    return _rule_settings({"risk": risk, "coverage": coverage, "delta": delta, "alpha": alpha, "ood_pass": ood_pass})


RiskOpt = Annotated[float | None, typer.Option(help="target selective risk: the error rate allowed among "
                                                    "answered questions (default: the run's decision.risk, 0.1)")]
CoverageOpt = Annotated[float | None, typer.Option(help="instead of --risk: answer this fraction of questions")]
DeltaOpt = Annotated[float | None, typer.Option(help="the risk guarantee holds with probability 1 - delta "
                                                     "(default 0.1)")]
AlphaOpt = Annotated[float | None, typer.Option(help="conformal sets miss the answer at most this often "
                                                     "(default 0.1)")]
OodPassOpt = Annotated[float | None, typer.Option(help="fraction of in-distribution questions the OOD flag lets "
                                                       "pass (default 0.95)")]


_REFIT = "for this prediction, refit the stored rule's calibration data to "
PRiskOpt = Annotated[float | None, typer.Option("--risk", help=_REFIT + "this target selective risk")]
PCoverageOpt = Annotated[float | None, typer.Option("--coverage", help=_REFIT + "answer this fraction")]
PDeltaOpt = Annotated[float | None, typer.Option("--delta", help=_REFIT + "this delta")]
PAlphaOpt = Annotated[float | None, typer.Option("--alpha", help=_REFIT + "this conformal alpha")]
POodPassOpt = Annotated[float | None, typer.Option("--ood-pass", help=_REFIT + "this OOD pass rate")]


@app.command()
def calibrate(
    run: Annotated[Path, typer.Argument(help="a run folder written by `polar-vbll train` or `compare`")],
    data: Annotated[
        str | None, typer.Option(help="held-out questions with answers (a JSONL path, or csv:, parquet:, json:, hf: "
                                      "through the run's data.columns; default: the run's validation split)")
    ] = None,
    split: Annotated[str | None, typer.Option(help="the split of a --data source that has several")] = None,
    risk: RiskOpt = None,
    coverage: CoverageOpt = None,
    delta: DeltaOpt = None,
    alpha: AlphaOpt = None,
    ood_pass: OodPassOpt = None,
    temperature: Annotated[bool, typer.Option(help="use the run's fitted temperature, where it has one")] = True,
    device: DeviceOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Calibrate a run's decision rule on held-out questions: the confidence threshold for a target risk,
    conformal answer sets and the OOD flag; stored in the run folder (decision/) for `polar-vbll predict`."""
    with _one_line_errors():
        require("polar-vbll calibrate")
        from polar_vbll.decisions.rule import RuleSettings
        from polar_vbll.predict_io import format_rule, read_calibration
        from polar_vbll.predictor import Predictor
        from polar_vbll.saved import check_run_folder

        given = _decision_options(risk, coverage, delta, alpha, ood_pass)
        folder = check_run_folder(run)
        d = folder.cfg.decision
        settings = RuleSettings(
            risk=given["risk"] if given["risk"] is not None else (None if coverage is not None else d.risk),
            coverage=coverage, delta=given["delta"] or d.delta, fwer=d.fwer, alpha=given["alpha"] or d.alpha,
            ood_pass=given["ood_pass"] or d.ood_pass, thresholds=d.thresholds,
        )  # fmt: skip
        examples, sha = read_calibration(data, folder, split) if data is not None else (None, None)
        predictor = Predictor.from_run(run, need_rule=False, device=device)
        rule = predictor.calibrate(settings, examples, source=str(data) if data else None, file_sha256=sha,
                                   temperature=temperature, progress=progress)  # fmt: skip
        logged = _relog(folder.path)
    print(format_rule(rule))
    print(f"decision rule: {(folder.path / 'decision' / 'rule.json').resolve()}")
    if logged:
        print(f"MLflow model (with the rule): {logged}")


def _relog(run: Path) -> str | None:
    """A tracked run's MLflow model logged again after ``calibrate`` (now with its rule); None when the run is
    not tracked or mlflow is not installed."""
    from polar_vbll.extras import installed

    if not installed("mlflow"):
        return None
    from polar_vbll.mlflow_model import relog

    return relog(run)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="a run folder written by `polar-vbll train` or `compare`")],
    merged: Annotated[Path, typer.Option(help="a new folder: the backbone with the adapter merged into its "
                                              "weights (safetensors), the tokenizer, the head and readout.json")],
    device: DeviceOpt = "cpu",
) -> None:
    """Export a run for servers that cannot load our adapter: the merged backbone (loads with
    AutoModelForCausalLM), its tokenizer, the head and the readout (docs/deploy.md)."""
    with _one_line_errors():
        from polar_vbll.export import export_merged

        out = export_merged(run, merged, device=device)
    print(f"merged model: {out}")


@app.command()
def register(
    run: Annotated[Path, typer.Argument(help="a run folder tracked in MLflow (train, compare or tune)")],
    name: Annotated[str, typer.Option(help="the registered model's name in the Model Registry")],
    include_base: Annotated[bool, typer.Option(help="log the model again with the base model bundled into it "
                                                    "(safetensors), so it loads where the base is not")] = False,
) -> None:
    """Register a run's MLflow model (runs:/<id>/model) in the Model Registry of the run's store; then
    `mlflow.pyfunc.load_model("models:/NAME/<version>")` loads it (docs/deploy.md)."""
    with _one_line_errors():
        require("polar-vbll register")
        from polar_vbll.mlflow_model import register as register_run
        from polar_vbll.saved import check_run_folder
        from polar_vbll.tracking import mask_uri

        if not name.strip():
            raise UserInputError("--name must not be empty")
        folder = check_run_folder(run)
        store, uri, version = register_run(folder.path, name, include_base)
    print(f"registered {uri} as {name!r}, version {version.version}: models:/{name}/{version.version}")
    print(f"store: {mask_uri(store)} (set MLFLOW_TRACKING_URI to it to load the model elsewhere)")


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="a run folder with a calibrated decision rule")],
    input_: Annotated[str, typer.Option("--input", "-i", help="questions: a JSONL path (one JSON object per line), "
                                        "or csv:, parquet:, json:<file>, hf:<folder|org/name> through the run's "
                                        "data.columns (docs/predict.md)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="decisions, one JSON object per input line")],
    split: Annotated[str | None, typer.Option(help="the split of an --input source that has several")] = None,
    batch_size: Annotated[int, typer.Option(help="questions predicted together (the output does not depend "
                                                 "on --workers; on this, only at float rounding)")] = 64,
    workers: Annotated[int | None, typer.Option(help="predict on N Ray Data actors, each holding the model "
                                                     "(needs the `dist` extra)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (implies --workers 2)")] = None,
    risk: PRiskOpt = None,
    coverage: PCoverageOpt = None,
    delta: PDeltaOpt = None,
    alpha: PAlphaOpt = None,
    ood_pass: POodPassOpt = None,
    device: DeviceOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Decide on new questions with a run's calibrated rule: answer, abstain, or flag as out-of-distribution,
    with conformal answer sets (docs/predict.md). --risk/--alpha/... refit the stored rule's calibration data
    with other targets for this prediction (no model pass; the stored rule is unchanged)."""
    distributed = workers is not None or address is not None
    with _one_line_errors():
        require(*_optional("polar-vbll predict", workers=distributed))
        from polar_vbll.decisions.rule import DecisionRule
        from polar_vbll.locking import FolderLock
        from polar_vbll.placement import placement_for
        from polar_vbll.predict_io import (
            check_output,
            chunked,
            format_summary,
            predict_file,
            read_questions,
            scan_questions,
            streamed_path,
        )
        from polar_vbll.predictor import Predictor
        from polar_vbll.saved import check_run_folder

        given = _decision_options(risk, coverage, delta, alpha, ood_pass)
        if workers is not None and workers < 1:
            raise UserInputError(f"--workers must be at least 1, got {workers}")
        folder = check_run_folder(run)
        if workers is None and address is None:
            placement_for(folder.cfg.model, device)  # a device this machine lacks: refused before any work
        rule = DecisionRule.load(folder.path)
        if any(v is not None for v in given.values()):
            try:
                rule = rule.with_settings(**given)
            except ValueError as exc:
                raise UserInputError(str(exc)) from None
        out = check_output(output, [input_])
        if (path := streamed_path(input_, split)) is not None:  # checked in one pass, then read chunk by chunk
            chunks = scan_questions(path, folder, batch_size)
            total = chunks.total
        else:
            questions = read_questions(input_, folder, split)
            chunks, total = chunked(questions, batch_size), len(questions)
        if not distributed:
            predictor = Predictor.from_run(run, need_rule=False, batch_size=batch_size, device=device)
            predictor.rule = rule
            records = (predictor.decide_chunk(c) for c in chunks)
        else:
            from distributed.batch_predict import decide_on_ray

            records = decide_on_ray(folder.path, chunks, rule, workers=workers or 2, address=address, device=device)
        with FolderLock(out, "polar-vbll predict", is_file=True):  # one writer of the output file
            s = predict_file(total, out, records, progress)
    print(format_summary(s, rule))
    print(f"decisions: {out.resolve()}")


@app.command()
def serve(
    target: Annotated[str, typer.Argument(metavar="RUN_OR_MODEL_URI", help="a run folder with a calibrated rule, "
                                          "or an MLflow model URI: runs:/<id>/model, models:/NAME/N (the store: "
                                          "MLFLOW_TRACKING_URI)")],
    host: Annotated[str, typer.Option(help="the address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 "
                                           "every interface (no authentication: put a proxy in front)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the HTTP port")] = 8000,
    replicas: Annotated[int, typer.Option(help="replicas, each holding the model (one GPU each where the "
                                               "cluster has GPUs)")] = 1,
    max_batch_size: Annotated[int, typer.Option(help="requests a replica decides together")] = 16,
    batch_wait_s: Annotated[float, typer.Option(help="seconds a batch waits to fill")] = 0.01,
    max_ongoing: Annotated[int, typer.Option(help="requests a replica holds at once (batches fill from "
                                                  "these)")] = 32,
    max_queued: Annotated[int, typer.Option(help="requests waiting for a replica; beyond, HTTP 503 "
                                                 "(overloaded)")] = 64,
    max_questions: Annotated[int, typer.Option(help="questions one request may hold; beyond, HTTP 413")] = 1024,
    device: Annotated[str | None, typer.Option(help="the replicas' device: auto (a GPU each where the cluster "
                                                    "has GPUs), cpu or cuda")] = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster (or RAY_ADDRESS) instead of "
                                                     "starting a local one")] = None,
    name: Annotated[str, typer.Option(help="the Ray Serve application's name")] = "polar-vbll",
    route_prefix: Annotated[str, typer.Option(help="where the routes sit under the server's URL")] = "/",
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
) -> None:
    """Serve a run's decisions over HTTP on Ray Serve, in the foreground until Ctrl-C: POST JSON questions to
    /predict for the records of `polar-vbll predict`; GET /health (docs/deploy.md)."""
    import tempfile

    with _one_line_errors():
        from distributed.server import ServeSettings, is_model_uri, preflight

        uri = is_model_uri(target)
        require("polar-vbll serve", *(["polar-vbll serve MODEL_URI"] if uri else []))
        settings = ServeSettings(host=host, port=port, replicas=replicas, max_batch_size=max_batch_size,
                                 batch_wait_timeout_s=batch_wait_s, max_ongoing=max_ongoing, max_queued=max_queued,
                                 max_questions=max_questions, device=device, address=address, name=name,
                                 route_prefix=route_prefix, access_log=access_log)  # fmt: skip
        preflight(settings)
        for line in settings.notes():
            typer.echo(f"note: {line}", err=True)
        with tempfile.TemporaryDirectory(prefix="polar-vbll-serve-") as tmp:
            _serve(target, uri, Path(tmp), settings)


def _serve(target: str, uri: bool, tmp: Path, settings) -> None:
    """``serve``'s work once its input is checked: the run (downloaded for a URI), its rule, the server."""
    from distributed.server import running, wait_for_stop
    from polar_vbll.decisions.rule import DecisionRule
    from polar_vbll.saved import check_run_folder

    note = lambda m: typer.echo(m, err=True)  # noqa: E731
    ignore = None
    if uri:
        from polar_vbll.mlflow_model import BUNDLED_BASE_WARNING, download_run

        run, bundled = download_run(target, tmp, note)
        ignore = BUNDLED_BASE_WARNING if bundled else None
        if not (run / "decision" / "rule.json").is_file():
            raise UserInputError(f"{target} was logged before its run had a decision rule: run `polar-vbll "
                                 "calibrate RUN` (it logs the model again, with the rule), then register it again")
    else:
        run = Path(target).expanduser().resolve()
    folder = check_run_folder(run)
    rule = DecisionRule.load(folder.path)  # an uncalibrated run is refused as `predict` refuses it
    with running(folder.path, settings, ignore_warning=ignore, note=note) as server:
        served = f"{target} (run copy: {folder.path})" if uri else str(folder.path.resolve())
        print(f"serving {served}: {folder.method.label}, {server.replicas} replica(s) on {server.device}")
        for line in rule.describe():
            print(f"  {line}")
        print(f"predict: POST {server.predict_url}   (JSON: a question or a list of them)")
        print(f"health:  GET  {server.health_url}")
        print(f"ready in {server.startup_s:.1f} s; Ctrl-C to stop", flush=True)
        if settings.host in ("0.0.0.0", "::"):
            note(f"warning: listening on every interface ({settings.host}): anyone who reaches this machine "
                 "can query the model")
        stop = wait_for_stop()
        note(f"{stop}: stopping ...")
    print("stopped", flush=True)


@app.command()
def tasks(seed: Annotated[int, typer.Option(help="split seed")] = 0) -> None:
    """List the built-in tasks with their split sizes."""
    from polar_vbll.tasks import available_tasks, split_sizes

    with _one_line_errors():
        for name in available_tasks():
            sizes = split_sizes(name, seed)
            print(f"{name:20s} " + "  ".join(f"{k}={v}" for k, v in sizes.items()))


@app.command()
def methods() -> None:
    """List the methods (adapter kind, head kind, predictive) a config's `method` can name."""
    from polar_vbll.methods import METHODS

    ms = list(METHODS.values())
    wn, wl = max(len(m.name) for m in ms), max(len(m.label) for m in ms)
    for m in ms:
        print(f"{m.name:{wn}s}  {m.label:{wl}s}  adapter={m.adapter:5s}  head={m.head:13s}  "
              f"predictive={m.predictive:10s}  {m.description}")  # fmt: skip


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
