"""Tests for polar_vbll.metrics: hand-computed values, torchmetrics agreement, edge cases, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import multiclass_calibration_error

from polar_vbll.metrics import (
    NLL_PROB_FLOOR,
    CalibrationAccumulator,
    as_percent,
    confidence_bin_index,
    format_metrics,
    ood_auroc,
    ood_scores,
    summarize,
)

F64 = torch.float64


# --------------------------------------------------------------------------- independent references


def ece_reference(conf: list[float], correct: list[bool], n_bins: int = 15) -> float:
    """Textbook ECE (Guo et al. 2017) with plain Python loops: bins (lo, hi], c == 0 in the first."""
    n = len(conf)
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (m == 0 and c == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - avg)
    return total


def top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[bool]]:
    conf = probs.max(dim=1).values.tolist()
    correct = (probs.argmax(dim=1) == labels).tolist()
    return conf, correct


def tm_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    return float(
        multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    )


def random_problem(seed: int, n: int, k: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, k, generator=g, dtype=F64), dim=1)
    # labels correlated with the prediction so accuracy is neither ~1/K nor ~1
    pred = probs.argmax(dim=1)
    noise = torch.randint(0, k, (n,), generator=g)
    labels = torch.where(torch.rand(n, generator=g) < 0.6, pred, noise)
    return probs, labels


# --------------------------------------------------------------------------- hand-computed example

HAND_PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # label 0: pred 0, conf 0.70, correct
        [0.20, 0.50, 0.30],  # label 2: pred 1, conf 0.50, wrong
        [0.05, 0.10, 0.85],  # label 2: pred 2, conf 0.85, correct
        [0.65, 0.25, 0.10],  # label 1: pred 0, conf 0.65, wrong
        [0.25, 0.25, 0.50],  # label 2: pred 2, conf 0.50, correct
    ],
    dtype=F64,
)
HAND_LABELS = torch.tensor([0, 2, 2, 1, 2])

# ACC = 3 correct / 5 = 0.6
HAND_ACC = 0.6
# ECE, 15 bins (lo, hi], bin m = ceil(15 c) - 1:
#   c=0.50 -> 7.5  -> bin 7  (0.4667, 0.5333]: rows 2,5: acc 1/2, mean conf 0.50 -> gap 0.00, weight 2/5
#   c=0.65 -> 9.75 -> bin 9  (0.6000, 0.6667]: row 4:    acc 0,   conf 0.65      -> gap 0.65, weight 1/5
#   c=0.70 -> 10.5 -> bin 10 (0.6667, 0.7333]: row 1:    acc 1,   conf 0.70      -> gap 0.30, weight 1/5
#   c=0.85 -> 12.75-> bin 12 (0.8000, 0.8667]: row 3:    acc 1,   conf 0.85      -> gap 0.15, weight 1/5
#   ECE = (2*0 + 0.65 + 0.30 + 0.15) / 5 = 1.10 / 5 = 0.22
HAND_ECE = 0.22
# NLL = -(ln .70 + ln .30 + ln .85 + ln .25 + ln .50) / 5
#     = (0.3566749 + 1.2039728 + 0.1625189 + 1.3862944 + 0.6931472) / 5 = 3.8026082 / 5 = 0.7605216
HAND_NLL = 0.7605216
# Brier, sum_k (p_k - onehot_k)^2 per row:
#   row 1: .3^2 + .2^2 + .1^2    = .09 + .04 + .01      = 0.140
#   row 2: .2^2 + .5^2 + .7^2    = .04 + .25 + .49      = 0.780
#   row 3: .05^2 + .1^2 + .15^2  = .0025 + .01 + .0225  = 0.035
#   row 4: .65^2 + .75^2 + .1^2  = .4225 + .5625 + .01  = 0.995
#   row 5: .25^2 + .25^2 + .5^2  = .0625 + .0625 + .25  = 0.375
#   mean = 2.325 / 5 = 0.465
HAND_BRIER = 0.465


def test_hand_computed_example() -> None:
    m = summarize(HAND_PROBS, HAND_LABELS)
    assert m["n"] == 5
    assert m["acc"] == pytest.approx(HAND_ACC, abs=1e-12)
    assert m["ece"] == pytest.approx(HAND_ECE, abs=1e-12)
    assert m["nll"] == pytest.approx(HAND_NLL, abs=1e-7)
    assert m["brier"] == pytest.approx(HAND_BRIER, abs=1e-12)
    # no confidence on a bin edge here, so torchmetrics agrees (it works in float32)
    assert tm_ece(HAND_PROBS, HAND_LABELS) == pytest.approx(HAND_ECE, abs=1e-6)


def test_hand_reliability_bins() -> None:
    acc = CalibrationAccumulator()
    acc.update(HAND_PROBS, HAND_LABELS)
    bins = acc.reliability_bins()
    assert bins.n == 5 and bins.n_bins == 15 and bins.edges.numel() == 16
    expected_counts = [0.0] * 15
    expected_counts[7], expected_counts[9], expected_counts[10], expected_counts[12] = 2, 1, 1, 1
    assert bins.counts.tolist() == expected_counts
    assert bins.acc[7].item() == pytest.approx(0.5) and bins.mean_conf[7].item() == pytest.approx(0.5)
    assert bins.acc[9].item() == 0.0 and bins.mean_conf[9].item() == pytest.approx(0.65)
    assert torch.isnan(bins.acc[0]) and torch.isnan(bins.mean_conf[0])  # empty bins are NaN
    assert bins.ece == pytest.approx(HAND_ECE, abs=1e-12)
    assert bins.accuracy == pytest.approx(HAND_ACC, abs=1e-12)


# --------------------------------------------------------------------------- bin edges


def test_bin_index_convention_right_closed() -> None:
    n = 15
    edges = torch.tensor([k / n for k in range(1, n + 1)], dtype=F64)
    # c exactly k/15 belongs to bin k-1 ((lo, hi]); 1.0 is in the last bin, not an extra one
    assert confidence_bin_index(edges, n).tolist() == list(range(n))
    # the next float above an interior edge k/15 goes to bin k
    above = torch.nextafter(edges[:-1], torch.tensor(2.0, dtype=F64))
    assert confidence_bin_index(above, n).tolist() == list(range(1, n))
    # 0 goes to the first bin
    assert confidence_bin_index(torch.tensor([0.0, 1e-9], dtype=F64), n).tolist() == [0, 0]
    # equals ceil(c * n) - 1 clipped away from edges
    c = torch.rand(1000, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = (torch.ceil(c * n) - 1).clamp(0, n - 1).long()
    assert torch.equal(confidence_bin_index(c, n), ref)
    assert confidence_bin_index(torch.tensor([0.1, 0.1000001, 1.0], dtype=F64), 10).tolist() == [0, 1, 9]


def test_confidence_exactly_one() -> None:
    # Both rows have confidence in the last bin (14/15, 1]: 0.95 (correct) and 1.0 (wrong).
    # Last bin: count 2, acc 1/2, mean conf (0.95 + 1.0) / 2 = 0.975 -> ECE = 2/2 * |0.5 - 0.975| = 0.475.
    probs = torch.tensor([[0.95, 0.05, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    labels = torch.tensor([0, 1])
    m = summarize(probs, labels)
    assert m["ece"] == pytest.approx(0.475, abs=1e-12)
    assert ece_reference(*top_label(probs, labels)) == pytest.approx(0.475, abs=1e-12)
    # torchmetrics 1.9 puts 1.0 in a hidden extra bin [1, 1] (issue #3510):
    #   0.95 alone -> gap 0.05, 1.0 alone -> gap 1.0 -> ECE = (0.05 + 1.0) / 2 = 0.525.
    # We accept either value from torchmetrics so a fixed release does not break this test.
    tm = tm_ece(probs, labels)
    assert tm == pytest.approx(0.475, abs=1e-6) or tm == pytest.approx(0.525, abs=1e-6)


def test_confidence_exactly_on_interior_edge() -> None:
    # 0.6 = 9/15 exactly (both 9/15 and the literal 0.6 round to the same float64).
    # Ours (lo, hi]: 0.6 and 0.55 share bin 8 (0.5333, 0.6]: acc 1/2, mean conf 0.575 -> ECE 0.075.
    # torchmetrics [lo, hi): 0.6 -> bin 9 alone (gap 0.4), 0.55 -> bin 8 alone (gap 0.55) -> 0.475.
    assert 9 / 15 == 0.6
    probs = torch.tensor([[0.6, 0.4], [0.55, 0.45]], dtype=F64)
    labels = torch.tensor([0, 1])
    assert summarize(probs, labels)["ece"] == pytest.approx(0.075, abs=1e-12)
    assert ece_reference(*top_label(probs, labels)) == pytest.approx(0.075, abs=1e-12)
    tm = tm_ece(probs, labels)
    assert tm == pytest.approx(0.075, abs=1e-6) or tm == pytest.approx(0.475, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 4, 5])
def test_ece_matches_torchmetrics_on_random_data(seed: int, k: int) -> None:
    probs, labels = random_problem(seed, 400, k)
    ours = summarize(probs, labels)["ece"]
    assert ours == pytest.approx(ece_reference(*top_label(probs, labels)), abs=1e-12)
    assert ours == pytest.approx(tm_ece(probs, labels), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_ece_with_saturated_and_edge_confidences(seed: int) -> None:
    """Random data where many confidences are exactly 1.0 or exactly k/15: ours equals the textbook."""
    k = 4
    probs, labels = random_problem(seed, 300, k)
    g = torch.Generator().manual_seed(100 + seed)
    rows = torch.randperm(300, generator=g)
    for i in rows[:60].tolist():  # saturated softmax: one-hot rows, confidence exactly 1.0
        probs[i] = 0.0
        probs[i, int(torch.randint(0, k, (1,), generator=g))] = 1.0
    for i in rows[60:120].tolist():  # confidence exactly k/15 for k = 4..14 (>= 1/K so it is the max)
        c = int(torch.randint(4, 15, (1,), generator=g)) / 15
        probs[i] = (1.0 - c) / (k - 1)
        probs[i, int(torch.randint(0, k, (1,), generator=g))] = c
    ours = summarize(probs, labels)["ece"]
    assert ours == pytest.approx(ece_reference(*top_label(probs, labels)), abs=1e-12)
    # torchmetrics 1.9 bins these values differently ([lo, hi) and a hidden bin for 1.0), so it
    # disagrees here by ~1e-2; not asserted, so a torchmetrics fix does not break this test.


# --------------------------------------------------------------------------- accumulation


def test_uneven_batches_equal_one_shot() -> None:
    probs, labels = random_problem(7, 250, 5)
    whole = summarize(probs, labels)
    acc = CalibrationAccumulator()
    start = 0
    for size in [1, 7, 0, 30, 62, 150]:
        acc.update(probs[start : start + size], labels[start : start + size])
        start += size
    assert start == 250 and acc.n == 250
    batched = acc.compute()
    assert batched.keys() == whole.keys()
    for key in whole:
        assert batched[key] == pytest.approx(whole[key], abs=1e-12), key
    # merging shards (e.g. one accumulator per rank) gives the same numbers
    a, b = CalibrationAccumulator(), CalibrationAccumulator()
    a.update(probs[:100], labels[:100])
    b.update(probs[100:], labels[100:])
    a.merge(b)
    for key in whole:
        assert a.compute()[key] == pytest.approx(whole[key], abs=1e-12), key


def test_mean_of_batch_ece_is_wrong() -> None:
    # Four predictions, all with confidence 0.9 (one bin), three correct.
    #   Batch A: 1 row, correct          -> ECE_A = |1   - 0.9| = 0.1
    #   Batch B: 3 rows, 2 correct       -> ECE_B = |2/3 - 0.9| = 0.2333
    #   All 4:   acc 3/4                 -> ECE   = |3/4 - 0.9| = 0.15
    # Mean of batch ECEs = (0.1 + 0.2333) / 2 = 0.1667; even size-weighted (0.1 + 3 * 0.2333) / 4 = 0.2.
    # Within a bin, errors of opposite sign in different batches cancel; per-batch |.| cannot see it.
    row = [0.9, 0.1]
    a_probs, a_labels = torch.tensor([row], dtype=F64), torch.tensor([0])
    b_probs, b_labels = torch.tensor([row] * 3, dtype=F64), torch.tensor([0, 0, 1])
    acc = CalibrationAccumulator()
    acc.update(a_probs, a_labels)
    acc.update(b_probs, b_labels)
    ece = acc.compute()["ece"]
    assert ece == pytest.approx(0.15, abs=1e-12)
    ece_a, ece_b = summarize(a_probs, a_labels)["ece"], summarize(b_probs, b_labels)["ece"]
    assert ece_a == pytest.approx(0.1) and ece_b == pytest.approx(0.9 - 2 / 3)
    assert (ece_a + ece_b) / 2 == pytest.approx(1 / 6)
    assert abs((ece_a + ece_b) / 2 - ece) > 0.01
    assert abs((ece_a + 3 * ece_b) / 4 - ece) > 0.01


def test_padded_classes_change_nothing() -> None:
    probs, labels = random_problem(3, 200, 3)
    padded = torch.cat([probs, torch.zeros(200, 2, dtype=F64)], dim=1)  # K = 5, two padding columns
    plain, pad = summarize(probs, labels), summarize(padded, labels)
    for key in plain:
        assert pad[key] == pytest.approx(plain[key], abs=1e-12), key
    s_plain, s_pad = ood_scores(probs), ood_scores(padded)
    for key in s_plain:
        torch.testing.assert_close(s_pad[key], s_plain[key], rtol=0, atol=1e-12)
    # mixing batches with different K in one accumulator is fine
    acc = CalibrationAccumulator()
    acc.update(probs[:50], labels[:50])
    acc.update(padded[50:], labels[50:])
    assert acc.compute()["ece"] == pytest.approx(plain["ece"], abs=1e-12)


def test_nll_is_clamped_and_finite() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64)
    labels = torch.tensor([1, 0])
    m = summarize(probs, labels)
    expected = (-math.log(NLL_PROB_FLOOR) - math.log(0.5)) / 2  # (27.631 + 0.693) / 2
    assert math.isfinite(m["nll"]) and m["nll"] == pytest.approx(expected, rel=1e-12)
    # Brier: row 1: 1^2 + 1^2 = 2; row 2: .5^2 + .5^2 = .5; mean 1.25
    assert m["brier"] == pytest.approx(1.25, abs=1e-12)


def test_float32_inputs_and_n_bins() -> None:
    probs, labels = random_problem(11, 300, 4)
    m64 = summarize(probs, labels, n_bins=10)
    m32 = summarize(probs.float(), labels, n_bins=10)
    assert m32["ece"] == pytest.approx(m64["ece"], abs=1e-6)
    assert m64["ece"] == pytest.approx(ece_reference(*top_label(probs, labels), n_bins=10), abs=1e-12)
    assert m64["ece"] == pytest.approx(tm_ece(probs, labels, n_bins=10), abs=1e-6)
    assert CalibrationAccumulator(n_bins=10).n_bins == 10


# --------------------------------------------------------------------------- formatting


def test_as_percent_and_format() -> None:
    m = {"acc": 0.812, "ece": 0.0431, "nll": 0.5123, "brier": 0.271, "n": 500.0}
    p = as_percent(m)
    assert list(p) == ["ACC (%)", "ECE (%)", "NLL", "Brier", "N"]
    assert p["ACC (%)"] == pytest.approx(81.2) and p["ECE (%)"] == pytest.approx(4.31)
    assert p["NLL"] == 0.5123 and p["Brier"] == 0.271 and p["N"] == 500
    assert format_metrics(m) == "ACC (%) 81.20 | ECE (%) 4.31 | NLL 0.5123 | Brier 0.2710 | N 500"
    assert as_percent({"auroc": 0.9})["auroc"] == 0.9  # unknown keys pass through unchanged


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([0]), "shape"),
        (torch.tensor([[0.5, 0.5]], dtype=F64), torch.tensor([[0]]), "shape"),
        (torch.tensor([[0.5, 0.5]], dtype=F64), torch.tensor([0, 1]), "rows"),
        (torch.tensor([[0.5, 0.5]], dtype=F64), torch.tensor([2]), r"\[0, 1\]"),
        (torch.tensor([[0.5, 0.5]], dtype=F64), torch.tensor([-1]), r"\[0, 1\]"),
        (torch.tensor([[0.5, 0.5]], dtype=F64), torch.tensor([0.0]), "integer"),
        (torch.tensor([[0.5, 0.5]], dtype=F64), torch.tensor([True]), "integer"),
        (torch.tensor([[1, 0]]), torch.tensor([0]), "floating"),
        (torch.tensor([[math.nan, 0.5]], dtype=F64), torch.tensor([0]), "finite"),
        (torch.tensor([[math.inf, 0.5]], dtype=F64), torch.tensor([0]), "finite"),
        (torch.tensor([[1.2, -0.2]], dtype=F64), torch.tensor([0]), "non-negative"),
        (torch.tensor([[0.6, 0.6]], dtype=F64), torch.tensor([0]), "sum to 1"),
        (torch.tensor([[2.0, -1.0, 0.5]], dtype=F64), torch.tensor([0]), "non-negative"),
        (torch.tensor([[3.0, 1.0]], dtype=F64), torch.tensor([0]), "logits"),
    ],
)
def test_invalid_inputs_raise(probs: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CalibrationAccumulator().update(probs, labels)


def test_invalid_state_raises() -> None:
    with pytest.raises(ValueError, match="no examples"):
        CalibrationAccumulator().compute()
    with pytest.raises(ValueError, match="no examples"):
        CalibrationAccumulator().reliability_bins()
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="n_bins"):
            CalibrationAccumulator(n_bins=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="merge"):
        CalibrationAccumulator(10).merge(CalibrationAccumulator(15))
    acc = CalibrationAccumulator()
    acc.update(HAND_PROBS, HAND_LABELS)
    acc.reset()
    assert acc.n == 0


def test_sum_tolerance_is_configurable() -> None:
    probs = torch.tensor([[0.5, 0.5 + 5e-3]], dtype=F64)  # e.g. a bf16 softmax
    with pytest.raises(ValueError, match="sum to 1"):
        CalibrationAccumulator().update(probs, torch.tensor([0]))
    acc = CalibrationAccumulator(sum_atol=1e-2)
    acc.update(probs, torch.tensor([0]))
    assert acc.n == 1


# --------------------------------------------------------------------------- OOD


def test_ood_scores_values() -> None:
    probs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=F64)
    s = ood_scores(probs)
    assert set(s) == {"msp", "entropy"}
    torch.testing.assert_close(s["msp"], torch.tensor([2 / 3, 0.0, 0.5], dtype=F64))
    torch.testing.assert_close(s["entropy"], torch.tensor([math.log(3), 0.0, math.log(2)], dtype=F64))
    per_class = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    expected = torch.tensor([3.0, 1.0, 0.0], dtype=F64)
    torch.testing.assert_close(ood_scores(probs, per_class)["logit_var"], expected)
    torch.testing.assert_close(ood_scores(probs, expected)["logit_var"], expected)
    cov = torch.diag_embed(per_class) + 0.1 * (1 - torch.eye(3, dtype=F64))  # off-diagonals ignored
    torch.testing.assert_close(ood_scores(probs, cov)["logit_var"], expected)
    with pytest.raises(ValueError, match="logit_var"):
        ood_scores(probs, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="logit_var"):
        ood_scores(probs, -torch.ones(3, dtype=F64))


def test_auroc_hand_example_with_ties() -> None:
    # OOD positive, higher score = OOD. Pairs (out, in), 1 if out > in, 1/2 if equal:
    #   out 0.4 vs in 0.1, 0.4, 0.4 -> 1 + 1/2 + 1/2 = 2
    #   out 0.9 vs in 0.1, 0.4, 0.4 -> 1 + 1   + 1   = 3
    #   AUROC = 5 / (2 * 3) = 0.8333...
    s_in = torch.tensor([0.1, 0.4, 0.4])
    s_out = torch.tensor([0.4, 0.9])
    assert ood_auroc(s_in, s_out) == pytest.approx(5 / 6, abs=1e-12)
    assert ood_auroc(s_in.flip(0), s_out.flip(0)) == pytest.approx(5 / 6, abs=1e-12)  # order-free
    target = torch.tensor([0, 0, 0, 1, 1])
    tm = BinaryAUROC()(torch.cat([s_in, s_out]), target)
    assert float(tm) == pytest.approx(5 / 6, abs=1e-6)


def test_auroc_extremes() -> None:
    s_in, s_out = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6])
    assert ood_auroc(s_in, s_out) == 1.0
    assert ood_auroc(s_out, s_in) == 0.0
    assert ood_auroc(torch.full((4,), 0.3), torch.full((3,), 0.3)) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        ood_auroc(torch.tensor([]), s_out)
    with pytest.raises(ValueError, match="NaN"):
        ood_auroc(torch.tensor([math.nan]), s_out)


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_torchmetrics_and_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # scores on a 1/20 grid in [0, 1] so there are many ties, OOD shifted up a little
    s_in = torch.randint(0, 16, (300,), generator=g).to(F64) / 20
    s_out = torch.randint(4, 21, (170,), generator=g).to(F64) / 20
    ours = ood_auroc(s_in, s_out)
    diff = s_out[:, None] - s_in[None, :]
    brute = float(((diff > 0).to(F64) + 0.5 * (diff == 0).to(F64)).mean())
    assert ours == pytest.approx(brute, abs=1e-12)
    target = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(170, dtype=torch.long)])
    tm = float(BinaryAUROC()(torch.cat([s_in, s_out]).float(), target))
    assert ours == pytest.approx(tm, abs=1e-6)
    assert 0.5 < ours < 1.0


def test_auroc_on_ood_scores_end_to_end() -> None:
    # in-distribution: confident; OOD: flat predictions -> every score type should separate them well
    p_in, _ = random_problem(0, 200, 4, scale=4.0)
    p_out, _ = random_problem(1, 100, 4, scale=0.3)
    s_in, s_out = ood_scores(p_in), ood_scores(p_out)
    for key in ("msp", "entropy"):
        assert ood_auroc(s_in[key], s_out[key]) > 0.9, key


def test_format_table_reports_percent_with_units():
    from polar_vbll.metrics import format_table

    table = format_table({"m": {"acc": 0.5, "ece": 0.125, "nll": 0.7, "brier": 0.3, "n": 8}})
    header, _, row = table.splitlines()
    assert "ACC (%)" in header and "ECE (%)" in header
    assert row == "| m | 50.00 | 12.50 | 0.7000 | 0.3000 | 8 |"
