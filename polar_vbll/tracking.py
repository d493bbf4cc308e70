"""MLflow tracking: where the store is, masking secrets, and the one logger that writes a run.

Embedded by default: a run, comparison or search writes a local SQLite store (``<folder>/mlflow/mlflow.db``)
with its artifacts beside it, so nothing has to run first; ``MLFLOW_TRACKING_URI`` points every process at
a server instead. The store is checked before any training starts (an unreachable server fails at once,
its URI shown with credentials masked).

One layout everywhere: a run is an MLflow run with every config value as a param, metrics over steps
(loss, learning rate, orthogonality error, stable rank, mid-training validation), the final metrics
(:func:`polar_vbll.results.flat_metrics`), reliability diagrams, and the adapter, the head and
``results.json`` as artifacts (:func:`log_final`). A comparison or a search is a parent run with one child
per (task, method, seed) or per trial. Only the process that owns a run writes it: the single process, or
rank 0 of distributed workers. :class:`RunLogger` keeps the time it spends, so a run can report what
tracking cost it (``results.json`` -> ``timings.tracking_train_s`` / ``tracking_final_s``).

MLflow is imported lazily, here only: ``polar_vbll`` works without it installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from polar_vbll.errors import UserInputError
from polar_vbll.extras import MissingExtra, installed, require

#: Param keys whose values are never logged (matched anywhere in the dotted key, case-insensitive).
SECRET_KEY = re.compile(r"(token|password|passwd|secret|api[_-]?key|credential|auth)", re.IGNORECASE)
#: ``scheme://user:password@host`` anywhere in a string.
_URI_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)([^/\s:@]+)(:[^/\s@]*)?@")
#: ``token=...`` style query parameters anywhere in a string.
_SECRET_QUERY = re.compile(
    r"((?:token|password|passwd|secret|api[_-]?key|sig|signature|access[_-]?key)=)[^&\s]+", re.IGNORECASE
)
MASK = "***"
#: MLflow's limits (3.x): a param value of at most 6000 characters, 100 params / 1000 metrics per batch.
PARAM_VALUE_MAX = 6000
PARAM_BATCH, METRIC_BATCH = 100, 1000


class TrackingError(UserInputError):
    """The tracking store cannot be used (unreachable server, unusable store); says which and why. A missing
    ``mlflow`` is :class:`polar_vbll.extras.MissingExtra`."""


def mask_uri(uri: str) -> str:
    """``uri`` with any password (and a user name that carries a token) and secret query values masked."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return mask_secrets(uri)
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in creds else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if SECRET_KEY.search(k) or k.lower() in ("sig", "signature") else v) for k, v in pairs],
            safe="*",
        )
    if netloc == parts.netloc and query == parts.query:
        return uri  # nothing secret (urlunsplit would also drop the empty authority of sqlite:////path)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_secrets(text: str) -> str:
    """Every credential-bearing URI and secret query value in free text (an error message) masked."""
    text = _URI_CREDENTIALS.sub(
        lambda m: f"{m.group(1)}{m.group(2) if m.group(3) else MASK}{':' + MASK if m.group(3) else ''}@", text
    )
    return _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, text)


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (strings), secrets masked by key name and inside values."""
    out = {}
    for key, value in params.items():
        text = MASK if SECRET_KEY.search(key) else mask_secrets(str(value))
        out[key] = text if len(text) <= PARAM_VALUE_MAX else text[: PARAM_VALUE_MAX - 3] + "..."
    return out


class _MaskedStream:
    """A text stream that masks credentials (:func:`mask_secrets`) in everything written through it."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(mask_secrets(text))

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...
        return getattr(self._stream, name)


class _MaskingFilter(logging.Filter):
    """Masks credentials in a log record's message (MLflow's own loggers write through handlers that hold
    the original streams, beyond :func:`masked_console`'s reach)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_FILTER = _MaskingFilter()


@contextlib.contextmanager
def masked_console() -> Iterator[None]:
    """Inside the block, everything written to stdout and stderr (by this package or a library: MLflow's
    "View run ... at: <tracking URI>" lines) and every record of the ``mlflow`` loggers has its
    credentials masked. Re-entrant; the streams are restored afterwards."""
    for handler in logging.getLogger("mlflow").handlers + logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    if isinstance(sys.stdout, _MaskedStream):
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _MaskedStream(out), _MaskedStream(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


# ------------------------------------------------------------------------------------------- the store
def local_store(folder: Path) -> tuple[str, str]:
    """The embedded store of a search folder: ``(sqlite tracking URI, artifact root URI)``.

    Absolute paths on purpose: MLflow resolves a relative ``sqlite:///`` path and its default ``./mlruns``
    artifact root against whatever directory each process happens to run in.
    """
    root = Path(folder).expanduser().resolve() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def resolve_store(folder: Path) -> tuple[str, str | None]:
    """``MLFLOW_TRACKING_URI`` when set (a team server; its own artifact store), else the local store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return local_store(folder)


