"""The decision rule's statistics against hand-computed values and their guarantees on synthetic data:
split-conformal coverage over many random splits, the Learn-then-Test risk guarantee, AURC, the OOD
threshold, and the rule's files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from polar_vbll.decisions.conformal import ConformalSets, set_metrics
from polar_vbll.decisions.rule import CalibrationData, DecisionRule, RuleSettings, conformal_quantile
from polar_vbll.decisions.selective import (
    aurc,
    coverage_threshold,
    optimal_aurc,
    risk_coverage_curve,
    risk_threshold,
)
from polar_vbll.errors import CheckpointError


def _synthetic(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from random logits and labels drawn from them (a calibrated model)."""
    logits = rng.normal(size=(n, k)) * 1.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return p, y


def test_lac_quantile_and_sets_match_the_hand_formula():
    rng = np.random.default_rng(1)
    p, y = _synthetic(40, 4, rng)
    alpha = 0.2
    cs = ConformalSets.calibrate(p, y, alpha, "lac")
    scores = np.sort(1.0 - p[np.arange(40), y])
    k = math.ceil((40 + 1) * (1 - alpha))  # 33rd smallest
    assert cs.quantile == pytest.approx(scores[k - 1], abs=1e-12)
    q, _ = _synthetic(30, 4, rng)
    sets = cs.predict_sets(q, torch.full((30,), 4))
    np.testing.assert_array_equal(sets, (1.0 - q) <= scores[k - 1] + 1e-12)


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_conformal_coverage_holds_over_random_splits(score):
    """n = 19 calibration questions at alpha 0.1: ceil(20 * 0.9) = 18, so the expected coverage is 18/20 =
    0.90 exactly for LAC (APS's non-randomised sets cover more); the plain 90% quantile, without the
    finite-sample correction, would cover about 0.86."""
    rng = np.random.default_rng(0)
    p, y = _synthetic(400 * 19 + 400 * 50, 3, rng)
    covs = []
    for i in range(400):
        cal = slice(i * 19, (i + 1) * 19)
        test = slice(400 * 19 + i * 50, 400 * 19 + (i + 1) * 50)
        cs = ConformalSets.calibrate(p[cal], y[cal], 0.1, score, seed=i)
        covs.append(set_metrics(cs.predict_sets(p[test], np.full(50, 3)), y[test])["coverage"])
    mean = float(np.mean(covs))
    assert mean >= 0.90 - 0.01  # s.e. of the mean ~0.0035
    if score == "lac":
        assert mean <= 0.90 + 0.015


def test_padded_classes_are_never_in_a_set():
    rng = np.random.default_rng(2)
    p, y = _synthetic(60, 4, rng)
    p[:, 3] = 0.0
    p /= p.sum(1, keepdims=True)
    y = np.minimum(y, 2)
    for score in ("lac", "aps"):
        cs = ConformalSets.calibrate(p[:20], y[:20], 0.05, score)  # ceil(21 * 0.95) = 20: the largest score
        sets = cs.predict_sets(p[20:], torch.full((40,), 3))
        assert not sets[:, 3].any() and sets[:, :3].any()
    with pytest.raises(ValueError, match="too few for alpha 0.05: conformal sets need at least 20"):
        ConformalSets.calibrate(p[:19], y[:19], 0.05)


def test_set_metrics_by_hand():
    sets = np.array([[True, False, True], [False, True, False], [True, True, True]])
    out = set_metrics(sets, np.array([2, 0, 1]))
    assert out == {"coverage": pytest.approx(2 / 3), "mean_size": pytest.approx(2.0)}


def test_aurc_by_hand():
    conf = np.array([0.9, 0.6, 0.8, 0.7])
    correct = np.array([1, 0, 0, 1])
    # sorted by confidence: correct 1, 0, 1, 0 -> risks 0, 1/2, 1/3, 2/4
    assert aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    cov, risk = risk_coverage_curve(conf, correct)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 0.5, 1 / 3, 0.5])
    # a perfect ranking of many questions approaches e + (1 - e) ln(1 - e)
    n, e = 20000, 0.3
    ok = np.r_[np.ones(int(n * (1 - e))), np.zeros(int(n * e))]
    assert aurc(np.linspace(1, 0, n), ok) == pytest.approx(optimal_aurc(e), abs=1e-3)


def test_coverage_threshold_answers_the_target_fraction():
    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.52, 0.51, 0.5, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0, 1])
    t = coverage_threshold(conf, correct, 0.3)
    assert t.tau == 0.8 and t.coverage == pytest.approx(0.3) and t.risk == pytest.approx(0.0)
    t = coverage_threshold(conf, correct, 0.5)
    assert t.tau == 0.6 and t.risk == pytest.approx(1 / 5)


