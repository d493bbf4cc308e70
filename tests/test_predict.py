"""``polar-vbll calibrate`` and ``polar-vbll predict`` as a user runs them on a tiny trained run: the rule's
files, decision records that reproduce the run's own predictive, the Python API, Ray Data workers giving
the one-process output, and every bad input ending in one line (exit 2) with nothing written."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from polar_vbll.decisions.conformal import ConformalSets, set_metrics
from polar_vbll.tasks import load_task
from polar_vbll_cli.app import app
from tests.optional import for_entry

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict")
    res = _invoke("train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={out}",
                  "--set", "method=polar_vbll", "--set", "data.val_limit=40")  # fmt: skip
    assert res.exit_code == 0, res.output
    return out / "tiny"


@pytest.fixture(scope="module")
def questions(run):
    """The run's own evaluation split as a user's JSONL (every other row without its answer)."""
    ex = load_task("arc_easy", "test", seed=0, limit=32)
    rows = []
    for i, e in enumerate(ex):
        row = {"id": e.uid, "question": e.question, "choices": list(e.choices)}
        if i % 2 == 0:
            row["answer"] = e.answer
        rows.append(row)
    return _write(run.parent / "questions.jsonl", rows)


@pytest.fixture(scope="module")
def calibrated(run):
    res = _invoke("calibrate", run, "--no-progress", "--coverage", "0.5")
    assert res.exit_code == 0, res.output
    return run, res


def test_predict_without_a_rule_says_how_to_make_one(tmp_path, run, questions):
    fresh = tmp_path / "copy"
    import shutil

    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("decision", "checkpoint-*"))
    res = _invoke("predict", fresh, "-i", questions, "-o", tmp_path / "d.jsonl", "--no-progress")
    assert res.exit_code == 2
    assert "no calibrated decision rule" in res.output and f"polar-vbll calibrate {fresh}" in res.output
    assert not (tmp_path / "d.jsonl").exists()


def test_calibrate_stores_the_rule_on_the_runs_validation_predictive(calibrated):
    run, res = calibrated
    assert "calibrated on 40 questions: arc_easy:validation" in res.output
    assert "decision rule:" in res.output
    rule = json.loads((run / "decision" / "rule.json").read_text())
    assert rule["settings"]["coverage"] == 0.5 and rule["calibration"]["n"] == 40
    assert rule["threshold"]["coverage"] == pytest.approx(0.5)
    # the calibration predictive is the run's own validation predictive, reproduced from the saved files
    cal = load_file(str(run / "decision" / "calibration.safetensors"))
    own = load_file(str(run / "predictions.safetensors"))["validation_probs"]
    torch.testing.assert_close(cal["probs"], own, atol=1e-6, rtol=0)
    assert bool(cal["epistemic"].gt(0).all())  # a VBLL head has an epistemic part


def test_predict_writes_one_record_per_question_in_order(calibrated, questions, tmp_path):
    run, _ = calibrated
    out = tmp_path / "decisions.jsonl"
    res = _invoke("predict", run, "-i", questions, "-o", out, "--no-progress", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    assert "32 questions:" in res.output and "on the 16 rows with an answer" in res.output
    assert f"decisions: {out.resolve()}" in res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    src = [json.loads(line) for line in questions.read_text().splitlines()]
    assert [r["id"] for r in recs] == [s["id"] for s in src] and [r["line"] for r in recs] == list(range(1, 33))
    own = load_file(str(run / "predictions.safetensors"))["eval_probs"]
    for i, (r, s) in enumerate(zip(recs, src, strict=True)):
        k = len(s["choices"])
        np.testing.assert_allclose(r["probs"], own[i, :k].numpy(), atol=1e-6)  # the run's own predictive
        assert r["answer_index"] == int(np.argmax(r["probs"])) and r["answer"] == "ABCDE"[r["answer_index"]]
        assert r["confidence"] == pytest.approx(max(r["probs"]))
        assert r["entropy"] == pytest.approx(-sum(p * np.log(p) for p in r["probs"] if p > 0), abs=1e-6)
        assert 0 <= r["epistemic"] <= r["entropy"] + 1e-6
        assert r["decision"] == ("escalate" if r["ood"] else "abstain" if r["abstain"] else "answer")
        assert set(r["set_lac"]) <= set("ABCDE"[:k]) and r["set_aps"]
        assert ("label" in r) == ("answer" in s)
        if "answer" in s:
            assert r["correct"] == (r["answer_index"] == s["answer"])


def test_the_python_api_gives_the_cli_records(calibrated, questions, tmp_path):
    from polar_vbll.predictor import Predictor

    run, _ = calibrated
    out = tmp_path / "d.jsonl"
    assert _invoke("predict", run, "-i", questions, "-o", out, "--no-progress").exit_code == 0
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    recs = Predictor.from_run(run).predict(rows)
    cli = [json.loads(line) for line in out.read_text().splitlines()]
    for a, b in zip(recs, cli, strict=True):
        b.pop("line")
        assert a == b


@for_entry("polar-vbll predict --workers")
def test_workers_on_ray_data_give_the_one_process_output(calibrated, questions, tmp_path):
    run, _ = calibrated
    one, ray = tmp_path / "one.jsonl", tmp_path / "ray.jsonl"
    assert _invoke("predict", run, "-i", questions, "-o", one, "--no-progress", "--batch-size", "5").exit_code == 0
    res = _invoke("predict", run, "-i", questions, "-o", ray, "--no-progress", "--batch-size", "5", "--workers", "2")
    assert res.exit_code == 0, res.output
    assert ray.read_bytes() == one.read_bytes()


def test_predict_refits_the_stored_rule_with_other_targets_without_changing_it(calibrated, questions, tmp_path):
    run, _ = calibrated
    before = (run / "decision" / "rule.json").read_text()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _invoke("predict", run, "-i", questions, "-o", a, "--no-progress", "--coverage", "0.25").exit_code == 0
    assert _invoke("predict", run, "-i", questions, "-o", b, "--no-progress", "--coverage", "0.9").exit_code == 0
    answered = [sum(json.loads(x)["decision"] != "abstain" for x in f.read_text().splitlines()) for f in (a, b)]
    assert answered[0] < answered[1]
    assert (run / "decision" / "rule.json").read_text() == before


def test_calibrate_on_a_users_file_records_its_hash(calibrated, tmp_path):
    import hashlib

    run, _ = calibrated
    ex = load_task("arc_easy", "validation", seed=0, limit=40)
    f = _write(tmp_path / "held_out.jsonl", [{"question": e.question, "choices": list(e.choices), "answer": e.answer}
                                             for e in ex])  # fmt: skip
    res = _invoke("calibrate", run, "--data", f, "--no-progress", "--alpha", "0.2", "--coverage", "0.5")
    assert res.exit_code == 0, res.output
    rule = json.loads((run / "decision" / "rule.json").read_text())
    assert rule["calibration"]["file_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert rule["calibration"]["source"] == str(f) and rule["conformal"]["lac"]["alpha"] == 0.2
    # a row without its answer cannot calibrate
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0},
                                          {"question": "q", "choices": ["a", "b"]}])  # fmt: skip
    res = _invoke("calibrate", run, "--data", bad, "--no-progress")
    assert res.exit_code == 2 and f"{bad}, line 2, field 'answer': missing" in res.output
    assert _invoke("calibrate", run, "--no-progress", "--coverage", "0.5").exit_code == 0  # restore


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "q", "choices": ["a", "b"]}, {"choices": ["a", "b"]}], "line 2, field 'question': missing"),
        ([{"question": "q"}], "line 1, field 'choices': missing"),
        ([{"question": "q", "choice": ["a", "b"]}], "field 'choice': unknown key (did you mean 'choices'?)"),
        ([{"question": "q", "choices": ["a", "b"], "answr": 1}], "field 'answr': unknown key (did you mean 'answer'?)"),
        ([{"question": "q", "choices": list("abcdefg")}], "7 choices, but the run's head reads 5 answer letters"),
    ],
)
def test_bad_question_rows_name_file_line_and_field(calibrated, tmp_path, rows, message):
    run, _ = calibrated
    f = _write(tmp_path / "q.jsonl", rows)
    out = tmp_path / "d.jsonl"
    out.write_text("keep me\n")
    res = _invoke("predict", run, "-i", f, "-o", out, "--no-progress")
    assert res.exit_code == 2 and message in res.output and str(f) in res.output, res.output
    assert "Traceback" not in res.output and out.read_text() == "keep me\n"  # nothing overwritten


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--risk", "1.5"], "--risk must lie in (0, 1), got 1.5"),
        (["--risk", "0"], "--risk must lie in (0, 1), got 0"),
        (["--alpha", "1"], "--alpha must lie in (0, 1), got 1"),
        (["--alpha", "-0.1"], "--alpha must lie in (0, 1), got -0.1"),
        (["--risk", "0.1", "--coverage", "0.5"], "give --risk or --coverage, not both"),
    ],
)
@pytest.mark.parametrize("command", ["predict", "calibrate"])
def test_targets_outside_the_unit_interval_exit_2(calibrated, questions, tmp_path, flags, message, command):
    run, _ = calibrated
    extra = ["-i", questions, "-o", tmp_path / "d.jsonl"] if command == "predict" else []
    res = _invoke(command, run, *extra, "--no-progress", *flags)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "d.jsonl").exists()


@for_entry("polar-vbll predict --workers")
def test_an_unreachable_ray_address_fails_before_any_work(calibrated, questions, tmp_path):
    run, _ = calibrated
    t = time.perf_counter()
    res = _invoke("predict", run, "-i", questions, "-o", tmp_path / "d.jsonl", "--no-progress",
                  "--address", "127.0.0.1:9")  # fmt: skip
    assert res.exit_code == 2 and "cannot reach a Ray cluster at 127.0.0.1:9" in res.output, res.output
    assert time.perf_counter() - t < 20 and not (tmp_path / "d.jsonl").exists()


def test_output_may_not_be_the_input(calibrated, questions):
    run, _ = calibrated
    res = _invoke("predict", run, "-i", questions, "-o", questions, "--no-progress")
    assert res.exit_code == 2 and "is the input file" in res.output


def test_every_run_reports_the_decision_metrics(run):
    """results.json's decision block against the rule recomputed by hand from the saved predictions."""
    results = json.loads((run / "results.json").read_text())
    dec, m = results["metrics"]["decision"], results["metrics"]
    preds = load_file(str(run / "predictions.safetensors"))
    val, ev = load_task("arc_easy", "validation", seed=0, limit=40), load_task("arc_easy", "test", seed=0, limit=32)
    yv, ye = torch.tensor([e.answer for e in val]), torch.tensor([e.answer for e in ev])
    ke = np.array([e.num_choices for e in ev])
    for score in ("lac", "aps"):
        cs = ConformalSets.calibrate(preds["validation_probs"], yv, 0.1, score)
        assert dec[score] == pytest.approx(set_metrics(cs.predict_sets(preds["eval_probs"], ke), ye))
    # AURC of the evaluation split by hand: mean over k of the error rate of the k most confident
    p = preds["eval_probs"].double()
    order = torch.argsort(-p.max(1).values, stable=True)
    wrong = (p.argmax(1) != ye)[order].double()
    expected = float((wrong.cumsum(0) / torch.arange(1, len(ye) + 1)).mean())
    assert m["eval"]["aurc"] == pytest.approx(expected)
    assert (run / "risk_coverage.png").stat().st_size > 10_000


