"""Calibration and OOD metrics for K-way multiple choice, computed one way everywhere.

Published ECE numbers are often not comparable: some are fractions and some percent, some use 10 bins
and some 15, some average per-batch values. This module fixes one definition (see method.md section 4)
and makes the unit explicit:

* every value returned by :meth:`CalibrationAccumulator.compute` is a **fraction** (``acc``, ``ece``)
  or a plain number (``nll``, ``brier``, ``n``); :func:`as_percent` / :func:`format_metrics` render
  ACC and ECE in percent with the unit in the name ("ACC (%)", "ECE (%)");
* metrics are computed over **all** examples seen, never as a mean of batch means (ECE is not additive:
  over-confidence in one batch and under-confidence in another cancel within a bin);
* ECE is top-label, L1, ``n_bins`` (default 15) equal-width bins over [0, 1], each bin weighted by its
  count / N. Bins are right-closed ``(lo, hi]`` (Guo et al., 2017): confidence ``c`` goes to bin
  ``ceil(c * n_bins) - 1`` clipped to ``[0, n_bins - 1]``, so ``c == 1.0`` is in the last bin and
  ``c == 0`` in the first.

Differences from ``torchmetrics.MulticlassCalibrationError`` (checked against torchmetrics 1.9): on
data with no confidence exactly on a bin edge both give the same ECE (up to float32 rounding, since
torchmetrics casts confidences to float32). torchmetrics bins are left-closed ``[lo, hi)``, so a
confidence exactly equal to ``k / n_bins`` lands one bin higher than here, and a confidence of exactly
1.0 lands in a hidden extra bin ``[1, 1]`` of its own (torchmetrics issue #3510) instead of the last
bin. A confidence of exactly 1.0 is common: a float32 softmax saturates for logit gaps above ~17.

Probabilities are validated and converted to float64 on the CPU; padded classes (questions with fewer
than K choices) must carry probability exactly 0 and then change no metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NLL_PROB_FLOOR",
    "CalibrationAccumulator",
    "ReliabilityBins",
    "as_percent",
    "confidence_bin_index",
    "format_metrics",
    "ood_auroc",
    "ood_scores",
    "summarize",
]

NLL_PROB_FLOOR = 1e-12
"""p[label] is clamped at this floor before the log so one p == 0 gives NLL ~27.6, not inf."""

DEFAULT_SUM_ATOL = 1e-4
"""Rows must sum to 1 within this tolerance (float32 softmax is ~1e-7 off; bf16 can be ~1e-2 off)."""


def _as_float64(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def _validate_probs(probs: Tensor, sum_atol: float = DEFAULT_SUM_ATOL) -> Tensor:
    """Return probs as a float64 CPU (B, K) tensor or raise ValueError saying what is wrong."""
    p = _as_float64(probs, "probs")
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (B, K), got shape {tuple(p.shape)}")
    if p.shape[1] < 1:
        raise ValueError("probs must have at least one class column (K >= 1)")
    if p.numel() == 0:
        return p
    if not torch.isfinite(p).all():
        bad = int((~torch.isfinite(p)).any(dim=1).nonzero()[0])
        raise ValueError(f"probs must be finite; row {bad} is {p[bad].tolist()}")
    if (p < 0).any():
        bad = int((p < 0).any(dim=1).nonzero()[0])
        raise ValueError(f"probs must be non-negative; row {bad} is {p[bad].tolist()}")
    dev = (p.sum(dim=1) - 1.0).abs()
    if (dev > sum_atol).any():
        bad = int(dev.argmax())
        raise ValueError(
            f"each row of probs must sum to 1 (tolerance {sum_atol:g}); row {bad} sums to "
            f"{float(p[bad].sum()):.6g}. Pass probabilities (softmax), not logits."
        )
    return p


def _validate_labels(labels: Tensor, batch: int, num_classes: int) -> Tensor:
    y = torch.as_tensor(labels)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got shape {tuple(y.shape)}")
    if y.shape[0] != batch:
        raise ValueError(f"labels has {y.shape[0]} entries but probs has {batch} rows")
    y = y.detach().to(device="cpu", dtype=torch.long)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (K = {num_classes} columns in probs); "
            f"got min {int(y.min())}, max {int(y.max())}"
        )
    return y


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _bin_edges(n_bins: int) -> Tensor:
    """Edges k / n_bins, each the correctly rounded float64 (so ``k / 15`` in Python hits an edge)."""
    return torch.arange(n_bins + 1, dtype=torch.float64) / n_bins


def confidence_bin_index(confidences: Tensor, n_bins: int = 15) -> Tensor:
    """Bin of each confidence for right-closed bins ``(lo, hi]``: ``ceil(c * n_bins) - 1`` clipped.

    Implemented as "how many interior edges lie strictly below c" rather than with ``ceil(c * n)``,
    whose float product can land just above an integer and push an edge value into the next bin.
    """
    _check_n_bins(n_bins)
    c = torch.as_tensor(confidences).detach().to(device="cpu", dtype=torch.float64)
    inner = _bin_edges(n_bins)[1:-1]
    # right=False: index i such that inner[i-1] < c <= inner[i], i.e. the count of edges < c.
    return torch.bucketize(c, inner, right=False)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics for a reliability diagram; empty bins have NaN mean_conf / acc.

    ``edges`` has n_bins + 1 entries; ``counts``, ``mean_conf`` and ``acc`` have n_bins. ``ece`` and
    ``accuracy`` are fractions over all ``n`` examples.
    """

    edges: Tensor
    counts: Tensor
    mean_conf: Tensor
    acc: Tensor
    n: int

    @property
    def n_bins(self) -> int:
        return int(self.counts.numel())

    @property
    def ece(self) -> float:
        """Top-label L1 ECE (fraction): sum over non-empty bins of count/N * |acc - mean conf|."""
        nonempty = self.counts > 0
        gaps = (self.acc[nonempty] - self.mean_conf[nonempty]).abs()
        return float((self.counts[nonempty] / self.n * gaps).sum())

    @property
    def accuracy(self) -> float:
        nonempty = self.counts > 0
        return float((self.counts[nonempty] * self.acc[nonempty]).sum() / self.n)