def test_learn_then_test_threshold_controls_the_selective_risk():
    """A calibrated synthetic model: confidence c ~ U(0.5, 1), correct with probability c, so the true
    selective risk at threshold tau is E[1 - c | c >= tau] = (1 - tau) / 2. Over 300 calibration draws the
    risk exceeds r = 0.2 in at most delta = 10% of them (Learn-then-Test's guarantee); the naive threshold
    (the lowest whose calibration risk is <= r) exceeds it about half the time."""
    rng = np.random.default_rng(0)
    r, delta, n = 0.2, 0.1, 1000
    violations = naive_violations = answered = 0
    for _ in range(300):
        c = rng.uniform(0.5, 1.0, n)
        ok = (rng.uniform(size=n) < c).astype(float)
        t = risk_threshold(c, ok, r, delta)
        if t.tau is not None:
            answered += 1
            violations += (1 - max(t.tau, 0.5)) / 2 > r
        order = np.argsort(-c)
        emp = np.cumsum(1 - ok[order]) / np.arange(1, n + 1)
        k = np.nonzero(emp <= r)[0].max()
        naive_violations += (1 - c[order][k]) / 2 > r
    assert answered >= 290  # the rule is not trivially "abstain on everything"
    assert violations / 300 <= delta
    assert naive_violations / 300 >= 0.3


def test_risk_and_alpha_outside_the_unit_interval_are_refused():
    with pytest.raises(ValueError, match="risk must lie in"):
        risk_threshold([0.9, 0.8], [1, 0], 1.0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        ConformalSets.calibrate(np.full((2, 2), 0.5), np.array([0, 1]), 0.0)
    with pytest.raises(ValueError, match="risk must lie in"):
        RuleSettings(risk=1.5)


def _calibration(n: int, epistemic: bool, seed: int = 0) -> CalibrationData:
    rng = np.random.default_rng(seed)
    p, y = _synthetic(n, 3, rng)
    e = rng.gamma(2.0, 0.05, n) if epistemic else np.zeros(n)
    return CalibrationData(torch.tensor(p, dtype=torch.float32), torch.tensor(y), torch.full((n,), 3),
                           torch.tensor(e, dtype=torch.float32))  # fmt: skip


def test_ood_threshold_passes_the_target_fraction_of_in_distribution_questions():
    assert conformal_quantile(np.arange(1.0, 20.0), 0.95) == 19.0  # ceil(20 * 0.95) = 19th of 19
    assert conformal_quantile(np.arange(1.0, 10.0), 0.95) == math.inf
    passes = []
    for seed in range(100):
        rule = DecisionRule.fit(_calibration(99, True, seed), RuleSettings())
        new = _calibration(200, True, seed + 1000)
        passes.append(1 - rule.decide(new.probs, new.epistemic, new.n_choices).ood.mean())
    assert rule.ood_score == "epistemic"
    assert np.mean(passes) >= 0.95 - 0.01


def test_a_rule_with_its_ood_flag_off_is_strict_json(tmp_path):
    rule = DecisionRule.fit(_calibration(12, True), RuleSettings(coverage=0.5))  # 12 < 19: flag off
    rule.save(tmp_path)

    def refuse(name):
        raise AssertionError(f"rule.json holds {name}, not strict JSON")

    saved = json.loads((tmp_path / "decision" / "rule.json").read_text(), parse_constant=refuse)
    assert saved["ood"]["threshold"] is None
    assert "OOD flag off" in rule.describe()[-1]
    assert DecisionRule.load(tmp_path).ood_threshold == math.inf


def test_a_deterministic_head_flags_by_max_probability():
    rule = DecisionRule.fit(_calibration(200, False), RuleSettings(coverage=0.5))
    assert rule.ood_score == "msp" and rule.threshold.coverage == pytest.approx(0.5)


def test_rule_files_round_trip_and_refuse_edits(tmp_path):
    with pytest.raises(CheckpointError, match="polar-vbll calibrate"):
        DecisionRule.load(tmp_path)
    rule = DecisionRule.fit(_calibration(300, True), RuleSettings(risk=0.3), {"source": "synthetic"})
    rule.save(tmp_path)
    again = DecisionRule.load(tmp_path)
    assert again.summary() == rule.summary() and again.meta == {"source": "synthetic"}
    new = _calibration(50, True, 7)
    a, b = rule.decide(new.probs, new.epistemic, new.n_choices), again.decide(new.probs, new.epistemic, new.n_choices)
    for name in ("answer", "abstain", "ood"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.sets["aps"], b.sets["aps"])
    saved = json.loads((tmp_path / "decision" / "rule.json").read_text())
    saved["conformal"]["lac"]["quantile"] = 0.5
    (tmp_path / "decision" / "rule.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="does not reproduce"):
        DecisionRule.load(tmp_path)


def test_two_choice_questions_get_lac_sets_only():
    """MAPIE offers APS only beyond two classes; a binary rule keeps LAC and reports no APS sets."""
    rng = np.random.default_rng(3)
    p, y = _synthetic(100, 2, rng)
    data = CalibrationData(torch.tensor(p), torch.tensor(y), torch.full((100,), 2), torch.zeros(100))
    rule = DecisionRule.fit(data, RuleSettings(coverage=0.8))
    assert set(rule.sets) == {"lac"} and set(rule.summary()["conformal"]) == {"lac"}
    d = rule.decide(data.probs[:10], data.epistemic[:10], data.n_choices[:10])
    assert set(d.sets) == {"lac"}