@pytest.mark.parametrize("method", ["polar_mle", "laplace", "mc_dropout", "ensemble"])
def test_every_kind_of_run_decides_with_its_own_predictive(tmp_path, method):
    """Deterministic heads (with their temperature), a post-hoc Laplace head (refitted as the run did), MC
    dropout (seeded passes) and an ensemble (members swapped in) all give the run's own test predictive."""
    from polar_vbll.temperature import apply_temperature

    res = _invoke("train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path}",
                  "--set", f"method={method}", "--set", "data.val_limit=40", "--set", "eval.ensemble_members=2",
                  "--set", "eval.mc_dropout_samples=3")  # fmt: skip
    assert res.exit_code == 0, res.output
    run = tmp_path / "tiny"
    assert _invoke("calibrate", run, "--no-progress", "--coverage", "0.5").exit_code == 0
    ex = load_task("arc_easy", "test", seed=0, limit=32)
    q = _write(tmp_path / "q.jsonl", [{"question": e.question, "choices": list(e.choices), "answer": e.answer}
                                      for e in ex])  # fmt: skip
    out = tmp_path / "d.jsonl"
    res = _invoke("predict", run, "-i", q, "-o", out, "--no-progress", "--batch-size", "32")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    own = load_file(str(run / "predictions.safetensors"))["eval_probs"]
    scaled = json.loads((run / "results.json").read_text())["metrics"]["temperature_scaled"]
    if scaled:  # the MLE methods decide with their validation-fitted temperature
        own = apply_temperature(own, scaled["temperature"])
    for i, r in enumerate(recs):
        np.testing.assert_allclose(r["probs"], own[i, : len(ex[i].choices)].numpy(), atol=1e-5)
    has_epistemic = method in ("laplace", "mc_dropout", "ensemble")
    assert any(r["epistemic"] > 0 for r in recs) == has_epistemic
    rule = json.loads((run / "decision" / "rule.json").read_text())
    assert rule["ood"]["score"] == ("epistemic" if has_epistemic else "msp")


