"""``polar-vbll serve``'s driver: start (or join) Ray, deploy :mod:`distributed.serving` on Ray Serve, wait
until it answers, and take it down again (docs/deploy.md, "Serve").

Without an address (and without ``RAY_ADDRESS``) a private local Ray is started (dashboard on 127.0.0.1) and
shut down with Serve at the end; with ``address`` / ``RAY_ADDRESS`` the cluster is joined and only this
server's application is deleted at the end (the cluster's Serve instance and its other applications stay).
Serve's HTTP proxy listens on ``host:port`` (127.0.0.1:8000 by default: this machine only). On a cluster
where Serve already runs, its proxy's host and port stay as they are, and the URLs printed are those.

Everything that can be checked before Ray starts is (:meth:`ServeSettings.check`, the port free, the run
folder, its decision rule); each replica then loads the run itself (one GPU each where the cluster has GPUs).
Nothing secret is put in the replicas' runtime environment: only the model-cache locations.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from distributed.batch_predict import ACTOR_ENV_KEYS, actor_device
from distributed.launch import check_reachable, ray_session
from polar_vbll.errors import RunFailure, UserInputError
from polar_vbll.extras import require

#: The Serve application's name (``--name``) and the deployment's default options.
APP_NAME = "polar-vbll"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.01
DEFAULT_MAX_ONGOING = 32
DEFAULT_MAX_QUEUED = 64
#: Seconds a rejected client is told to wait (``Retry-After`` of a 503).
RETRY_AFTER_S = 1
#: Seconds the server may take to answer its health route once Serve reports the application running.
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServeSettings:
    """How to serve: where (``host``, ``port``; ``address`` of a Ray cluster to join, else local), how many
    replicas, the batching (``max_batch_size`` requests decided together, waiting at most
    ``batch_wait_timeout_s`` seconds for a batch to fill), the back-pressure (``max_ongoing`` requests in a
    replica at once, ``max_queued`` waiting for one; beyond: HTTP 503), questions per request at most,
    the replicas' ``device`` (``auto``/None, ``cpu``, ``cuda``), the application's ``name`` and
    ``route_prefix``, and whether each request is logged (``access_log``)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    replicas: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S
    max_ongoing: int = DEFAULT_MAX_ONGOING
    max_queued: int = DEFAULT_MAX_QUEUED
    max_questions: int = 1024
    device: str | None = None
    address: str | None = None
    name: str = APP_NAME
    route_prefix: str = "/"
    access_log: bool = False

    def check(self) -> None:
        """Refuse, in one line (``UserInputError``), a value no server can run with."""
        for flag, value in (("--replicas", self.replicas), ("--max-batch-size", self.max_batch_size),
                            ("--max-ongoing", self.max_ongoing), ("--max-queued", self.max_queued),
                            ("--max-questions", self.max_questions)):  # fmt: skip
            if value < 1:
                raise UserInputError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.batch_wait_timeout_s <= 60 or math.isnan(self.batch_wait_timeout_s):
            raise UserInputError(f"--batch-wait-s must be between 0 and 60 seconds, got {self.batch_wait_timeout_s}")
        if not 1 <= self.port <= 65535:
            raise UserInputError(f"--port must be between 1 and 65535, got {self.port}")
        if not self.host.strip():
            raise UserInputError("--host must not be empty (127.0.0.1: this machine only; 0.0.0.0: every interface)")
        if not self.route_prefix.startswith("/") or (len(self.route_prefix) > 1 and self.route_prefix.endswith("/")):
            raise UserInputError(f"--route-prefix must start with / and not end with one, got {self.route_prefix!r}")
        if not self.name.strip():
            raise UserInputError("--name must not be empty")
        actor_device(self.device, math.inf, "serve")  # cuda:N is refused now; a missing GPU once the cluster is known

    def notes(self) -> list[str]:
        """Settings that run, but not as one may expect."""
        if self.max_batch_size > self.max_ongoing:
            return [f"--max-batch-size {self.max_batch_size} > --max-ongoing {self.max_ongoing}: a batch holds at most "
                    f"{self.max_ongoing} requests (the requests a replica holds at once)"]  # fmt: skip
        return []


@dataclass
class Server:
    """A running server: its URLs, the run it serves, where its replicas run, whether this process started
    the Ray cluster, and how long the start took (seconds)."""

    base_url: str
    predict_url: str
    health_url: str
    run: Path
    replicas: int
    device: str
    started_ray: bool
    startup_s: float


