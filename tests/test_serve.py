"""``polar-vbll serve`` as a user runs it: a real server process on 127.0.0.1 (Ray Serve, a local Ray it
starts itself) over a tiny calibrated run, real HTTP requests, the records of ``polar-vbll predict``, one
4xx line per bad request with the server still serving, 503 beyond its queue, and a clean stop on a signal
(distributed/server.py, distributed/serving.py; docs/deploy.md).

One server is shared by the module (Ray Serve takes ~20-45 s to start on two busy cores): it is started
with a queue of 2 and one request per replica at a time, so a burst of concurrent requests overflows it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polar_vbll.tasks import load_task
from polar_vbll_cli.app import app
from tests.optional import for_entry
from tests.records import QUESTIONS, predict_cli

pytestmark = for_entry("polar-vbll serve")

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes | str, timeout: float = 60) -> tuple[int, dict | list | str, dict]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return exc.code, payload, {k.lower(): v for k, v in exc.headers.items()}


def _get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    res = runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={out}",
                              "--set", "method=polar_vbll", "--set", "data.val_limit=40"])  # fmt: skip
    assert res.exit_code == 0, res.output
    run = out / "tiny"
    res = runner.invoke(app, ["calibrate", str(run), "--no-progress", "--coverage", "0.5"])
    assert res.exit_code == 0, res.output
    return run


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, run: Path, startup_s: float):
        self.proc, self.port, self.run, self.startup_s = proc, port, run, startup_s
        self.url = f"http://127.0.0.1:{port}"
        self.stdout: list[str] = []
        self.stderr: list[str] = []


def _pump(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


@pytest.fixture(scope="module")
def server(calibrated):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "polar_vbll_cli", "serve", str(calibrated), "--port", str(port),
           "--max-ongoing", "1", "--max-queued", "2", "--max-batch-size", "1"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    srv = Server(proc, port, calibrated, 0.0)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, srv.stdout), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, srv.stderr), daemon=True)]  # fmt: skip
    for t in pumps:
        t.start()
    try:
        while not any(line.startswith("ready in") for line in srv.stdout):
            assert proc.poll() is None, "the server exited: " + "".join(srv.stderr)[-3000:]
            assert time.monotonic() - t0 < START_TIMEOUT_S, "no 'ready' line: " + "".join(srv.stderr)[-3000:]
            time.sleep(0.2)
        srv.startup_s = time.monotonic() - t0
        print(f"\npolar-vbll serve ready after {srv.startup_s:.1f} s (process start to the 'ready' line)")
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_the_server_says_what_it_serves_and_where(server):
    out = "".join(server.stdout)
    assert f"serving {server.run.resolve()}: PoLAR-VBLL, 1 replica(s) on cpu" in out, out
    assert f"predict: POST {server.url}/predict" in out and f"health:  GET  {server.url}/health" in out
    status, health = _get(f"{server.url}/health")
    assert status == 200
    assert health == {"status": "ok", "run": str(server.run.resolve()), "method": "polar_vbll",
                      "answer_letters": ["A", "B", "C", "D", "E"], "max_choices": 5, "device": "cpu"}  # fmt: skip


def _assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """The same fields and values; probabilities and nats to float rounding (another process, another
    thread count: the sums may run in another order)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert set(g) == set(e), (g, e)
        for key, value in e.items():
            if key in ("confidence", "entropy", "epistemic", "probs", "ood_scores"):
                assert g[key] == pytest.approx(value, abs=1e-6), key
            else:
                assert g[key] == value, key