def test_too_few_calibration_questions_for_alpha_says_so(calibrated):
    run, _ = calibrated
    res = _invoke("calibrate", run, "--no-progress", "--coverage", "0.5", "--alpha", "0.01")
    assert res.exit_code == 2, res.output
    assert "40 calibration questions are too few for alpha 0.01: conformal sets need at least 100" in res.output
    assert json.loads((run / "decision" / "rule.json").read_text())["conformal"]["lac"]["alpha"] != 0.01


def test_a_rule_that_answers_nothing_is_said_at_predict_time(calibrated, questions, tmp_path):
    run, _ = calibrated
    res = _invoke("predict", run, "-i", questions, "-o", tmp_path / "d.jsonl", "--no-progress", "--risk", "0.01")
    assert res.exit_code == 0, res.output
    assert "warning: the rule abstains on every question" in res.output and "0 answered" in res.output


def test_a_missing_run_folder_says_it_does_not_exist(tmp_path, questions):
    res = _invoke("predict", tmp_path / "nope", "-i", questions, "-o", tmp_path / "d.jsonl", "--no-progress")
    assert res.exit_code == 2 and "nope does not exist" in res.output


def test_the_api_calibrates_on_dicts(calibrated):
    from polar_vbll.decisions.rule import RuleSettings
    from polar_vbll.errors import DataError
    from polar_vbll.predictor import Predictor

    run, _ = calibrated
    ex = load_task("arc_easy", "validation", seed=0, limit=40)
    rows = [{"question": e.question, "choices": list(e.choices), "answer": e.answer} for e in ex]
    p = Predictor.from_run(run, need_rule=False)
    rule = p.calibrate(RuleSettings(coverage=0.5), rows)
    assert rule.threshold.n == 40 and rule.meta["source"] == "questions given through the Python API"
    with pytest.raises(DataError, match="calibration question 1, field 'answer': missing"):
        p.calibrate(RuleSettings(coverage=0.5), [rows[0], {"question": "q", "choices": ["a", "b"]}])
    assert _invoke("calibrate", run, "--no-progress", "--coverage", "0.5").exit_code == 0  # restore


