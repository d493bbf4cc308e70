"""The decision rule: what a pipeline does with one question's predictive, calibrated on held-out data.

Per question (probabilities ``p`` over its choices, the head's epistemic score):

1. **answer or abstain**: answer ``argmax p`` when the confidence ``max p`` is at least ``tau``, the
   Learn-then-Test threshold for the target selective risk (``polar_vbll.decisions.selective``), or the
   threshold reaching a target coverage; else abstain;
2. **answer sets**: split-conformal sets at miscoverage ``alpha``, with the LAC and the APS scores
   (``polar_vbll.decisions.conformal``);
3. **OOD flag**: the question is flagged (escalate: it is unlike the data the rule was calibrated on) when
   its OOD score exceeds the conformal ``ood_pass`` quantile of the calibration questions' scores, so a new
   in-distribution question passes with probability at least ``ood_pass``. The score is the head's
   epistemic part (mutual information, nats) when the method has one (VBLL, Laplace, ensembles, MC
   dropout), else ``1 - max p`` (a deterministic head: no epistemic part to rank by).

The rule is data plus settings: :class:`DecisionRule` keeps the calibration questions' predictive
(``calibration.safetensors``: probabilities, labels, choice counts, epistemic scores) and re-derives the
thresholds from them when loaded, checking them against the values recorded in ``rule.json``, so a
prediction is reproducible and a rule file edited by hand is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from polar_vbll.decisions.conformal import SCORES, ConformalSets, UnsupportedScore
from polar_vbll.decisions.selective import (
    Threshold,
    confidence_and_correct,
    coverage_threshold,
    risk_threshold,
    threshold_grid,
)
from polar_vbll.errors import CheckpointError

RULE_VERSION = 1
RULE_DIR = "decision"


@dataclass
class RuleSettings:
    """What to calibrate for: ``risk`` (target selective risk) or ``coverage`` (target fraction answered;
    exactly one of the two), ``delta`` (the risk guarantee holds with probability ``1 - delta``), ``fwer``
    (Learn-then-Test's family-wise error control), ``alpha`` (conformal miscoverage), ``ood_pass`` (the
    fraction of in-distribution questions the OOD flag passes), ``thresholds`` (how many confidence
    thresholds Learn-then-Test tests, equally spaced on ``[1/K, 1)``), ``seed`` (APS's randomised calibration
    scores). Raises ``ValueError`` for a value outside its range."""

    risk: float | None = None  # 0.1 unless a coverage is given
    coverage: float | None = None
    delta: float = 0.1
    fwer: str = "bonferroni_holm"
    alpha: float = 0.1
    ood_pass: float = 0.95
    thresholds: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.risk is None and self.coverage is None:
            self.risk = 0.1
        if self.risk is not None and self.coverage is not None:
            raise ValueError("give exactly one of a target risk and a target coverage")
        for name in ("risk", "delta", "alpha", "ood_pass"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        if self.thresholds < 1:
            raise ValueError(f"thresholds must be at least 1, got {self.thresholds}")
        if self.coverage is not None and not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must lie in (0, 1], got {self.coverage}")


@dataclass
class CalibrationData:
    """Held-out questions' predictive: ``probs`` (N, K), ``labels`` (N,), ``n_choices`` (N,) and the
    epistemic score (N,) in nats (zeros for a deterministic head)."""

    probs: torch.Tensor
    labels: torch.Tensor
    n_choices: torch.Tensor
    epistemic: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "probs": self.probs.detach().cpu().to(torch.float32).contiguous(),
            "labels": self.labels.detach().cpu().to(torch.int64).contiguous(),
            "n_choices": self.n_choices.detach().cpu().to(torch.int64).contiguous(),
            "epistemic": self.epistemic.detach().cpu().to(torch.float32).contiguous(),
        }

    def digest(self) -> str:
        """sha256 (16 hex digits) of the stored tensors: what the rule was calibrated on."""
        h = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def ood_score_name(epistemic: torch.Tensor) -> str:
    """``epistemic`` when the method has an epistemic part (any nonzero score), else ``msp``."""
    return "epistemic" if bool(torch.as_tensor(epistemic).ne(0).any()) else "msp"


def ood_scores(probs: torch.Tensor, epistemic: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-question OOD scores (float64, higher = less like the calibration data): ``msp`` = ``1 - max p``
    and ``epistemic`` (nats)."""
    p = torch.as_tensor(probs).detach().cpu().to(torch.float64)
    return {"msp": (1.0 - p.max(dim=1).values).numpy(),
            "epistemic": torch.as_tensor(epistemic).detach().cpu().to(torch.float64).numpy()}  # fmt: skip


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) level)``-th smallest score (``inf`` when that exceeds ``n``): a new exchangeable
    score is at most it with probability at least ``level``."""
    k = math.ceil((scores.size + 1) * level)
    return float("inf") if k > scores.size else float(np.sort(scores)[k - 1])


@dataclass
class Decisions:
    """The decision fields of N questions (arrays; see docs/predict.md): ``answer`` index (N,),
    ``confidence`` = max p, ``entropy`` of the predictive and its ``epistemic`` part (nats), the OOD
    scores ``msp`` and ``epistemic`` (``ood_score`` names the one flagged on), ``abstain`` and ``ood``
    flags, and the answer ``sets`` per conformity score ((N, K) bool; only the scores the rule has)."""

    answer: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    epistemic: np.ndarray
    msp: np.ndarray
    abstain: np.ndarray
    ood: np.ndarray
    sets: dict[str, np.ndarray]


@dataclass
class DecisionRule:
    """A calibrated rule (see the module docstring). ``meta`` records what it was calibrated on
    (``source``, ``fingerprint``, ``file_sha256``), the run's method and the temperature applied
    (None: the run's own predictive)."""

    settings: RuleSettings
    threshold: Threshold
    sets: dict[str, ConformalSets]
    ood_score: str
    ood_threshold: float
    calibration: CalibrationData
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, data: CalibrationData, settings: RuleSettings, meta: dict[str, Any] | None = None) -> DecisionRule:
        conf, correct = confidence_and_correct(data.probs, data.labels)
        if settings.risk is not None:
            grid = threshold_grid(data.probs.shape[1], settings.thresholds)
            thr = risk_threshold(conf, correct, settings.risk, settings.delta, settings.fwer, grid)  # type: ignore[arg-type]
        else:
            thr = coverage_threshold(conf, correct, settings.coverage)  # type: ignore[arg-type]
        sets = {}
        for s in SCORES:
            try:
                sets[s] = ConformalSets.calibrate(data.probs, data.labels, settings.alpha, s, settings.seed)
            except UnsupportedScore:  # APS on two-choice questions: LAC only (see polar_vbll.decisions.conformal)
                continue
        name = ood_score_name(data.epistemic)
        q = conformal_quantile(ood_scores(data.probs, data.epistemic)[name], settings.ood_pass)
        return cls(settings, thr, sets, name, q, data, dict(meta or {}))

    def with_settings(self, **changes: Any) -> DecisionRule:
        """The same calibration data refitted with other settings (``risk``, ``coverage``, ``delta``,
        ``alpha``, ``ood_pass``): no model pass needed. Giving ``coverage`` drops the risk target and vice
        versa."""
        base = asdict(self.settings)
        if changes.get("coverage") is not None:
            base["risk"] = None
        if changes.get("risk") is not None:
            base["coverage"] = None
        base.update({k: v for k, v in changes.items() if v is not None})
        return DecisionRule.fit(self.calibration, RuleSettings(**base), self.meta)

    def describe(self) -> list[str]:
        """What the rule does, in a few lines, with a warning line first when it answers nothing or its OOD
        flag is off."""
        s, t = self.settings, self.threshold
        target = (f"selective risk <= {s.risk:g} with probability {1 - s.delta:g}" if s.risk is not None
                  else f"{100 * s.coverage:g}% answered")  # fmt: skip
        lines = []
        if t.tau is None:
            lines.append(f"warning: the rule abstains on every question: no confidence threshold met its target "
                         f"({target}) on its {t.n} calibration questions; recalibrate with a looser --risk, a "
                         "larger --delta or more questions, or pass --risk/--coverage to predict")  # fmt: skip
        else:
            lines.append(f"rule: answer when confidence >= {t.tau:.3f} ({target}; calibrated on {t.n} questions)")
        if not math.isfinite(self.ood_threshold):
            lines.append(f"OOD flag off: a {100 * s.ood_pass:g}% pass rate needs at least "
                         f"{math.ceil(s.ood_pass / (1 - s.ood_pass) - 1e-9)} calibration questions")  # fmt: skip
        return lines

    def decide(self, probs: torch.Tensor, epistemic: torch.Tensor, n_choices: torch.Tensor) -> Decisions:
        """The decisions of N new questions: ``probs`` (N, K) (K may be narrower than the calibration
        width: padded with zeros), ``epistemic`` (N,), ``n_choices`` (N,)."""
        p = torch.as_tensor(probs).detach().cpu().to(torch.float64)
        width = self.calibration.probs.shape[1]
        if p.shape[1] < width:
            p = torch.nn.functional.pad(p, (0, width - p.shape[1]))
        scores = ood_scores(p, epistemic)
        conf = p.max(dim=1).values.numpy()
        tau = self.threshold.tau
        return Decisions(
            answer=p.argmax(dim=1).numpy(),
            confidence=conf,
            entropy=(-torch.xlogy(p, p).sum(dim=1)).numpy(),
            epistemic=scores["epistemic"],
            msp=scores["msp"],
            abstain=np.ones_like(conf, dtype=bool) if tau is None else conf < tau,
            ood=scores[self.ood_score] > self.ood_threshold,
            sets={s: c.predict_sets(p, n_choices) for s, c in self.sets.items()},
        )

    # ----------------------------------------------------------------------------------------- files
    def summary(self) -> dict[str, Any]:
        """``rule.json``'s content."""
        return {
            "version": RULE_VERSION,
            "settings": asdict(self.settings),
            "threshold": asdict(self.threshold),
            "conformal": {s: {"alpha": c.alpha, "quantile": c.quantile, "n": c.n} for s, c in self.sets.items()},
            # null when the flag is off (too few calibration questions for the pass rate): strict JSON
            "ood": {"score": self.ood_score, "threshold": self.ood_threshold if math.isfinite(self.ood_threshold)
                    else None, "pass": self.settings.ood_pass},  # fmt: skip
            "calibration": {"n": int(self.calibration.labels.numel()), "digest": self.calibration.digest(),
                            **self.meta},  # fmt: skip
        }

    def save(self, run: str | Path) -> Path:
        """Write ``<run>/decision/rule.json`` and ``calibration.safetensors`` (replacing an older rule only
        once both are complete). Returns the folder."""
        folder = Path(run) / RULE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp_t, tmp_j = folder / ".calibration.safetensors.tmp", folder / ".rule.json.tmp"
        save_file(self.calibration.tensors(), str(tmp_t))
        tmp_j.write_text(json.dumps({**self.summary(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        tmp_t.replace(folder / "calibration.safetensors")
        tmp_j.replace(folder / "rule.json")
        return folder

    @classmethod
    def load(cls, run: str | Path) -> DecisionRule:
        """The rule stored in ``run``; raises ``CheckpointError`` when there is none (saying how to make one),
        or when it is unreadable or its recorded thresholds differ from those its data give."""
        folder = Path(run) / RULE_DIR
        if not (folder / "rule.json").is_file():
            raise CheckpointError(
                f"{run} has no calibrated decision rule ({folder / 'rule.json'} is missing); make one with "
                f"`polar-vbll calibrate {run}` (on the run's validation split, or --data FILE of held-out "
                "questions with answers)"
            )
        try:
            saved = json.loads((folder / "rule.json").read_text())
            tensors = load_file(str(folder / "calibration.safetensors"))
            data = CalibrationData(tensors["probs"], tensors["labels"], tensors["n_choices"], tensors["epistemic"])
            settings = RuleSettings(**saved["settings"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder} holds an unreadable decision rule ({exc}); rerun `polar-vbll "
                                  f"calibrate {run}`") from None  # fmt: skip
        if saved.get("version") != RULE_VERSION:
            raise CheckpointError(f"{folder / 'rule.json'} is of version {saved.get('version')}, this polar-vbll "
                                  f"reads {RULE_VERSION}; rerun `polar-vbll calibrate {run}`")  # fmt: skip
        meta = {k: v for k, v in saved["calibration"].items() if k not in ("n", "digest")}
        rule = cls.fit(data, settings, meta)
        again = rule.summary()
        if json.dumps(again, sort_keys=True) != json.dumps({k: saved[k] for k in again}, sort_keys=True):
            raise CheckpointError(
                f"{folder} does not reproduce: the thresholds recorded in rule.json differ from those its "
                f"calibration data give (an edited file, or another MAPIE version); rerun `polar-vbll calibrate {run}`"
            )
        return rule