def test_one_question_and_a_list_give_predicts_records(server, tmp_path):
    expected = predict_cli(server.run, QUESTIONS, tmp_path)
    status, records, _ = _post(f"{server.url}/predict", json.dumps(QUESTIONS))
    assert status == 200 and isinstance(records, list)
    _assert_same_records(records, expected)
    assert [r["id"] for r in records] == ["q1", "q2", "q3"] and "correct" in records[1] and "label" not in records[0]
    status, record, _ = _post(f"{server.url}/predict", json.dumps(QUESTIONS[2]))
    assert status == 200 and isinstance(record, dict)  # one question in, one record out
    _assert_same_records([record], expected[2:])
    assert record["decision"] in ("answer", "abstain", "escalate") and len(record["probs"]) == 4


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ('{"question": "x", "choices": ["a", "b"]', 400, "the request body is not JSON: Expecting ',' delimiter at "
                                                         "line 1 column 40"),
        (b"\xff\xfe", 400, "the request body is not UTF-8 text"),
        ('"a question"', 422, "must be a question (a JSON object with 'question' and 'choices') or a list of them, "
                              "got a string"),
        ("[]", 422, "empty list"),
        ('{"choices": ["a", "b"]}', 422, "the question, field 'question': missing"),
        ('[{"question": "q", "choices": ["a", "b"]}, {"question": "q"}]', 422, "question 1, field 'choices': missing"),
        ('[{"question": "q", "choices": ["a", "b"]}, {"question": "q", "choices": ["a", "b"], "colour": 1}]', 422,
         "question 1, field 'colour': unknown key"),
        ('{"question": "q", "choices": "ab"}', 422, "the question, field 'choices': must be a list of strings"),
        ('[{"question": "q", "choices": ["a", "b"]}, {"question": "q", "choices": ["1", "2", "3", "4", "5", "6"]}]',
         422, "question 1 ('line-2'), field 'choices': 6 choices, but the run's head reads 5 answer letters"),
    ],
)  # fmt: skip
def test_a_bad_request_is_one_4xx_line_and_the_server_keeps_serving(server, body, status, says):
    got, payload, _ = _post(f"{server.url}/predict", body)
    assert got == status, payload
    assert set(payload) == {"error"} and says in payload["error"] and "\n" not in payload["error"], payload
    ok, records, _ = _post(f"{server.url}/predict", json.dumps(QUESTIONS[:1]))
    assert ok == 200 and len(records) == 1