# ------------------------------------------------------------ data that cannot mean what it says (#21)
def _every_reader(run, tmp_path, choices):
    """Feed one question with ``choices`` (line 3 of a file, after a good row and a blank line) to every
    reader of multiple-choice rows; yields (reader, the one line it refused with or raised)."""
    from polar_vbll.decisions.rule import RuleSettings
    from polar_vbll.errors import DataError
    from polar_vbll.predictor import Predictor
    from polar_vbll.tasks import MCExample, load_jsonl

    good = {"question": "Which is even?", "choices": ["1", "2"], "answer": 1}
    bad = {"question": "Which one?", "choices": choices, "answer": 0}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")

    def raised(fn):
        with pytest.raises(DataError) as info:
            fn()
        return str(info.value)

    yield "MCExample", raised(lambda: MCExample(uid="u", question="q", choices=tuple(choices), answer=0, source="t"))
    yield "load_jsonl", raised(lambda: load_jsonl(path))
    yield "load_task", raised(lambda: load_task(f"jsonl:{path}", "all"))
    out = tmp_path / "d.jsonl"
    for command, args in [("train", ["--config", "tiny", "--no-track", "--no-progress", "--set",
                                     f"output_dir={tmp_path / 'runs'}", "--set", f"data.task=jsonl:{path}"]),
                          ("predict", [run, "-i", path, "-o", out, "--no-progress"]),
                          ("calibrate", [run, "--data", path, "--no-progress", "--coverage", "0.5"])]:  # fmt: skip
        before = (run / "decision" / "rule.json").read_text()
        res = _invoke(command, *args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert not out.exists() and not (tmp_path / "runs").exists()  # nothing written, no run folder
        assert (run / "decision" / "rule.json").read_text() == before
        yield command, res.output.strip()
    p = Predictor.from_run(run)
    yield "Predictor.predict", raised(lambda: p.predict([good, bad]))
    yield "Predictor.calibrate", raised(lambda: p.calibrate(RuleSettings(coverage=0.5), [good, bad]))


FILE_READERS = ("load_jsonl", "load_task", "train", "predict", "calibrate")


@pytest.mark.parametrize(
    "choices, field, problem",
    [
        (["no", "yes\nC) maybe"], "choices[1]", "choice B holds a line break (U+000A) at character 4"),
        (["no", "yes\r\nmaybe"], "choices[1]", "choice B holds a line break (U+000D)"),
        (["no", "yes\u2028maybe"], "choices[1]", "choice B holds a line break (U+2028)"),
        (["no\tway", "yes"], "choices[0]", "choice A holds a control character (U+0009) at character 3"),
        (["AgNO3 \x02+ NaCl", "yes"], "choices[0]", "choice A holds a control character (U+0002)"),
        (["no", "yes \x80\x93 sure"], "choices[1]", "choice B holds a control character (U+0080)"),  # C1
    ],
)
def test_a_choice_with_a_control_character_is_refused_on_every_reader(calibrated, tmp_path, choices, field, problem):
    run, _ = calibrated
    for reader, message in _every_reader(run, tmp_path, choices):
        where = f"{tmp_path / 'rows.jsonl'}, line 3, " if reader in FILE_READERS else ""
        assert f"{where}field '{field}': {problem}" in message, (reader, message)
        assert "\n" not in message, (reader, message)  # one line, the choice shown escaped


@pytest.mark.parametrize(
    "choices, shown",
    [
        (["cat", "dog", "cat"], "choices A and C are the same text 'cat'"),
        (["New York", "Paris", " New  York "], "choices A and C are the same text ' New  York '"),  # whitespace
        (["x\u00a0y", "x y"], "choices A and B are the same text 'x y'"),  # a no-break space (NFKC)
        (["ＡＢ", "AB"], "choices A and B are the same text 'AB'"),  # full-width letters (NFKC)
    ],
)
def test_duplicate_choices_are_refused_on_every_reader(calibrated, tmp_path, choices, shown):
    run, _ = calibrated
    for reader, message in _every_reader(run, tmp_path, choices):
        where = f"{tmp_path / 'rows.jsonl'}, line 3, " if reader in FILE_READERS else ""
        assert f"{where}field 'choices': {shown}" in message, (reader, message)


def test_choices_that_differ_only_in_case_are_different_answers_on_every_reader(calibrated, tmp_path):
    """Case counts (genotypes Rr / rr, numerals II / ii are different answers in the shipped benchmarks):
    every reader accepts them."""
    from polar_vbll.decisions.rule import RuleSettings
    from polar_vbll.predictor import Predictor
    from polar_vbll.tasks import MCExample, load_jsonl

    run, _ = calibrated
    rows = [{"question": f"Which genotype {i}?", "choices": ["Rr", "rr", "RR"], "answer": i % 3} for i in range(12)]
    path = _write(tmp_path / "case.jsonl", rows)
    assert MCExample(uid="u", question="q", choices=("II", "ii"), answer=1, source="t").choices == ("II", "ii")
    assert [e.answer for e in load_jsonl(path)] == [i % 3 for i in range(12)]
    res = _invoke("predict", run, "-i", path, "-o", tmp_path / "d.jsonl", "--no-progress")
    assert res.exit_code == 0, res.output
    p = Predictor.from_run(run)
    assert len(p.predict(rows)) == 12
    assert p.calibrate(RuleSettings(coverage=0.5), rows).threshold.n == 12
    assert _invoke("calibrate", run, "--no-progress", "--coverage", "0.5").exit_code == 0  # restore


def test_a_single_class_calibration_set_is_warned_about_and_calibrates(calibrated, tmp_path):
    """Decision calibration still holds for questions drawn like these, so one answer class is a warning
    (naming the file, the count and the class), not a refusal; two classes are not warned about."""
    import warnings as _warnings

    from polar_vbll.decisions.rule import RuleSettings
    from polar_vbll.predictor import Predictor

    run, _ = calibrated
    ex = [e for e in load_task("arc_easy", "validation", seed=0) if e.answer == 1][:15]
    rows = [{"question": e.question, "choices": list(e.choices), "answer": e.answer} for e in ex]
    f = _write(tmp_path / "all_b.jsonl", rows)
    with pytest.warns(UserWarning, match=f"^{f}: all 15 calibration questions are answered B; "):
        res = _invoke("calibrate", run, "--data", f, "--no-progress", "--coverage", "0.5", "--alpha", "0.2")
    assert res.exit_code == 0 and "calibrated on 15 questions" in res.output, res.output
    p = Predictor.from_run(run, need_rule=False)
    with pytest.warns(UserWarning, match="^questions given through the Python API: all 15 calibration questions"):
        p.calibrate(RuleSettings(coverage=0.5, alpha=0.2), rows)
    mixed = rows[:14] + [{"question": "Which is even?", "choices": ["1", "2", "3"], "answer": 0}]
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        p.calibrate(RuleSettings(coverage=0.5, alpha=0.2), mixed)
    assert _invoke("calibrate", run, "--no-progress", "--coverage", "0.5").exit_code == 0  # restore


# ------------------------------------------------------------------------------ streamed JSONL inputs
def _question_rows(n: int, text: str = "q") -> list[dict]:
    return [{"id": f"r{i}", "question": f"{text} {i}?", "choices": ["yes", "no", "maybe"]} for i in range(n)]


def test_a_jsonl_input_is_checked_in_one_pass_and_read_back_chunk_by_chunk(run, tmp_path):
    """Chunk starts (byte offset, line) by hand for a file with a BOM and blank lines; each chunk read back
    equals read_questions' slice of the whole file."""
    from polar_vbll.predict_io import Chunk, chunked, read_questions, scan_questions, streamed_path
    from polar_vbll.saved import check_run_folder

    folder = check_run_folder(run)
    lines = [json.dumps(r) for r in _question_rows(7)]
    body = [lines[0], lines[1], "", lines[2], lines[3], "  ", lines[4], lines[5], lines[6]]  # 9 lines, 2 blank
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(body).encode() + b"\n")
    offsets = [3]  # after the BOM
    for ln in body[:-1]:
        offsets.append(offsets[-1] + len(ln.encode()) + 1)
    qf = scan_questions(str(path), folder, 3)
    assert qf.total == 7
    # chunk 1: file lines 1, 2, 4; chunk 2: lines 5, 7, 8; chunk 3: line 9
    assert qf.chunks == (Chunk(0, 1, 3), Chunk(offsets[4], 5, 3), Chunk(offsets[8], 9, 1))
    whole = chunked(read_questions(str(path), folder), 3)
    assert [qf.read(c) for c in qf.chunks] == [list(c) for c in whole]
    assert [q.line for q in qf.read(qf.chunks[1])] == [5, 7, 8]
    assert streamed_path(str(path)) == str(path) and streamed_path(f"jsonl:{path}") == str(path)
    assert streamed_path(f"csv:{path}") is None and streamed_path(f"{path}.gz") is None
    path.write_text("\n".join(lines[:4]) + "\n")  # the file shrinks between the check and the prediction
    with pytest.raises(Exception, match="changed while it was being read"):
        qf.read(qf.chunks[2])


