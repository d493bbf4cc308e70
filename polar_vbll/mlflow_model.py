"""A run as an MLflow model (``mlflow.pyfunc`` flavour): what ``polar-vbll register`` registers and
``mlflow.pyfunc.load_model("runs:/<id>/model")`` loads (docs/deploy.md).

The model's one artifact is a copy of the run folder holding what a reload reads (``config.yaml``,
``params.json``, ``readout.json``, ``adapter/``, ``head.safetensors``, ``results.json`` for the run's
temperature, ``decision/`` once calibrated; per member for an ensemble) and the tokenizer files
(``tokenizer/``). The base model is referenced, not
copied: by ``config.yaml``'s ``model`` (a hub id pinned to the snapshot in ``params.json``, a path, or the
bundled SmolLM2). :class:`RunModel` rebuilds a :class:`~polar_vbll.predictor.Predictor` from the copy, and
its ``predict`` takes a DataFrame of questions (``question``, ``choices``, optional ``context``, ``id``,
``answer``) and returns the decision records of ``Predictor.predict``.

MLflow is imported here (``mlflow.pyfunc.PythonModel``); this module is imported only lazily, by the end of
a tracked run, ``calibrate``, ``register`` and ``serve`` of a model URI (:func:`download_run`), so
``polar_vbll`` still runs without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polar_vbll.errors import UserInputError
from polar_vbll.extras import require

require("polar_vbll.mlflow_model")  # one line naming the `track` extra (polar_vbll.extras), before the import
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as polar_vbll.tracking: no bar noise
import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402

#: What a reload reads from a run folder (and from each ``member-<i>/`` of an ensemble).
RUN_FILES = ("config.yaml", "params.json", "readout.json", "results.json", "head.safetensors")
RUN_DIRS = ("adapter", "decision")
MEMBER_FILES = ("readout.json", "head.safetensors")
#: Where ``--include-base`` puts the base model in the run copy.
BASE_DIR = "base"
#: The tokenizer files in the run copy (the base model's; ``base/`` holds them when bundled).
TOKENIZER_DIR = "tokenizer"
#: The artifact path of the model in its MLflow run (``runs:/<id>/model``).
MODEL_PATH = "model"
#: What loading a copy with a bundled base warns (the adapter records the base path it trained on): silenced.
BUNDLED_BASE_WARNING = r"adapter in .* was saved for base model"
#: The input example logged with the model (any run's head reads at least two choices).
INPUT_EXAMPLE = {"question": 'What is the sentiment of this review? "a gem of a film"',
                 "choices": ["negative", "positive"], "context": "", "id": "example-1"}  # fmt: skip


class RunModel(mlflow.pyfunc.PythonModel):
    """A trained run's decisions as an MLflow pyfunc model."""

    _skip_type_hint_validation = True  # the signature says what predict takes (MLflow would ask for type hints)

    def load_context(self, context) -> None:
        from polar_vbll.predictor import Predictor

        run = Path(context.artifacts["run"])
        self.calibrated = (run / "decision" / "rule.json").is_file()
        bundled = (run / BASE_DIR).is_dir()
        if bundled:  # a view of the copy whose config points at the bundled base model
            self._view = tempfile.TemporaryDirectory(prefix="polar-vbll-model-")
            run = bundled_view(run, Path(self._view.name))
        with warnings.catch_warnings():
            if bundled:  # the same weights under another path: the adapter's recorded base name differs
                warnings.filterwarnings("ignore", message=BUNDLED_BASE_WARNING)
            self.predictor = Predictor.from_run(run, need_rule=False)

    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:
        """The decision records (docs/predict.md; API records: no ``line``) of ``model_input``: a
        DataFrame (one question per row), a list of dicts or one dict."""
        if not self.calibrated:
            raise UserInputError("this model was logged before its run had a decision rule: run "
                                 "`polar-vbll calibrate RUN` (it logs the model again, with the rule)")  # fmt: skip
        if isinstance(model_input, dict):
            model_input = [model_input]
        return self.predictor.predict(_plain(model_input))


def _plain(frame):
    """A DataFrame with the columns MLflow's schema enforcement filled for absent optional fields (``None``)
    dropped where every row lacks them, and numpy arrays of choices as lists."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - mlflow needs pandas
        return frame
    if not isinstance(frame, pd.DataFrame):
        return frame
    frame = frame.dropna(axis=1, how="all").copy()
    if "choices" in frame:
        frame["choices"] = [list(c) for c in frame["choices"]]
    return frame


def signature():
    """The model's signature: the input columns (``question``, ``choices``, optional ``context``, ``id``,
    and ``answer``: a 0-based index, NaN for none; rows with one are scored as ``predict`` scores them)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(DataType.string, "question"),
        ColSpec(Array(DataType.string), "choices"),
        ColSpec(DataType.string, "context", required=False),
        ColSpec(DataType.string, "id", required=False),
        ColSpec(DataType.double, "answer", required=False),
    ])  # fmt: skip
    return ModelSignature(inputs=inputs)


