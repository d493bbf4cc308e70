"""Reliability diagrams saved as PNG files (for reports and MLflow artifacts).

matplotlib is imported inside the functions, and figures are drawn on an explicit Agg canvas without
pyplot: ``import polar_vbll`` stays light, no GUI backend is ever selected, and plotting from a worker
thread or a headless node is safe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polar_vbll.metrics import CalibrationAccumulator, ReliabilityBins

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["reliability_diagram", "reliability_diagrams", "risk_coverage_plot"]

BinsLike = ReliabilityBins | CalibrationAccumulator


def _to_bins(obj: BinsLike) -> ReliabilityBins:
    if isinstance(obj, ReliabilityBins):
        return obj
    if isinstance(obj, CalibrationAccumulator):
        return obj.reliability_bins()
    raise TypeError(f"expected ReliabilityBins or CalibrationAccumulator, got {type(obj).__name__}")


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw(ax_rel: Axes, ax_hist: Axes, bins: ReliabilityBins, label: str | None) -> None:
    """Accuracy bars per bin, the gap to the mean confidence, the diagonal, and the count histogram."""
    edges = bins.edges.numpy()
    lo, width = edges[:-1], edges[1:] - edges[:-1]
    counts = bins.counts.numpy()
    nonempty = counts > 0
    acc = bins.acc.numpy()
    conf = bins.mean_conf.numpy()
    ece_pct = 100.0 * bins.ece

    ax_rel.bar(
        lo[nonempty],
        acc[nonempty],
        width=width[nonempty],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.6,
        label="Accuracy",
    )
    gap_bottom = [min(a, c) for a, c in zip(acc[nonempty], conf[nonempty], strict=True)]
    gap_height = abs(acc[nonempty] - conf[nonempty])
    ax_rel.bar(
        lo[nonempty],
        gap_height,
        bottom=gap_bottom,
        width=width[nonempty],
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.6,
        label="Gap to mean confidence",
    )
    ax_rel.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.0, label="Perfect calibration")
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1)
    ax_rel.set_ylabel("Accuracy")
    ax_rel.set_title(f"{label}\nECE {ece_pct:.2f} %" if label else f"ECE {ece_pct:.2f} %", fontsize=10)
    ax_rel.legend(
        loc="upper left",
        fontsize=8,
        title=f"ECE = {ece_pct:.2f} % ({bins.n_bins} bins, N = {bins.n})",
        title_fontsize=8,
    )

    ax_hist.bar(
        lo,
        counts / max(bins.n, 1),
        width=width,
        align="edge",
        color="tab:gray",
        edgecolor="black",
        linewidth=0.6,
    )
    ax_hist.axvline(bins.accuracy, color="tab:blue", linestyle="-", linewidth=1.2, label="Accuracy")
    mean_conf_all = float((bins.counts[bins.counts > 0] * bins.mean_conf[bins.counts > 0]).sum() / bins.n)
    ax_hist.axvline(mean_conf_all, color="tab:red", linestyle="--", linewidth=1.2, label="Mean confidence")
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("Confidence (top-label probability)")
    ax_hist.set_ylabel("Fraction")
    ax_hist.legend(loc="best", fontsize=7)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def reliability_diagram(
    bins_or_accumulator: BinsLike, path: str | os.PathLike[str], title: str = "Reliability diagram"
) -> Path:
    """Save one reliability diagram (accuracy per confidence bin + histogram) as PNG; return its path."""
    bins = _to_bins(bins_or_accumulator)
    fig = _new_figure(5.0, 6.0)
    ax_rel, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    _draw(ax_rel, ax_hist, bins, title)
    return _save(fig, path)


def reliability_diagrams(
    methods: Mapping[str, BinsLike], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Save several methods' reliability diagrams side by side (same axes) as one PNG; return its path."""
    if not methods:
        raise ValueError("reliability_diagrams needs at least one method")
    all_bins = {name: _to_bins(obj) for name, obj in methods.items()}
    ncols = len(all_bins)
    fig = _new_figure(4.2 * ncols, 6.0)
    axes = fig.subplots(2, ncols, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for col, (name, bins) in enumerate(all_bins.items()):
        _draw(axes[0][col], axes[1][col], bins, name)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def risk_coverage_plot(
    curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Save the risk-coverage curves of several predictives as one PNG; return its path.

    ``curves``: label -> ``(confidence (N,), correct (N,))``. Each curve is the error rate of the ``k`` most
    confident questions against the fraction ``k / N`` answered (``polar_vbll.decisions.selective``), its
    AURC in the legend; the dotted line at each curve's right end is its error rate when answering everything.
    """
    from polar_vbll.decisions.selective import aurc, risk_coverage_curve

    if not curves:
        raise ValueError("risk_coverage_plot needs at least one curve")
    fig = _new_figure(5.5, 4.2)
    ax = fig.subplots(1, 1)
    for name, (conf, correct) in curves.items():
        cov, risk = risk_coverage_curve(conf, correct)
        (line,) = ax.plot(cov, risk, linewidth=1.4, label=f"{name} (AURC {aurc(conf, correct):.3f})")
        ax.axhline(risk[-1], color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("Coverage (fraction answered, most confident first)")
    ax.set_ylabel("Selective risk (error rate of the answered)")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
