"""Decisions from a trained run: load a run folder into a :class:`Predictor`, calibrate its decision rule on
held-out questions, and turn new questions into decision records (docs/predict.md).

The run folder fixes everything, as for ``polar-vbll eval`` (``polar_vbll.saved``): the backbone, the
prompt settings and answer-token ids (verified against the tokenizer), each member's adapter (hash verified)
and head; a post-hoc head (Laplace) is fitted again on the run's training split exactly as the run did.
The predictive is the run's method's (``polar_vbll.methods.PREDICTIVES``: one pass for VBLL, Laplace and
deterministic heads, dropout passes or members otherwise), with the run's temperature where it has one.
New questions are predicted in chunks of ``batch_size`` in input order; a question's record depends only
on its chunk, so the same input gives the same output in one process or on Ray Data workers
(``distributed.batch_predict``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polar_vbll.decisions.conformal import SCORES
from polar_vbll.decisions.rule import CalibrationData, DecisionRule, Decisions, RuleSettings
from polar_vbll.errors import CheckpointError, DataError, UserInputError
from polar_vbll.evaluation import PredictContext, posthoc_members, prepare_predictive
from polar_vbll.features import FeatureSource, encode_examples
from polar_vbll.locking import FolderLock
from polar_vbll.placement import placement_for
from polar_vbll.predictives import Predictions
from polar_vbll.saved import LoadedRun, RunFolder, check_run_folder, load_run, run_posterior
from polar_vbll.tasks.example import MCExample
from polar_vbll.tasks.inputs import read_items
from polar_vbll.tasks.registry import run_split
from polar_vbll.temperature import apply_temperature

#: Questions predicted together (one chunk; see the module docstring).
DEFAULT_BATCH = 64


@dataclass
class Question:
    """One question to decide on: the example (``answer`` is a placeholder 0 when the row has none), whether
    the row gave an answer, and the row's line number in its file (None from the Python API; ``line_kind``
    ``row`` for a csv:, parquet:, json: or hf: source, whose records then carry ``row``)."""

    example: MCExample
    has_answer: bool = True
    line: int | None = None
    line_kind: str = "line"


#: What the Python API reads questions from (``polar_vbll.tasks.inputs.read_items``): a source name or path,
#: a list of dicts / ``MCExample``s, a pandas DataFrame, a pyarrow Table, a ``datasets.Dataset``.
Questions = Any


def warn_one_class(examples: Sequence[MCExample], source: str) -> None:
    """Warn when every calibration question has the same answer: the rule still holds for questions like
    these (Learn-then-Test and the conformal sets need only exchangeability), but nothing in them tells how
    the model errs on questions with other answers (docs/predict.md)."""
    classes = {e.answer for e in examples}
    if len(examples) > 1 and len(classes) == 1:
        letter = chr(ord("A") + next(iter(classes)))
        warnings.warn(
            f"{source}: all {len(examples)} calibration questions are answered {letter}; the rule is fitted to "
            "one answer class and says nothing of questions with other answers; calibrate on questions "
            "drawn like the ones you will predict",
            stacklevel=3,
        )


def check_width(folder: RunFolder, questions: Sequence[Question], where: str) -> None:
    """Refuse a question with more choices than the run's head reads (``DataError`` naming both widths)."""
    width = folder.readout.num_classes
    for i, q in enumerate(questions):
        k = q.example.num_choices
        if k > width:
            at = f"{where}, {q.line_kind} {q.line}" if q.line is not None else f"question {i} ({q.example.uid!r})"
            raise DataError(
                f"{at}, field 'choices': {k} choices, but the run's head reads {width} answer letters "
                f"({', '.join(folder.readout.answer_letters)}); give at most {width} choices, or train a run "
                f"whose data has {k}-choice questions"
            )