def _import_mlflow():
    import logging

    require("polar_vbll.tracking")  # one line naming the `track` extra (polar_vbll.extras)
    # MLflow's artifact progress bars ("Downloading artifacts" for local copies while a model is logged) are
    # noise in every run's log; a user who sets the variable keeps the bars
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401
    from mlflow.tracking import MlflowClient

    # After the import: mlflow configures its own logger (level INFO) when first imported, so a level set
    # before it is overwritten. Its INFO lines ("Updating database tables" ...) are noise in a user's log.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient


def client_for(uri: str):
    """An ``MlflowClient`` on ``uri``."""
    return _import_mlflow()(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail now, not after an hour of training, when the store cannot be reached or opened.

    Remote stores get one request with a short timeout and no retries (MLflow otherwise retries for
    minutes); the message names the URI with its credentials masked.
    """
    remote = uri.startswith(("http://", "https://"))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    if remote:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    try:
        client_for(uri).search_experiments(max_results=1)
    except (TrackingError, MissingExtra):
        raise
    except Exception as exc:  # any failure of the store is a reason not to start
        first = mask_secrets(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise TrackingError(
            f"the MLflow tracking URI {mask_uri(uri)} cannot be reached or opened: {first[:300]}"
        ) from None
    finally:
        if remote:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def ensure_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name`` on ``uri``, created (with the local artifact root) if missing."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def strip_credentials(uri: str) -> str:
    """``uri`` without its user information (``user:password@``) and without secret query values (token,
    password, signature, ...): what may travel to other processes and nodes. A process that needs the
    credentials reads them where it runs (MLflow's ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
    / ``MLFLOW_TRACKING_TOKEN``)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return mask_secrets(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, v) for k, v in pairs if not (SECRET_KEY.search(k) or k.lower() in ("sig", "signature"))])
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def credentials_note(uri: str) -> str | None:
    """A note for a distributed run whose tracking URI carries credentials (they stay on the driver), or
    None."""
    if strip_credentials(uri) == uri:
        return None
    return ("note: the credentials in MLFLOW_TRACKING_URI stay on this machine (Ray would show them to anyone "
            "who can reach the cluster); workers log with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) from their own node's environment (docs/distributed.md)")  # fmt: skip


@dataclass(frozen=True)
class TrackingTarget:
    """Which run to write to; small and picklable, so it travels to Ray workers in the loop config."""

    uri: str
    run_id: str

    def shareable(self) -> TrackingTarget:
        """The target with the URI's credentials removed (:func:`strip_credentials`), for Ray workers: the
        node that logs authenticates with its own environment."""
        return TrackingTarget(strip_credentials(self.uri), self.run_id)