def test_a_burst_beyond_the_queue_is_503_overloaded_and_the_server_answers_afterwards(server):
    """20 requests of 48 questions at once on a replica that holds 1 request and a queue of 2: the rest are
    refused at once (503, Retry-After), never queued without bound; those accepted are answered."""
    ex = load_task("arc_easy", "test", seed=0, limit=48)
    body = json.dumps([{"question": e.question, "choices": list(e.choices)} for e in ex])
    results: list[tuple[int, object, dict]] = []
    barrier = threading.Barrier(20)

    def send():
        barrier.wait()
        results.append(_post(f"{server.url}/predict", body, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    codes = sorted(code for code, _, _ in results)
    assert len(codes) == 20 and set(codes) <= {200, 503}, codes
    assert 1 <= codes.count(200) <= 10 and codes.count(503) >= 10, codes  # at most 1 held + 2 queued at a time
    refused = [(p, h) for code, p, h in results if code == 503]
    assert all("backpressure" in str(p) and h.get("retry-after") == "1" for p, h in refused), refused[0]
    assert all(len(p) == 48 for code, p, _ in results if code == 200)
    status, records, _ = _post(f"{server.url}/predict", json.dumps(QUESTIONS))
    assert status == 200 and len(records) == 3


def _listening(port: int) -> list[str]:
    """The local addresses of every listening TCP socket on ``port`` (/proc/net/tcp, tcp6), as hex."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.append(address)
    return found


def _other_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: it only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc (Linux)")
def test_the_server_listens_on_127_0_0_1_only(server):
    assert _listening(server.port) == ["0100007F"]  # 127.0.0.1, little-endian hex; nothing on 0.0.0.0 or ::
    other = _other_address()
    if other is not None:
        with pytest.raises(OSError), socket.create_connection((other, server.port), timeout=3):
            pass


def test_sigterm_stops_the_server_and_its_ray(server):
    """Last in the module: the signal ends the process (exit 0, "stopped"), the port is closed, and every
    process it started (Ray's GCS, raylet, Serve's controller, proxy and replica) is gone."""
    started = _descendants(server.proc.pid)
    assert len(started) >= 3, started  # Ray's processes run below the server
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(90) == 0, "".join(server.stderr)[-3000:]
    time.sleep(0.5)  # the pumps read the last lines
    assert "stopped" in "".join(server.stdout) and "SIGTERM: stopping" in "".join(server.stderr)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=3).close()
    deadline = time.monotonic() + 20
    while (left := [p for p in started if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"still running after the server exited: {left}"


# ------------------------------------------------------------------------- refused before any work
def _serve(*args: str):
    return runner.invoke(app, ["serve", *args])


def test_an_uncalibrated_run_is_refused_in_one_line_before_ray_starts(calibrated, tmp_path):
    import shutil

    fresh = tmp_path / "copy"
    shutil.copytree(calibrated, fresh, ignore=shutil.ignore_patterns("decision", "checkpoint-*"))
    res = _serve(str(fresh), "--port", str(_free_port()))
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "no calibrated decision rule" in lines[0] and f"polar-vbll calibrate {fresh}" in lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--replicas", "0"], "--replicas must be at least 1, got 0"),
        (["--max-queued", "0"], "--max-queued must be at least 1, got 0"),
        (["--batch-wait-s", "-1"], "--batch-wait-s must be between 0 and 60 seconds"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
        (["--device", "cuda:1"], "--device cuda:1: with `serve` each Ray actor gets one GPU that Ray picks"),
        (["--route-prefix", "api"], "--route-prefix must start with /"),
        (["--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    ],
)
def test_bad_options_are_one_line_before_ray_starts(calibrated, args, says):
    res = _serve(str(calibrated), *args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and says in lines[0], res.output


def test_a_port_in_use_is_refused_in_one_line(calibrated):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _serve(str(calibrated), "--port", str(port))
    assert res.exit_code == 2
    assert res.output.strip() == f"error: cannot listen on 127.0.0.1:{port} (it is in use); pick another --port"


@pytest.mark.extras("mlflow")
def test_a_model_uri_without_a_store_or_unknown_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = _serve("runs:/0123456789abcdef/model", "--port", str(_free_port()))
    assert res.exit_code == 2
    assert "runs:/0123456789abcdef/model: set MLFLOW_TRACKING_URI to the store that holds it" in res.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    res = _serve("models:/no-such-model/1", "--port", str(_free_port()))
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"error: models:/no-such-model/1: MLFLOW_TRACKING_URI names sqlite:///{tmp_path}/"
                                  "mlflow.db, which does not exist (MLflow would create an empty store there); point "
                                  "it at the store that holds the model")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.extras("mlflow")
def test_a_registered_model_uri_serves_the_runs_records(tmp_path):
    """train (tracked) -> calibrate -> register -> serve models:/NAME/1 -> the run folder's predict records."""
    out = tmp_path / "runs"
    res = runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--track", "--set", f"output_dir={out}"])
    assert res.exit_code == 0, res.output
    run = out / "tiny"
    assert runner.invoke(app, ["calibrate", str(run), "--no-progress", "--risk", "0.9"]).exit_code == 0
    res = runner.invoke(app, ["register", str(run), "--name", "tiny-serve"])
    assert res.exit_code == 0, res.output
    store = f"sqlite:///{run / 'mlflow' / 'mlflow.db'}"
    assert store in res.output
    expected = predict_cli(run, QUESTIONS, tmp_path)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store}
    cmd = [sys.executable, "-m", "polar_vbll_cli", "serve", "models:/tiny-serve/1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready in"):
                break
        assert any(x.startswith("serving models:/tiny-serve/1 (run copy: ") for x in lines), lines
        status, records, _ = _post(f"http://127.0.0.1:{port}/predict", json.dumps(QUESTIONS))
        assert status == 200
        _assert_same_records(records, expected)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    done = subprocess.run([sys.executable, "-m", "polar_vbll_cli", "serve", "models:/tiny-serve/9", "--port",
                           str(port)], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    errors = [x for x in done.stderr.splitlines() if not x.startswith("downloading ")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot download the MLflow model models:/tiny-serve/9 "
                                                     f"from {store}: "), done.stderr  # fmt: skip