class CalibrationAccumulator:
    """Accumulates ACC, ECE, NLL and Brier over a whole evaluation set, batch by batch.

    Stores four float64 numbers per example (confidence, correctness, NLL term, Brier term), so the
    number of classes may differ between batches and memory stays small (datasets here are <= ~10k
    rows). ``compute()`` always works on all examples seen.
    """

    def __init__(self, n_bins: int = 15, sum_atol: float = DEFAULT_SUM_ATOL) -> None:
        _check_n_bins(n_bins)
        self.n_bins = n_bins
        self.sum_atol = sum_atol
        self.reset()

    def reset(self) -> None:
        self._conf: list[Tensor] = []
        self._correct: list[Tensor] = []
        self._nll: list[Tensor] = []
        self._brier: list[Tensor] = []

    @property
    def n(self) -> int:
        """Number of examples seen."""
        return sum(int(t.numel()) for t in self._conf)

    def __len__(self) -> int:
        return self.n

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch of predictive probabilities (B, K) and integer labels (B,)."""
        p = _validate_probs(probs, self.sum_atol)
        y = _validate_labels(labels, p.shape[0], p.shape[1])
        if p.shape[0] == 0:
            return
        # argmax returns the first maximal index on ties; padded classes (p == 0) never win since
        # a row summing to 1 has max >= 1/K > 0.
        conf = p.max(dim=1).values
        pred = p.argmax(dim=1)
        p_true = p.gather(1, y[:, None]).squeeze(1)
        onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
        self._conf.append(conf)
        self._correct.append((pred == y).to(torch.float64))
        self._nll.append(-torch.log(p_true.clamp_min(NLL_PROB_FLOOR)))
        self._brier.append(((p - onehot) ** 2).sum(dim=1))

    def merge(self, other: CalibrationAccumulator) -> None:
        """Add all examples of another accumulator (e.g. one per data shard or rank)."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge accumulators with n_bins {self.n_bins} and {other.n_bins}")
        self._conf += other._conf
        self._correct += other._correct
        self._nll += other._nll
        self._brier += other._brier

    def _require_data(self) -> None:
        if self.n == 0:
            raise ValueError("no examples accumulated; call update() with at least one row first")

    def reliability_bins(self) -> ReliabilityBins:
        """Per-bin count, mean confidence and accuracy over all examples (for ECE and plots)."""
        self._require_data()
        conf = torch.cat(self._conf)
        correct = torch.cat(self._correct)
        idx = confidence_bin_index(conf, self.n_bins)
        counts = torch.zeros(self.n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
        conf_sum = torch.zeros(self.n_bins, dtype=torch.float64).index_add_(0, idx, conf)
        acc_sum = torch.zeros(self.n_bins, dtype=torch.float64).index_add_(0, idx, correct)
        nan = torch.full_like(counts, math.nan)
        nonempty = counts > 0
        mean_conf = torch.where(nonempty, conf_sum / counts.clamp_min(1), nan)
        acc = torch.where(nonempty, acc_sum / counts.clamp_min(1), nan)
        return ReliabilityBins(
            edges=_bin_edges(self.n_bins), counts=counts, mean_conf=mean_conf, acc=acc, n=int(conf.numel())
        )

    def compute(self) -> dict[str, float]:
        """Metrics over all examples, as fractions: ``acc``, ``ece``, ``nll``, ``brier`` and ``n``.

        ``nll`` is the mean of -log p[label] with p clamped at ``NLL_PROB_FLOOR``; ``brier`` is the
        multi-class Brier score, mean over examples of sum_k (p_k - onehot_k)^2 (range [0, 2]).
        """
        bins = self.reliability_bins()
        return {
            "acc": float(torch.cat(self._correct).mean()),
            "ece": bins.ece,
            "nll": float(torch.cat(self._nll).mean()),
            "brier": float(torch.cat(self._brier).mean()),
            "n": float(bins.n),
        }


def summarize(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """One-shot :meth:`CalibrationAccumulator.compute` for probabilities already in memory."""
    acc = CalibrationAccumulator(n_bins=n_bins)
    acc.update(probs, labels)
    return acc.compute()


_DISPLAY = {"acc": "ACC (%)", "ece": "ECE (%)", "nll": "NLL", "brier": "Brier", "n": "N"}
_PERCENT_KEYS = {"acc", "ece"}


def as_percent(metrics: Mapping[str, float]) -> dict[str, float]:
    """Rename for reports: ACC and ECE x100 under "ACC (%)" / "ECE (%)"; NLL, Brier, N unchanged.

    Unknown keys pass through unchanged, so the unit is never ambiguous in a table.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = _DISPLAY.get(key, key)
        out[name] = 100.0 * float(value) if key in _PERCENT_KEYS else value
    return out


def format_metrics(metrics: Mapping[str, float]) -> str:
    """One line for logs, e.g. ``ACC (%) 81.20 | ECE (%) 4.31 | NLL 0.5123 | Brier 0.2710 | N 500``."""
    parts = []
    for name, value in as_percent(metrics).items():
        if name == "N":
            parts.append(f"N {int(value)}")
        elif name.endswith("(%)"):
            parts.append(f"{name} {value:.2f}")
        else:
            parts.append(f"{name} {value:.4f}")
    return " | ".join(parts)


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table, one row per method, ACC and ECE in percent with the unit in the header."""
    header = ["Method", "ACC (%)", "ECE (%)", "NLL", "Brier", "N"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        m = as_percent(metrics)
        cells = [name, f"{m['ACC (%)']:.2f}", f"{m['ECE (%)']:.2f}", f"{m['NLL']:.4f}", f"{m['Brier']:.4f}"]
        cells.append(str(int(m["N"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- OOD detection


def ood_scores(probs: Tensor, logit_var: Tensor | None = None) -> dict[str, Tensor]:
    """Per-example uncertainty scores, higher = more likely out-of-distribution (float64, shape (B,)).

    ``msp``: 1 - max probability. ``entropy``: predictive entropy in nats (0 log 0 = 0, so padded
    classes add nothing). ``logit_var`` (only if given): total logit variance; accepts (B,) totals,
    (B, K) per-class variances (summed; padded classes must carry 0) or (B, K, K) covariances (trace).
    """
    p = _validate_probs(probs)
    scores = {
        "msp": 1.0 - p.max(dim=1).values,
        "entropy": -torch.xlogy(p, p).sum(dim=1),
    }
    if logit_var is not None:
        v = _as_float64(logit_var, "logit_var")
        if v.shape[:1] != p.shape[:1] or v.ndim not in (1, 2, 3):
            raise ValueError(
                f"logit_var must have shape (B,), (B, K) or (B, K, K) with B = {p.shape[0]}, "
                f"got {tuple(v.shape)}"
            )
        if v.ndim == 3:
            if v.shape[1] != v.shape[2]:
                raise ValueError(f"logit_var covariance must be square, got {tuple(v.shape)}")
            v = torch.diagonal(v, dim1=1, dim2=2)
        total = v.sum(dim=1) if v.ndim == 2 else v
        if not torch.isfinite(total).all() or (total < 0).any():
            raise ValueError("logit_var must be finite and non-negative")
        scores["logit_var"] = total
    return scores


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """AUROC of separating OOD (positive) from in-distribution by score, higher score = OOD.

    Mann-Whitney: P(s_out > s_in) + 1/2 P(s_out == s_in), from mid-ranks of the pooled scores, so
    ties count 1/2 and the result does not depend on the order of the inputs. 0.5 = chance.
    """
    s_in = torch.as_tensor(scores_in).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    s_out = torch.as_tensor(scores_out).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if s_in.numel() == 0 or s_out.numel() == 0:
        raise ValueError(
            f"ood_auroc needs at least one score on each side; got {s_in.numel()} in-distribution "
            f"and {s_out.numel()} OOD"
        )
    pooled = torch.cat([s_in, s_out])
    if torch.isnan(pooled).any():
        raise ValueError("ood_auroc scores must not contain NaN")
    _, inverse, counts = torch.unique(pooled, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    last_rank = counts.cumsum(0)  # 1-based rank of the last member of each tie group
    mid_rank = last_rank - (counts - 1.0) / 2.0
    ranks = mid_rank[inverse]
    n_in, n_out = s_in.numel(), s_out.numel()
    rank_sum_out = ranks[n_in:].sum()
    u_out = rank_sum_out - n_out * (n_out + 1) / 2.0
    return float(u_out / (n_in * n_out))