def bundled_view(run: Path, view: Path) -> Path:
    """``view`` filled with links to the files of the run copy ``run`` and a ``config.yaml`` whose model is
    the bundled ``base/`` folder (``params.json`` without the hub snapshot it no longer needs)."""
    from polar_vbll.config import dump_config, load_config

    for entry in run.iterdir():
        if entry.name not in ("config.yaml", "params.json"):
            (view / entry.name).symlink_to(entry.resolve())
    cfg = load_config(run / "config.yaml")
    model = cfg.model.model_copy(update={"source": "path", "path": str((run / BASE_DIR).resolve()), "revision": None})
    dump_config(cfg.model_copy(update={"model": model}), view / "config.yaml")
    if (run / "params.json").is_file():
        params = json.loads((run / "params.json").read_text())
        params.pop("model_source.revision", None)
        (view / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True))
    return view


def download_run(uri: str, dest: Path, note: Callable[[str], None] = lambda _m: None) -> tuple[Path, bool]:
    """The run copy of the MLflow model ``uri`` (``runs:/<id>/model``, ``models:/NAME/N``, any artifact URI
    MLflow reads), downloaded under ``dest`` (an empty
    folder the caller removes), as a folder ``Predictor.from_run`` opens, and whether its base model is
    bundled (the folder is then a view whose config points at ``base/``; loading it warns
    :data:`BUNDLED_BASE_WARNING`). ``runs:/`` and ``models:/`` are read from ``MLFLOW_TRACKING_URI``'s
    store. Raises ``UserInputError`` (one line; the store's credentials masked) when it cannot be
    downloaded or is not a polar-vbll model; ``note`` hears when the download starts (after the checks)."""
    import yaml

    from polar_vbll.tracking import mask_secrets, mask_uri, masked_console

    store = os.environ.get("MLFLOW_TRACKING_URI")
    if uri.startswith(("runs:", "models:")):
        if not store:
            raise UserInputError(f"{uri}: set MLFLOW_TRACKING_URI to the store that holds it (a run's local "
                                 "store: sqlite:///<run>/mlflow/mlflow.db)")  # fmt: skip
        if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
            raise UserInputError(f"{uri}: MLFLOW_TRACKING_URI names {mask_uri(store)}, which does not exist (MLflow "
                                 "would create an empty store there); point it at the store that holds the model")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines ("Updating database tables") are noise
    note(f"downloading {uri} ...")
    try:
        with masked_console():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as exc:  # MlflowException (no such run, model or version), OSError
        first = mask_secrets((str(exc).strip().splitlines() or [type(exc).__name__])[0][:300])
        where = f" from {mask_uri(store)}" if store else ""
        raise UserInputError(f"cannot download the MLflow model {uri}{where}: {first}") from None
    try:
        spec = yaml.safe_load((local / "MLmodel").read_text())
        run = local / spec["flavors"]["python_function"]["artifacts"]["run"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        run = None
    if run is None or not (run / "config.yaml").is_file():
        raise UserInputError(f"{uri} is not a polar-vbll model (no run copy with a config.yaml in its artifacts); "
                             "log one with `polar-vbll train`, `calibrate` or `register`")  # fmt: skip
    if not (run / BASE_DIR).is_dir():
        return run, False
    view = dest / "run-view"
    view.mkdir()
    return bundled_view(run, view), True


def bundle_base(run: Path, dest: Path) -> None:
    """The run's base model (weights in safetensors, config, tokenizer) written to ``dest`` (``--include-base``)."""
    from polar_vbll.models import load_backbone
    from polar_vbll.placement import placement_for
    from polar_vbll.saved import check_run_folder

    folder = check_run_folder(run)
    model, tokenizer = load_backbone(folder.cfg.model, placement_for(folder.cfg.model, "cpu"))
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def save_tokenizer(run: Path, dest: Path) -> None:
    """The run's tokenizer files (the one its readout's token ids were verified against) written to ``dest``,
    for consumers of the model; the loader reads the base model's own, which is the same."""
    from polar_vbll.config import load_config
    from polar_vbll.models import load_tokenizer
    from polar_vbll.saved import pinned_snapshot

    load_tokenizer(pinned_snapshot(load_config(run / "config.yaml"), run).model).save_pretrained(dest)


def copy_run(run: Path, dest: Path, include_base: bool = False) -> Path:
    """The files of ``run`` a reload reads, copied to ``dest`` (which must not exist); with ``include_base``
    the base model too (``base/``)."""
    dest.mkdir(parents=True)
    if include_base:
        bundle_base(run, dest / BASE_DIR)
    for name in RUN_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    for name in RUN_DIRS:
        if (run / name).is_dir():
            shutil.copytree(run / name, dest / name)
    for member in sorted(run.glob("member-*")):
        if member.is_dir():
            (dest / member.name).mkdir()
            shutil.copytree(member / "adapter", dest / member.name / "adapter")
            for name in MEMBER_FILES:
                if (member / name).is_file():
                    shutil.copy2(member / name, dest / member.name / name)
    return dest


def save(run_copy: Path, path: Path) -> Path:
    """Write the MLflow model of the run files in ``run_copy`` to ``path`` (explicit requirements: MLflow
    would otherwise load the model in a subprocess to infer them)."""
    import pandas as pd

    from polar_vbll import __version__

    quiet = logging.getLogger("mlflow.pyfunc")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning on pickled models: this one is our own class, loaded by name
    try:
        mlflow.pyfunc.save_model(
            str(path), python_model=RunModel(), artifacts={"run": str(run_copy)}, signature=signature(),
            input_example=pd.DataFrame([INPUT_EXAMPLE]), pip_requirements=[f"polar-vbll=={__version__}"],
        )  # fmt: skip
    finally:
        quiet.setLevel(level)
    return path


def log_model(logger, run_files: Path, config_files: Path | None = None, include_base: bool = False,
              artifact_path: str = MODEL_PATH) -> None:  # fmt: skip
    """Log the MLflow model of a run (``run_files``: a run folder, or the staged artifacts of a run ending;
    ``config_files``: where ``config.yaml`` and ``params.json`` are, when not there; ``include_base``: the
    base model bundled) through ``logger`` (:class:`polar_vbll.tracking.RunLogger`), at ``artifact_path`` in
    its run."""
    parent, _, leaf = artifact_path.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="polar-vbll-model-") as tmp:
        copy = copy_run(run_files, Path(tmp) / "run", include_base)
        for name in ("config.yaml", "params.json"):
            if config_files is not None and (config_files / name).is_file():
                shutil.copy2(config_files / name, copy / name)
        if not include_base:  # (the bundle holds it)
            save_tokenizer(copy, copy / TOKENIZER_DIR)
        logger.log_artifact(save(copy, Path(tmp) / leaf), parent or None)