class Predictor:
    """A trained run, ready to predict and decide. Build with :meth:`from_run`."""

    def __init__(self, loaded: LoadedRun, rule: DecisionRule | None, batch_size: int,
                 train: list[MCExample] | None = None):  # fmt: skip
        self.loaded = loaded
        self.folder = loaded.folder
        self.rule = rule
        self.batch_size = batch_size
        cfg = self.folder.cfg
        self._train = train  # the run's training split, read once (a post-hoc head refits on it)
        self._members = None
        # new questions: the frozen-prefix states live in memory only (the disk cache is for the run's data)
        self._source_new = FeatureSource.for_config(loaded.adapter.base_model, loaded.tokenizer.pad_token_id,
                                                    cfg.train)  # fmt: skip
        self._source_new.disk = None

    @classmethod
    def from_run(
        cls, run: str | Path, *, need_rule: bool = True, batch_size: int = DEFAULT_BATCH, device: str | None = None
    ) -> Predictor:
        """Load ``run`` on ``device`` (default: the run's ``model.device``; ``auto``, ``cpu``, ``cuda``,
        ``cuda:N``). With ``need_rule`` the calibrated rule is loaded first (``CheckpointError`` saying how to
        make one when there is none), before the model. Raises ``UserInputError`` for a bad run folder and
        ``ConfigError`` for a device this process does not have, both before the model loads."""
        folder = check_run_folder(run)
        placement_for(folder.cfg.model, device)
        rule = DecisionRule.load(folder.path) if need_rule else None
        train = cls._train_examples(folder)
        return cls(load_run(folder, len(train), device), rule, batch_size, train)

    @staticmethod
    def _train_examples(folder: RunFolder) -> list[MCExample]:
        d = folder.cfg.data
        return run_split(d, d.train_split, d.train_limit)

    # ------------------------------------------------------------------------------------ predictive
    @property
    def num_classes(self) -> int:
        return self.folder.readout.num_classes

    @property
    def letters(self) -> list[str]:
        return self.folder.readout.answer_letters

    def _posthoc(self):
        """The members with the method's post-hoc head fitted on the run's training split, and the
        predictive's post-hoc step (TFB) set from the run's own report (once)."""
        if self._members is None:
            cfg, run = self.folder.cfg, self.loaded
            if self.folder.method.head_kind.posthoc is None:
                self._members = run.members
            else:
                if self._train is None:
                    self._train = self._train_examples(self.folder)
                train = self._encode("train", self._train)
                self._members = posthoc_members(cfg, run.source, run.adapter, run.members, train)
            if self.folder.method.predictive_kind.fit is not None:
                report = run_posterior(self.folder.path)
                if report is None:
                    raise CheckpointError(
                        f"{self.folder.path / 'results.json'} holds no report of {self.folder.method.label}'s "
                        "post-hoc step (metrics.posterior): the run did not finish, or an older polar-vbll wrote it"
                    )
                ctx = PredictContext(cfg, run.source, run.adapter, self._members, cfg.train.eval_batch_size, False)
                prepare_predictive(cfg, ctx, {}, report)
        return self._members

    def _encode(self, name: str, examples: Sequence[MCExample]):
        r = self.folder.readout
        return encode_examples(name, list(examples), self.loaded.tokenizer, r.max_length, r.add_bos)

    def questions(
        self, data: Questions, *, columns: Mapping[str, Any] | None = None, split: str | None = None,
        answers: bool = False, what: str = "question",
    ) -> list[Question]:  # fmt: skip
        """``data`` read and checked as questions (every shape :meth:`predict` takes), each no wider than
        the run's head. ``columns`` maps our fields to the input's columns (default: the run's
        ``data.columns``, where the input has those columns); ``answers``: every row must have one."""
        items = read_items(data, columns=columns, run_columns=self.folder.cfg.data.columns, split=split,
                           answers=answers, what=what)  # fmt: skip
        qs = [Question(it.example, it.has_answer, it.line, it.line_kind) for it in items]
        check_width(self.folder, qs, data if isinstance(data, str) else "the input")
        return qs

    def predictive(
        self, examples: Questions, *, temperature: float | None = None, name: str = "predict",
        cache: bool = False, progress: bool = False, columns: Mapping[str, Any] | None = None,
        split: str | None = None,
    ) -> tuple[Predictions, torch.Tensor]:  # fmt: skip
        """The run's predictive on ``examples`` (any input :meth:`predict` takes): ``Predictions`` (``probs``
        (N, K) with the classes beyond a question's choices 0, ``epistemic`` (N,) in nats, ``labels`` (N,):
        the given answers, 0 where a row has none) and the choice counts (N,), in input order.
        ``temperature`` scales the probabilities (the epistemic score stays the method's own); ``cache``
        keeps the frozen prefix on disk (the run's own splits), else in memory. Raises ``DataError`` /
        ``UserInputError`` as :meth:`predict`."""
        cfg, run = self.folder.cfg, self.loaded
        if isinstance(examples, Sequence) and not isinstance(examples, str) and all(
                isinstance(e, MCExample) for e in examples):  # fmt: skip
            check_width(self.folder, [Question(e) for e in examples], "the input")
        else:
            examples = [q.example for q in self.questions(examples, columns=columns, split=split)]
        enc = self._encode(name, examples)
        source = run.source if cache else self._source_new
        ctx = PredictContext(cfg, source, run.adapter, self._posthoc(), cfg.train.eval_batch_size, progress)
        preds = self.folder.method.predictive_kind.predict(ctx, enc)
        if preds.epistemic is None:
            preds.epistemic = torch.zeros(len(enc))
        if temperature is not None:
            preds = Predictions(preds.split, apply_temperature(preds.probs, temperature), preds.labels,
                                preds.logit_var, preds.epistemic)  # fmt: skip
        return preds, enc.n_choices.clone()

    # ---------------------------------------------------------------------------------- calibration
    def calibrate(
        self, settings: RuleSettings, examples: Questions | None = None, *, source: str | None = None,
        file_sha256: str | None = None, temperature: bool = True, progress: bool = False,
    ) -> DecisionRule:  # fmt: skip
        """Fit, store (``<run>/decision/``) and return the decision rule, on ``examples`` (held-out questions
        with answers, in any shape :meth:`predict` takes: ``MCExample`` rows, dicts as in a JSONL file, a
        DataFrame, a table, a source) or, by default, the run's validation split. ``temperature``: use the
        run's fitted temperature where it has one. Raises ``DataError`` for a bad row, ``UserInputError`` when
        the data cannot calibrate (too few questions for alpha)."""
        with FolderLock(self.folder.path, "polar-vbll calibrate"):  # not while the run (or another) writes it
            return self._calibrate(settings, examples, source, file_sha256, temperature, progress)

    def _calibrate(self, settings, examples, source, file_sha256, temperature, progress) -> DecisionRule:
        cfg = self.folder.cfg
        if examples is not None:
            examples = [q.example for q in self.questions(examples, answers=True, what="calibration question")]
        if examples is None:
            d = cfg.data
            examples = run_split(d, d.val_split, d.val_limit)
            source = source or f"{d.task}:{d.val_split} (the run's validation split)"
        warn_one_class(examples, source or "questions given through the Python API")
        t = self.folder.temperature() if temperature else None
        preds, n_choices = self.predictive(examples, temperature=t, name="calibration", cache=True, progress=progress)
        data = CalibrationData(preds.probs, preds.labels, n_choices, preds.epistemic)
        enc_fp = hashlib.sha256(
            repr([(e.uid, e.question, e.choices, e.answer, e.context) for e in examples]).encode()
        ).hexdigest()[:16]
        meta = {"source": source or "questions given through the Python API", "examples_sha256": enc_fp,
                "file_sha256": file_sha256, "temperature": t, "method": cfg.method,
                "label": self.folder.method.label}  # fmt: skip
        try:
            rule = DecisionRule.fit(data, settings, meta)
        except ValueError as exc:
            raise UserInputError(f"cannot calibrate on {meta['source']}: {exc}") from None
        rule.save(self.folder.path)
        self.rule = rule
        return rule

    # ------------------------------------------------------------------------------------- decisions
    def _require_rule(self) -> DecisionRule:
        if self.rule is None:
            self.rule = DecisionRule.load(self.folder.path)
        return self.rule

    def decide(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        """The decision record of every question (docs/predict.md), in order, in chunks of ``batch_size``."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(questions), self.batch_size):
            out.extend(self.decide_chunk(questions[start : start + self.batch_size]))
        return out

    def decide_chunk(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        """The records of one chunk (predicted together)."""
        if not questions:
            return []
        rule = self._require_rule()
        preds, n_choices = self.predictive([q.example for q in questions], temperature=rule.meta.get("temperature"))
        d = rule.decide(preds.probs, preds.epistemic, n_choices)
        return [record(q, i, preds.probs[i], d, rule, self.letters) for i, q in enumerate(questions)]

    def predict(
        self, examples: Questions, *, columns: Mapping[str, Any] | None = None, split: str | None = None
    ) -> list[dict[str, Any]]:
        """The Python API: one decision record per question (docs/predict.md), in input order.

        ``examples``, N questions, as any of:

        - a list (any sequence) of ``MCExample`` rows and dicts: ``question`` (str), ``choices`` (2 to the
          run's number of answer letters, strings), optional ``answer`` (an index, an integral float such as
          ``1.0``, a letter ``"A"``.., or a choice's text; ``None`` / NaN: no answer), ``context``, ``id``;
        - a pandas ``DataFrame``, a pyarrow ``Table`` or a ``datasets.Dataset``: one row per question; choices
          from one list column or several columns;
        - a source: a JSONL path (``jsonl:`` optional), ``csv:``, ``parquet:``, ``json:<file>``,
          ``hf:<folder | org/name>[:config]`` (``split`` picks one of several splits).

        ``columns`` maps our fields to the input's columns (``{"question": "text", "choices": ["a", "b"],
        "answer": "label"}``; every named column must exist); by default the run's ``data.columns`` applies
        where the input has those columns, and a field is otherwise read from the column of its own name.
        Dicts read with no mapping are JSONL rows (an unknown key is refused). Rows with an answer get
        ``label`` and ``correct``. Raises ``DataError`` naming the question (list position, frame index, or
        source row) and the field or column, ``UserInputError`` for an input of no known shape or with no
        questions; nothing is predicted before every row is checked."""
        return self.decide(self.questions(examples, columns=columns, split=split))


def record(q: Question, i: int, probs: torch.Tensor, d: Decisions, rule: DecisionRule, letters: list[str]) -> dict:
    """One question's decision record (docs/predict.md has every field and unit)."""
    k = q.example.num_choices
    answer = int(d.answer[i])
    decision = "escalate" if d.ood[i] else ("abstain" if d.abstain[i] else "answer")
    out: dict[str, Any] = {
        "id": q.example.uid,
        **({q.line_kind: q.line} if q.line is not None else {}),
        "decision": decision,
        "answer": letters[answer],
        "answer_index": answer,
        "confidence": float(d.confidence[i]),
        "probs": [float(p) for p in probs[:k]],
        "abstain": bool(d.abstain[i]),
        "ood": bool(d.ood[i]),
        "entropy": float(d.entropy[i]),
        "epistemic": float(d.epistemic[i]),
        "ood_scores": {"msp": float(d.msp[i]), "epistemic": float(d.epistemic[i])},
        **{f"set_{s}": [letters[j] for j in range(k) if d.sets[s][i, j]] if s in d.sets else None for s in SCORES},
    }
    if q.has_answer:
        y = q.example.answer
        out["label"] = letters[y]
        out["correct"] = answer == y
    return out


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The closing summary of a prediction: how many answered / abstained / escalated, the mean set sizes,
    and on rows with an answer: accuracy and ECE of every row, the risk of the answered (fractions) and the
    empirical coverage of the sets (:class:`SummaryAccumulator` over one batch)."""
    acc = SummaryAccumulator()
    acc.update(records)
    return acc.result()


class SummaryAccumulator:
    """:func:`summary` over records that arrive chunk by chunk (``update``), without keeping them: counts,
    and for accuracy and ECE the four numbers per answered row that ``polar_vbll.metrics`` keeps."""

    def __init__(self) -> None:
        from polar_vbll.metrics import CalibrationAccumulator

        self.n = self.labelled = self.answered = self.answered_correct = 0
        self.counts = {name: 0 for name in ("answer", "abstain", "escalate")}
        self.has: dict[str, bool] | None = None  # whether the records carry each kind of set (the first's)
        self.set_sizes = {s: 0 for s in SCORES}
        self.covered = {s: 0 for s in SCORES}
        self.calibration = CalibrationAccumulator()

    def update(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        if self.has is None:
            self.has = {s: records[0][f"set_{s}"] is not None for s in SCORES}
        self.n += len(records)
        for name in self.counts:
            self.counts[name] += sum(r["decision"] == name for r in records)
        labelled = [r for r in records if "label" in r]
        for s in SCORES:
            if self.has[s]:
                self.set_sizes[s] += sum(len(r[f"set_{s}"]) for r in records)
                self.covered[s] += sum(r["label"] in r[f"set_{s}"] for r in labelled)
        if labelled:
            width = max(len(r["probs"]) for r in labelled)
            probs = torch.tensor([r["probs"] + [0.0] * (width - len(r["probs"])) for r in labelled],
                                 dtype=torch.float64)  # fmt: skip
            labels = torch.tensor([ord(r["label"]) - ord("A") for r in labelled])
            self.calibration.update(probs / probs.sum(1, keepdim=True), labels)
            self.labelled += len(labelled)
            answered = [r for r in labelled if r["decision"] == "answer"]
            self.answered += len(answered)
            self.answered_correct += sum(bool(r["correct"]) for r in answered)

    def result(self) -> dict[str, Any]:
        has = self.has or {s: False for s in SCORES}
        out: dict[str, Any] = {"questions": self.n, **self.counts}
        for s in SCORES:
            out[f"mean_set_size_{s}"] = self.set_sizes[s] / self.n if has[s] else None
        out["with_answer"] = self.labelled
        if self.labelled:
            m = self.calibration.compute()
            out["accuracy"], out["ece"] = m["acc"], m["ece"]
            out["answered_with_answer"] = self.answered
            out["risk_of_answered"] = (1 - self.answered_correct / self.answered) if self.answered else None
            for s in SCORES:
                out[f"coverage_{s}"] = self.covered[s] / self.labelled if has[s] else None
        return out