def is_model_uri(target: str) -> bool:
    """Whether ``target`` names an MLflow model (``runs:/<id>/model``, ``models:/NAME/N``, ``models:/NAME@alias``,
    any ``scheme:`` artifact URI) rather than a run folder (a path that exists is a folder)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", target)) and not Path(target).exists()


def preflight(settings: ServeSettings) -> None:
    """What is checked before anything else (``UserInputError``): the settings, then the address of a
    cluster to join (it answers) or, for a local start, ``host:port`` (free to listen on)."""
    settings.check()
    target = settings.address or os.environ.get("RAY_ADDRESS")
    if target:
        check_reachable(target)
    else:
        check_port_free(settings.host, settings.port)


def check_port_free(host: str, port: int) -> None:
    """Refuse (``UserInputError``) a ``host:port`` this machine cannot listen on: taken, or not an address of
    this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserInputError(f"--host {host}: not an address this machine can listen on ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            why = "it is in use" if exc.errno in (98, 48) else exc.strerror
            raise UserInputError(f"cannot listen on {host}:{port} ({why}); pick another --port") from None


def _env() -> dict[str, str]:
    return {k: os.environ[k] for k in ACTOR_ENV_KEYS if k in os.environ}


def _http_endpoint(host: str, port: int) -> tuple[str, int]:
    """The host and port Serve's proxy really uses: the running Serve instance's (joined cluster), else ours."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        return config.host or host, config.port or port
    except Exception:  # noqa: BLE001 - a private API; fall back to what was asked
        return host, port


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - our own http:// URL
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RunFailure(f"the server did not answer {url} within {timeout_s:.0f} s ({last})")


def _failure_line(exc: BaseException) -> str:
    """The last ``SomeError: message`` line of a replica's traceback (Serve wraps it in its own text)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Failure")) and " " not in head:
            return line[:400]
    return (lines[-1] if lines else type(exc).__name__)[:400]


@contextlib.contextmanager
def running(run: Path, settings: ServeSettings, *, ignore_warning: str | None = None,
            note: Callable[[str], None] = lambda _m: None) -> Iterator[Server]:  # fmt: skip
    """Serve ``run`` (a checked run folder with a decision rule) while the ``with`` block runs; ``note``
    receives progress lines. On exit, the application is deleted and, if this call started Ray, Serve and
    Ray are shut down. Raises ``UserInputError`` for settings, a taken port or an unreachable address (before
    Ray starts), ``RunFailure`` when the replicas fail to start (with their error's last line)."""
    require("distributed.server.running")
    preflight(settings)
    target = settings.address or os.environ.get("RAY_ADDRESS")
    import ray
    import ray.serve as serve
    from ray.serve.config import BackpressureConfig
    from ray.serve.schema import LoggingConfig

    from distributed.serving import HEALTH_ROUTE, PREDICT_ROUTE, DecisionServer

    t0 = time.monotonic()
    cpus = os.cpu_count() or 1
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our own progress lines say it
    note(f"starting Ray {'(joining ' + target + ')' if target else '(local, this machine only)'} ...")
    with ray_session(settings.address, num_cpus=max(settings.replicas, cpus), env=_env(), dashboard=False) as started:
        try:
            gpus = ray.cluster_resources().get("GPU", 0.0)
            device = actor_device(settings.device, gpus, "serve")
            if not started:
                taken = serve.status().applications if _serve_running() else {}
                if settings.name in taken:
                    raise UserInputError(f"the cluster already serves an application named {settings.name!r}; "
                                         "give this one another --name (and --route-prefix)")  # fmt: skip
            logs = LoggingConfig(log_level="WARNING", enable_access_log=settings.access_log)
            serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=logs)
            per_replica_cpus = max(1, cpus // settings.replicas) if started and device == "cpu" else 1
            options = {"num_cpus": per_replica_cpus, "runtime_env": {"env_vars": _env()}}
            if device == "cuda":
                options["num_gpus"] = 1
            note(f"loading {run} on {settings.replicas} replica{'s' if settings.replicas > 1 else ''} ({device}) ...")
            app = DecisionServer.options(
                num_replicas=settings.replicas, max_ongoing_requests=settings.max_ongoing,
                max_queued_requests=settings.max_queued, ray_actor_options=options,
                backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
            ).bind(str(run), device, settings.max_batch_size, settings.batch_wait_timeout_s, settings.max_questions,
                   ignore_warning)  # fmt: skip
            try:
                serve.run(app, name=settings.name, route_prefix=settings.route_prefix, logging_config=logs)
            except Exception as exc:  # a replica's constructor failed (Serve gave up after its retries)
                raise RunFailure(f"the server's replicas failed to start: {_failure_line(exc)}") from None
            host, port = _http_endpoint(settings.host, settings.port)
            prefix = "" if settings.route_prefix == "/" else settings.route_prefix
            base = f"http://{_url_host(host)}:{port}{prefix}"
            _wait_healthy(base + HEALTH_ROUTE, READY_TIMEOUT_S)
            yield Server(base, base + PREDICT_ROUTE, base + HEALTH_ROUTE, run, settings.replicas, device, started,
                         time.monotonic() - t0)  # fmt: skip
        finally:
            _take_down(settings.name)


def _serve_running() -> bool:
    import ray.serve as serve

    try:
        serve.status()
        return True
    except Exception:  # noqa: BLE001 - no Serve controller on this cluster yet
        return False


def _take_down(name: str) -> None:
    """Delete this server's application (gracefully: its replicas finish the requests they hold). Where this
    process started Ray, ``ray_session`` then shuts Ray down, and Serve's controller and proxy with it
    (``serve.shutdown()`` first would only add a warning from the controller it kills)."""
    import ray.serve as serve

    with contextlib.suppress(Exception):  # nothing deployed yet, or the cluster went away
        serve.delete(name)


def wait_for_stop() -> str:
    """Block until SIGINT (Ctrl-C) or SIGTERM; returns the signal's name. The previous handlers are back
    afterwards (a second Ctrl-C during the shutdown interrupts it)."""
    stop = threading.Event()
    got: list[str] = []

    def handler(signum, _frame):
        got.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return got[0]
