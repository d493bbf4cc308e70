"""The HTTP API of ``polar-vbll serve``: a Ray Serve deployment that holds a run's
:class:`~polar_vbll.predictor.Predictor` and answers with the decision records of ``polar-vbll predict``
(docs/deploy.md, "Serve").

Routes (FastAPI, as the deployment's ingress):

- ``POST /predict``: a JSON body that is one question (an object: ``question``, ``choices``; optional
  ``context``, ``id``, ``answer``: docs/predict.md's row format) or a list of them. The answer is one record
  (an object) or the list of records, in order: the fields and numbers of ``Predictor.predict`` (API records:
  no ``line``). Every question is read and checked by the predictor's own reader (``Predictor.questions``)
  before any is predicted; a bad body is one 4xx answer ``{"error": "<one line>"}``: 400 for a body that is
  not JSON, 413 for more than ``max_questions`` questions, 422 for a body of the wrong shape or a bad
  question (``question 2, field 'choices': ...``; a single question is ``the question``), including more
  choices than the run's head reads (both widths named). The replica keeps serving.
- ``GET /health``: ``{"status": "ok", "run", "method", "answer_letters", "max_choices", "device"}``, from
  a replica whose model is loaded.

Requests are batched with ``@serve.batch``: the questions of up to ``max_batch_size`` concurrent requests
(waiting at most ``batch_wait_timeout_s`` for the batch to fill) are decided together by
``Predictor.decide`` (in chunks of the predictor's batch size, 64), one batch at a time, off the event loop.
A request's records depend on the questions decided with it only at the level of float rounding (padding
in a shared batch, as ``predict --batch-size``); a request decided alone gives ``predict``'s numbers.
Back-pressure (``max_ongoing_requests`` per replica, ``max_queued_requests`` waiting) is Ray Serve's own:
requests beyond the queue are answered 503 by its proxy, never queued without bound.
"""

# no `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request) at runtime
import asyncio
import json
import warnings
from collections.abc import Sequence
from typing import Any

from polar_vbll.errors import UserInputError
from polar_vbll.extras import require

require("distributed.serving")  # one line naming the `serve` extra, before the imports below
import ray.serve as serve  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402  (ray[serve] brings FastAPI)
from fastapi.responses import JSONResponse  # noqa: E402

#: The routes, under the application's route prefix.
PREDICT_ROUTE = "/predict"
HEALTH_ROUTE = "/health"
#: Questions in one request at most, by default (more: 413).
DEFAULT_MAX_QUESTIONS = 1024

api = FastAPI(title="polar-vbll decisions", description="A run's decision records (docs/predict.md).")


class RequestError(Exception):
    """A request the server refuses: its HTTP status and one line saying what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_body(body: bytes, max_questions: int = DEFAULT_MAX_QUESTIONS) -> tuple[list[Any], bool]:
    """The questions of a ``POST /predict`` body (JSON: one question object, or a list of them) and whether
    it was one object (its answer is then one record). Raises :class:`RequestError`: 400 for a body that
    is not UTF-8 JSON, 413 for more than ``max_questions`` questions, 422 for any other top-level shape or
    an empty list. The questions themselves are checked by ``Predictor.questions``."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"the request body is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the request body is not JSON: {exc.msg} at line {exc.lineno} column "
                                f"{exc.colno}") from None  # fmt: skip
    if isinstance(data, dict):
        return [data], True
    if not isinstance(data, list):
        raise RequestError(422, "the request body must be a question (a JSON object with 'question' and "
                                f"'choices') or a list of them, got {_json_type(data)}")  # fmt: skip
    if not data:
        raise RequestError(422, "the request body is an empty list: give at least one question")
    if len(data) > max_questions:
        raise RequestError(413, f"the request holds {len(data)} questions, at most {max_questions} are taken per "
                                "request (the server's --max-questions): split it")  # fmt: skip
    return data, False


def _json_type(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)  # fmt: skip


def error_line(exc: Exception, single: bool) -> str:
    """The one line of a refused question: ``question 2, field ...``; ``the question, field ...`` when the
    body was one question."""
    text = str(exc)
    if single and text.startswith("question 0"):
        text = "the question" + text[len("question 0") :]
    return text


@serve.deployment(name="decisions")
@serve.ingress(api)
class DecisionServer:
    """One replica: the run's predictor (loaded once, warmed up on one question so the first request does
    not pay for lazy set-up), its rule, and the batch queue. ``run``: a run folder with a calibrated rule,
    readable on the replica's node; ``device``: ``cpu`` or ``cuda`` (the replica's own GPU);
    ``ignore_warning``: a message pattern to silence while loading (a bundled base model's adapter records
    another base path)."""

    def __init__(self, run: str, device: str, max_batch_size: int, batch_wait_timeout_s: float,
                 max_questions: int = DEFAULT_MAX_QUESTIONS, ignore_warning: str | None = None):  # fmt: skip
        from polar_vbll.predictor import Predictor

        with warnings.catch_warnings():
            if ignore_warning:
                warnings.filterwarnings("ignore", message=ignore_warning)
            self.predictor = Predictor.from_run(run, need_rule=True, device=device)
        self.run, self.device, self.max_questions = run, device, max_questions
        self.decide_batch.set_max_batch_size(max_batch_size)
        self.decide_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.predictor.decide(self.predictor.questions([{"question": "warm-up", "choices": ["a", "b"]}]))

    @api.get(HEALTH_ROUTE)
    def health(self) -> dict[str, Any]:
        """The replica is up and its model loaded: what it serves."""
        folder = self.predictor.folder
        return {"status": "ok", "run": self.run, "method": folder.cfg.method,
                "answer_letters": self.predictor.letters, "max_choices": self.predictor.num_classes,
                "device": self.device}  # fmt: skip

    @api.post(PREDICT_ROUTE)
    async def predict(self, request: Request):
        """One record (a question in) or the list of records (a list in); 4xx ``{"error": ...}`` for a
        bad body or question (module docstring)."""
        try:
            rows, single = parse_body(await request.body(), self.max_questions)
            try:
                questions = self.predictor.questions(rows)
            except UserInputError as exc:  # DataError: the question's index and field
                raise RequestError(422, error_line(exc, single)) from None
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        records = await self.decide_batch(questions)
        return records[0] if single else records

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def decide_batch(self, requests: list[Sequence[Any]]) -> list[list[dict[str, Any]]]:
        """The records of every request of a batch: their questions decided together (in a thread, so the
        replica answers health checks meanwhile), split back per request."""
        flat = [q for qs in requests for q in qs]
        records = await asyncio.to_thread(self.predictor.decide, flat)
        out, start = [], 0
        for qs in requests:
            out.append(records[start : start + len(qs)])
            start += len(qs)
        return out