def test_the_workers_get_where_a_chunk_lies_not_its_questions(run, tmp_path):
    pytest.importorskip("ray")
    from distributed.batch_predict import _payload
    from polar_vbll.predict_io import scan_questions
    from polar_vbll.saved import check_run_folder

    path = _write(tmp_path / "q.jsonl", _question_rows(5))
    qf = scan_questions(str(path), check_run_folder(run), 2)
    assert json.loads(_payload(qf, 1)) == {"path": str(path.resolve()), "chunk": {"offset": path.read_text().index(
        '{"id": "r2"'), "line": 3, "count": 2}}  # fmt: skip


def test_the_summary_of_records_chunk_by_chunk_is_the_summary_of_all(calibrated, questions, tmp_path):
    from polar_vbll.predictor import SummaryAccumulator, summary

    run, _ = calibrated
    out = tmp_path / "d.jsonl"
    res = _invoke("predict", run, "-i", questions, "-o", out, "--no-progress", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    acc = SummaryAccumulator()
    for i in range(0, len(records), 5):
        acc.update(records[i : i + 5])
    whole, chunked_ = summary(records), acc.result()
    assert whole.keys() == chunked_.keys() and whole["with_answer"] == 16
    for k, v in whole.items():
        assert chunked_[k] == (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v), k
    labelled = [r for r in records if "label" in r]  # by hand: accuracy and coverage
    assert whole["accuracy"] == pytest.approx(sum(r["probs"].index(max(r["probs"])) == ord(r["label"]) - 65
                                                  for r in labelled) / 16)  # fmt: skip


@pytest.mark.slow  # two predictions of 5,000 and 20,000 long questions on the tiny model, one process each
def test_predict_holds_a_chunk_not_the_file(calibrated, tmp_path):
    """The peak memory of ``polar-vbll predict`` (one process, its own VmHWM) hardly grows when the
    input grows 4x (15,000 more rows of ~2 KB: 30 MB more file); holding the questions would add more than
    that."""
    from tests.child_peak import run_cli_measured

    run, _ = calibrated
    peaks = {}
    for n in (5000, 20000):
        path = _write(tmp_path / f"q{n}.jsonl", _question_rows(n, "why " * 500))
        args = ["predict", str(run), "-i", str(path), "-o", str(tmp_path / f"d{n}.jsonl"), "--no-progress"]
        res, peaks[n] = run_cli_measured(args)
        assert res.returncode == 0, res.stderr[-2000:]
        assert len((tmp_path / f"d{n}.jsonl").read_text().splitlines()) == n
    grown = (tmp_path / "q20000.jsonl").stat().st_size - (tmp_path / "q5000.jsonl").stat().st_size
    assert grown > 25e6 and peaks[20000] - peaks[5000] < grown / 3, (peaks, grown)
