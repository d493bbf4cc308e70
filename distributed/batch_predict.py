"""``polar-vbll predict --workers N``: decisions on Ray Data, each actor holding the model.

The questions (checked on the driver) are cut into the same chunks as the one-process path
(``--batch-size``). A JSONL file is never held by the driver: its chunks travel as where they lie in the file
(``polar_vbll.predict_io.QuestionFile``) and each actor reads its own; other sources travel as the questions.
A Ray Data dataset of chunks goes through ``map_batches`` with an actor pool of
``N`` :class:`ChunkPredictor` actors (``batch_size=1``: one chunk per call), each of which loads the run
once (``polar_vbll.predictor.Predictor``) and refits the driver's decision rule from its calibration data.
A question's record depends only on its chunk, and chunks come back in input order (Ray Data's
``preserve_order``, and a reorder buffer on the driver), so the output file equals the one-process one.

The run folder (and a JSONL input) must be readable at the same path on every node (one machine, or a shared
filesystem).
Nothing secret is put in the runtime environment: only the model-cache locations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from distributed.launch import check_reachable
from polar_vbll.decisions.rule import CalibrationData, DecisionRule, RuleSettings
from polar_vbll.errors import UserInputError
from polar_vbll.extras import require
from polar_vbll.predict_io import Chunk, QuestionFile
from polar_vbll.predictor import Predictor, Question
from polar_vbll.tasks.example import MCExample

#: Environment the actors (and ``polar-vbll serve``'s replicas) need (model and prefix caches, offline hub);
#: never credentials.
ACTOR_ENV_KEYS = ("POLAR_VBLL_CACHE", "POLAR_VBLL_PREFIX_CACHE", "HF_HUB_OFFLINE")


def _question_dict(q: Question) -> dict[str, Any]:
    e = q.example
    return {"uid": e.uid, "question": e.question, "choices": list(e.choices), "answer": e.answer,
            "source": e.source, "context": e.context, "has_answer": q.has_answer, "line": q.line}  # fmt: skip


def _question(d: dict[str, Any]) -> Question:
    has, line = d.pop("has_answer"), d.pop("line")
    return Question(MCExample(**d), has, line)


class ChunkPredictor:
    """A Ray Data actor: the run's predictor and the driver's rule; one chunk of questions per call."""

    def __init__(self, run: str, settings: dict[str, Any], meta: dict[str, Any], tensors: dict[str, Any],
                 device: str = "cpu"):  # fmt: skip
        import numpy as np
        import torch

        rule = DecisionRule.fit(
            CalibrationData(**{k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}),
            RuleSettings(**settings), meta,
        )  # fmt: skip
        # "cuda" is this actor's own GPU: Ray sets CUDA_VISIBLE_DEVICES to the one it reserved for it
        self.predictor = Predictor.from_run(run, need_rule=False, device=device)
        self.predictor.rule = rule

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = []
        for payload in batch["payload"]:
            spec = json.loads(payload)
            if isinstance(spec, dict):  # a chunk of a JSONL file, read here (the driver never holds it)
                questions = QuestionFile(spec["path"], (), 0).read(Chunk(**spec["chunk"]))
            else:
                questions = [_question(d) for d in spec]
            out.append(json.dumps(self.predictor.decide_chunk(questions)))
        return {"index": np.asarray(batch["index"]), "records": np.asarray(out, dtype=object)}


def actor_device(device: str | None, cluster_gpus: float, command: str = "predict --workers") -> str:
    """The device of every prediction actor (or ``serve`` replica): ``cuda`` (one reserved GPU each) for a
    CUDA ``device``, or for ``auto`` / None on a cluster with GPUs; ``cpu`` otherwise. ``cuda:N`` cannot name
    an actor's GPU (Ray picks it) and is refused, as is a CUDA request on a cluster without GPUs
    (``UserInputError``, naming ``command``)."""
    if device is not None and device.startswith("cuda:"):
        raise UserInputError(f"--device {device}: with `{command}` each Ray actor gets one GPU that Ray picks; "
                             "use --device cuda")  # fmt: skip
    if device == "cuda" and cluster_gpus < 1:
        raise UserInputError(f"--device cuda with `{command}`, but the Ray cluster has no GPU; use --device cpu")
    if device == "cpu" or (device in (None, "auto") and cluster_gpus < 1):
        return "cpu"
    return "cuda"


def decide_on_ray(
    run: Path, chunks: Sequence[Sequence[Question]] | QuestionFile, rule: DecisionRule, *, workers: int,
    address: str | None = None, device: str | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Every chunk's decision records, in order, computed by ``workers`` actors on ``address`` (or
    ``RAY_ADDRESS``, or a local Ray started here and stopped at the end); on GPUs (one per actor) where
    :func:`actor_device` says so. A missing Ray, a ``cuda:N`` device and an unreachable address fail here,
    when called, before anything starts (the records come from the iterator)."""
    require("distributed.batch_predict.decide_on_ray")
    actor_device(device, float("inf"))  # the checks that need no cluster: cuda:N is refused now
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        check_reachable(target)
    return _decide(run, chunks, rule, workers, address, device)


def _payload(chunks: Sequence[Sequence[Question]] | QuestionFile, i: int) -> str:
    """Chunk ``i`` as an actor gets it: the questions, or for a JSONL file where the chunk lies in it."""
    if isinstance(chunks, QuestionFile):
        return json.dumps({"path": os.path.abspath(chunks.path), "chunk": asdict(chunks.chunks[i])})
    return json.dumps([_question_dict(q) for q in chunks[i]])


def _decide(
    run: Path, chunks: Sequence[Sequence[Question]] | QuestionFile, rule: DecisionRule, workers: int,
    address: str | None, device: str | None,
) -> Iterator[list[dict[str, Any]]]:
    import ray

    from distributed.launch import ray_session

    env = {k: os.environ[k] for k in ACTOR_ENV_KEYS if k in os.environ}
    tensors = {k: v.numpy() for k, v in rule.calibration.tensors().items()}
    with ray_session(address, num_cpus=max(workers, os.cpu_count() or 1), env=env):
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        where = actor_device(device, ray.cluster_resources().get("GPU", 0.0))
        items = [{"index": i, "payload": _payload(chunks, i)} for i in range(len(chunks))]
        ds = ray.data.from_items(items).map_batches(
            ChunkPredictor,
            fn_constructor_kwargs={"run": str(Path(run).resolve()), "settings": asdict(rule.settings),
                                   "meta": rule.meta, "tensors": tensors, "device": where},  # fmt: skip
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=1 if where == "cuda" else 0,
        )
        pending: dict[int, list[dict[str, Any]]] = {}
        nxt = 0
        for row in ds.iter_rows():
            pending[int(row["index"])] = json.loads(row["records"])
            while nxt in pending:
                yield pending.pop(nxt)
                nxt += 1
        if nxt != len(chunks):
            raise RuntimeError(f"Ray Data returned {nxt} of {len(chunks)} chunks")
