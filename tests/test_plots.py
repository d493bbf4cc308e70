"""Tests for polar_vbll.plots: PNGs are written, readable, and no GUI/pyplot state is touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polar_vbll.metrics import CalibrationAccumulator
from polar_vbll.plots import reliability_diagram, reliability_diagrams


def make_accumulator(seed: int, scale: float) -> CalibrationAccumulator:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(300, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (300,), generator=g)
    acc = CalibrationAccumulator()
    acc.update(probs, labels)
    return acc


def read_png(path: Path):
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] == 4  # Agg writes RGBA
    return img


def test_single_reliability_diagram(tmp_path: Path) -> None:
    acc = make_accumulator(0, 3.0)
    out = reliability_diagram(acc, tmp_path / "sub" / "rd.png", title="random")
    assert out == tmp_path / "sub" / "rd.png"
    img = read_png(out)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    # ReliabilityBins are accepted too, and a string path
    out2 = reliability_diagram(acc.reliability_bins(), str(tmp_path / "rd2.png"))
    read_png(out2)


def test_multi_method_diagram(tmp_path: Path) -> None:
    methods = {"MAP": make_accumulator(0, 3.0), "PoLAR-VBLL": make_accumulator(1, 0.5).reliability_bins()}
    out = reliability_diagrams(methods, tmp_path / "cmp.png", title="comparison")
    img = read_png(out)
    single = read_png(reliability_diagram(methods["MAP"], tmp_path / "one.png"))
    assert img.shape[1] > 1.5 * single.shape[1]  # side by side: wider than one panel


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no examples"):
        reliability_diagram(CalibrationAccumulator(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one"):
        reliability_diagrams({}, tmp_path / "x.png")
    with pytest.raises(TypeError):
        reliability_diagram({"acc": 0.5}, tmp_path / "x.png")  # type: ignore[arg-type]


def test_imports_stay_light_and_no_gui() -> None:
    """Importing the modules does not import matplotlib; plotting never loads pyplot or a GUI backend."""
    code = (
        "import sys, tempfile, torch\n"
        "import polar_vbll.metrics, polar_vbll.plots\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at module import'\n"
        "from polar_vbll.metrics import CalibrationAccumulator\n"
        "from polar_vbll.plots import reliability_diagram\n"
        "a = CalibrationAccumulator(); a.update(torch.tensor([[0.7, 0.3]]), torch.tensor([0]))\n"
        "reliability_diagram(a, tempfile.mkdtemp() + '/r.png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "bad = [m for m in sys.modules if m.startswith(('tkinter', 'PyQt', 'PySide', 'gi.'))]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