class RunLogger:
    """Writes one MLflow run; every call is timed (``seconds``) so its cost can be measured.

    Logging failures are reported once and then skipped: losing a metric must never lose a training run.
    """

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.client = client_for(target.uri)
        self.seconds = 0.0
        self._warned = False

    def _call(self, fn, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        try:
            with masked_console():  # MLflow prints the tracking URI (e.g. when a run ends)
                fn(*args, **kwargs)
        except Exception as exc:  # pragma: no cover - depends on the store failing mid-run
            if not self._warned:
                print(
                    f"[tracking] MLflow logging failed, continuing without it: {mask_secrets(str(exc))[:300]}"
                )
                self._warned = True
        finally:
            self.seconds += time.perf_counter() - t0

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in safe_params(params).items()]
        for i in range(0, len(items), PARAM_BATCH):
            self._call(self.client.log_batch, self.target.run_id, params=items[i : i + PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for i in range(0, len(items), METRIC_BATCH):
            self._call(self.client.log_batch, self.target.run_id, metrics=items[i : i + METRIC_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in safe_params(tags).items()]
        self._call(self.client.log_batch, self.target.run_id, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or a whole directory (kept as a folder of that name under ``artifact_path``)."""
        path = Path(path)
        if path.is_dir():
            dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self._call(self.client.log_artifacts, self.target.run_id, str(path), dest)
        elif path.is_file():
            self._call(self.client.log_artifact, self.target.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, self.target.run_id, status)


def prefixed(metrics: Mapping[str, Any], prefix: str, keys: Iterable[str] | None = None) -> dict[str, float]:
    """``{prefix + key: value}`` for the numeric entries (optionally only ``keys``)."""
    wanted = set(keys) if keys is not None else None
    return {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if (wanted is None or k in wanted) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def open_run(
    folder: Path,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    parent: TrackingTarget | None = None,
) -> TrackingTarget:
    """A new MLflow run for work in ``folder`` (its embedded store, or the server of
    ``MLFLOW_TRACKING_URI``), checked reachable first, with ``params`` logged (secrets masked); a child of
    ``parent`` when given (same store)."""
    if parent is not None:
        uri, artifacts = parent.uri, None
    else:
        uri, artifacts = resolve_store(folder)
        check_reachable(uri)
    experiment_id = ensure_experiment(uri, experiment, artifacts)
    tags = dict(tags or {})
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.run_id
    run = client_for(uri).create_run(experiment_id, run_name=run_name, tags=tags)
    target = TrackingTarget(uri, run.info.run_id)
    RunLogger(target).log_params(params)
    return target


#: Where a folder records the MLflow run it logs to, so a resumed run continues the same MLflow run.
RUN_RECORD = "mlflow_run.json"


def mlflow_installed() -> bool:
    return installed("mlflow")


#: The tag a FAILED run carries: why it failed (:func:`failure_line`).
ERROR_TAG = "polar_vbll.error"


def failure_line(exc: BaseException) -> str:
    """``ExceptionType: first line of the message`` (at most 500 characters, secrets masked)."""
    lines = str(exc).strip().splitlines()
    return mask_secrets(f"{type(exc).__name__}: {lines[0] if lines else ''}")[:500]


@contextlib.contextmanager
def tracked(
    folder: Path,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    parent: TrackingTarget | None = None,
    enabled: bool = True,
    settings: str | None = None,
    fresh: bool = False,
) -> Iterator[RunLogger | None]:
    """A :class:`RunLogger` on the MLflow run of ``folder`` for the duration of the block (None when
    ``enabled`` is False, or with a note when mlflow is not installed). The run is created on first use
    and continued when the folder is run again with the same ``settings`` (a digest of what the run
    trains; its id is kept in ``folder/mlflow_run.json``), so a resumed run continues its metric history
    and a run of other settings, or a ``fresh`` start, gets a run of its own. It is closed FINISHED, or
    FAILED (KILLED on Ctrl-C) when the block raises."""
    if not enabled:
        yield None
        return
    if not mlflow_installed():
        print("note: mlflow is not installed (the `track` extra); this run is not tracked", flush=True)
        yield None
        return
    with masked_console():  # nothing printed while a tracked run is open shows a credential
        folder = Path(folder).expanduser().resolve()
        target = None if fresh else _reopen(folder, parent, settings)
        if target is None:
            target = open_run(folder, experiment, run_name, params, tags, parent)
            folder.mkdir(parents=True, exist_ok=True)
            record = {"run_id": target.run_id, "tracking_uri": mask_uri(target.uri), "settings": settings}
            (folder / RUN_RECORD).write_text(json.dumps(record, indent=2))
        logger = RunLogger(target)
        status = "FAILED"
        try:
            yield logger
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException as exc:  # a FAILED run says why (the error's first line, secrets masked)
            logger.set_tags({ERROR_TAG: failure_line(exc)})
            raise
        finally:
            logger.end(status)


def _reopen(folder: Path, parent: TrackingTarget | None, settings: str | None) -> TrackingTarget | None:
    """The folder's recorded MLflow run, set RUNNING again, when it is in the store in use and was written
    with the same settings."""
    record_path = folder / RUN_RECORD
    if not record_path.is_file():
        return None
    uri = parent.uri if parent is not None else resolve_store(folder)[0]
    try:
        record = json.loads(record_path.read_text())
        if record.get("tracking_uri") != mask_uri(uri) or record.get("settings") != settings:
            return None
        if parent is None:
            check_reachable(uri)
        client = client_for(uri)
        client.get_run(record["run_id"])
        client.update_run(record["run_id"], status="RUNNING")
    except (TrackingError, MissingExtra):
        raise
    except Exception:  # the store was replaced or the record is damaged: start a new run
        return None
    return TrackingTarget(uri, record["run_id"])


def log_final(
    logger: RunLogger, results: Mapping[str, Any], predictions: Mapping[str, Any], artifacts: Path | None
) -> None:
    """The end of a run: final metrics (``flat_metrics``), reliability diagrams of the validation and
    evaluation splits, the risk-coverage curve, and the adapter, the head and ``results.json`` from
    ``artifacts`` as artifacts."""
    import tempfile

    from polar_vbll.plots import reliability_diagram
    from polar_vbll.results import flat_metrics

    step = int(results["training"]["steps"])
    if results.get("placement"):  # where it ran, as the device this process resolved (model.device may be auto)
        logger.log_params({f"placement.{k}": v for k, v in results["placement"].items()})
    logger.log_metrics(flat_metrics(dict(results)), step)
    logger.log_metrics({"orthogonality_error": results["training"]["orthogonality_error"]}, step)
    shortened = {
        f"prompts_shortened_{split.replace(':', '_')}_{part}": n
        for split, parts in results.get("prompts_shortened", {}).items()
        for part, n in parts.items()
    }
    logger.log_metrics(shortened, step)
    with tempfile.TemporaryDirectory(prefix="polar-vbll-plots-") as tmp:
        for name in ("validation", "eval"):
            label = "test" if name == "eval" else name
            png = reliability_diagram(
                predictions[name].accumulator(),
                Path(tmp) / f"reliability_{label}.png",
                title=f"{results['label']}: {results['task']} {label}",
            )
            logger.log_artifact(png, "plots")
    if artifacts is not None:
        if (artifacts / "risk_coverage.png").is_file():
            logger.log_artifact(artifacts / "risk_coverage.png", "plots")
        for name in ("adapter", "adapter_peft", "head.safetensors"):
            logger.log_artifact(artifacts / name, "model")
        logger.log_artifact(artifacts / "results.json")