def run_target(run: Path):
    """The MLflow run a run folder logged to (``mlflow_run.json``): in ``MLFLOW_TRACKING_URI`` when set, else in
    the local store it recorded (its own, or its comparison's or search's); ``UserInputError`` when the run was
    not tracked, or not in that store."""
    from polar_vbll.tracking import RUN_RECORD, TrackingTarget, mask_uri

    run = Path(run).expanduser().resolve()
    record = run / RUN_RECORD
    if not record.is_file():
        raise UserInputError(f"{run} was not tracked in MLflow ({RUN_RECORD} is missing): train it with "
                             "the `track` extra installed, without --no-track")  # fmt: skip
    try:
        data = json.loads(record.read_text())
        run_id = data["run_id"]
    except (OSError, ValueError, KeyError):
        raise UserInputError(f"{record} is damaged; train the run again to track it") from None
    recorded = str(data.get("tracking_uri"))
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and recorded.startswith("sqlite:///") and Path(recorded.removeprefix("sqlite:///")).is_file():
        uri = recorded  # a local store: the run's own, or its comparison's or search's
    if uri is None or mask_uri(uri) != recorded:
        where = mask_uri(uri) if uri else "no store here (its local store file is gone)"
        raise UserInputError(f"{run} was tracked in {recorded}, not in {where}: set MLFLOW_TRACKING_URI to "
                             "that store")  # fmt: skip
    return TrackingTarget(uri, run_id)


def relog(run: Path) -> str | None:
    """Log the model of a tracked run folder again (after ``calibrate``: now with its rule); returns its
    ``runs:/`` URI, or None when the run is not tracked (nothing to update)."""
    from polar_vbll.tracking import RunLogger

    try:
        target = run_target(run)
    except UserInputError:
        return None
    log_model(RunLogger(target), Path(run))
    return f"runs:/{target.run_id}/{MODEL_PATH}"


def register(run: Path, name: str, include_base: bool = False) -> tuple[str, str, Any]:
    """Register a tracked run folder's model as a new version of ``name`` in the Model Registry of the run's
    store. The version is a snapshot of the run folder as it is now (the rule once calibrated; with
    ``include_base`` the base model bundled), logged at ``versions/<name>-<time>`` in the run, so a later
    ``calibrate`` (which updates ``runs:/<id>/model``) never changes a registered version. Returns (the store
    URI, the model URI registered, the model version)."""
    import time

    from polar_vbll.tracking import RunLogger, client_for, masked_console

    target = run_target(run)
    if not (Path(run) / "decision" / "rule.json").is_file():
        raise UserInputError(f"{run} has no decision rule: run `polar-vbll calibrate {run}` first (the "
                             "registered model decides with it)")  # fmt: skip
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = f"versions/{safe}-{time.strftime('%Y%m%dT%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"
    logger = RunLogger(target)
    log_model(logger, Path(run), include_base=include_base, artifact_path=path)
    names = {a.path for a in client_for(target.uri).list_artifacts(target.run_id, path)}
    if f"{path}/MLmodel" not in names:
        raise UserInputError(f"the model of {run} could not be logged to its MLflow run {target.run_id} (see the "
                             "[tracking] line above)")  # fmt: skip
    uri = f"runs:/{target.run_id}/{path}"
    mlflow.set_tracking_uri(target.uri)
    mlflow.set_registry_uri(target.uri)
    with masked_console():
        version = mlflow.register_model(uri, name)
    return target.uri, uri, version
