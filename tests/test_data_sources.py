"""Data through Hugging Face ``datasets`` (issue #23): ``hf:`` (a save_to_disk folder, a cached hub id),
``csv:``, ``parquet:`` and ``json:`` sources with a column mapping load to the same questions as the JSONL
file they were written from, split by the documented rule, fail in one line naming the source, the row and
the column, train, and feed the predictor (as do DataFrames, Arrow tables and dicts). Every file is written
here, in a temporary folder; nothing is downloaded (the hub cache is laid out by hand)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from polar_vbll.config import absolute_task, load_config, packaged_config
from polar_vbll.errors import ConfigError, DataError, UserInputError
from polar_vbll.tasks import hf_source, load_task
from polar_vbll.tasks.registry import split_sizes, task_provenance
from polar_vbll_cli.app import app

datasets = pytest.importorskip("datasets")
runner = CliRunner()
SPLITS = ("train", "validation", "test")
N = 20


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    """The datasets cache and the hub cache in this test's folder (read when a source is opened)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    hf_source._OPENED.clear()


def _rows(n: int = N) -> list[dict]:
    """Our JSONL rows: the answer's place rotates (A, B, C), one in four rows has a passage."""
    rows = []
    for i in range(n):
        choices = [f"{i + k} apples" for k in range(3)]
        row = {"id": f"q{i:02d}", "question": f"How many apples in basket {i}?", "choices": choices, "answer": i % 3}
        if i % 4 == 0:
            row["context"] = f"Basket {i} holds {i + i % 3} apples."
        rows.append(row)
    return rows


def _jsonl(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def _theirs(rows: list[dict], labels: str = "index") -> pd.DataFrame:
    """The same rows as a source would name them: text / opt_a..opt_c / label / passage / uid."""
    label = {"index": lambda r: r["answer"], "float": lambda r: float(r["answer"]),
             "letter": lambda r: "ABC"[r["answer"]], "text": lambda r: r["choices"][r["answer"]]}[labels]  # fmt: skip
    return pd.DataFrame([{"uid": r["id"], "text": r["question"], "opt_a": r["choices"][0], "opt_b": r["choices"][1],
                          "opt_c": r["choices"][2], "label": label(r), "passage": r.get("context"),
                          "subject": "apples"} for r in rows])  # fmt: skip


COLUMNS = {"id": "uid", "question": "text", "choices": ["opt_a", "opt_b", "opt_c"], "answer": "label",
           "context": "passage"}  # fmt: skip
LIST_COLUMNS = {"id": "uid", "question": "text", "choices": "options", "answer": "label", "context": "passage"}


def _as_list_column(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.drop(columns=["opt_a", "opt_b", "opt_c"])
    out["options"] = [[a, b, c] for a, b, c in zip(frame.opt_a, frame.opt_b, frame.opt_c, strict=True)]
    return out


def _key(examples):
    return [(e.uid, e.question, e.choices, e.answer, e.context) for e in examples]


def _write_source(tmp_path, kind: str, frame: pd.DataFrame) -> str:
    if kind == "csv":
        frame.to_csv(tmp_path / "data.csv", index=False)
        return f"csv:{tmp_path / 'data.csv'}"
    if kind == "parquet":
        frame.to_parquet(tmp_path / "data.parquet")
        return f"parquet:{tmp_path / 'data.parquet'}"
    if kind == "json":
        frame.to_json(tmp_path / "data.json", orient="records", lines=True)
        return f"json:{tmp_path / 'data.json'}"
    if kind == "hf":
        datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(tmp_path / "saved"))
        return f"hf:{tmp_path / 'saved'}"
    raise AssertionError(kind)


# ------------------------------------------------------------------------------- the same questions
@pytest.mark.parametrize(
    ("kind", "labels", "list_column"),
    [("csv", "letter", False), ("csv", "float", False), ("parquet", "index", True), ("parquet", "float", False),
     ("json", "text", True), ("hf", "index", False), ("hf", "letter", True)],
)  # fmt: skip
def test_each_source_loads_the_questions_of_the_jsonl_file(tmp_path, kind, labels, list_column):
    """Labels as an index, an integral float, a letter or the choice's text; choices from one list column
    or three columns; every split equals the JSONL file's (same seeded 60/20/20 cut)."""
    rows = _rows()
    frame = _theirs(rows, labels)
    if list_column:
        frame = _as_list_column(frame)
    name = _write_source(tmp_path, kind, frame)
    columns = LIST_COLUMNS if list_column else COLUMNS
    for split in SPLITS:
        expected = _key(load_task(_jsonl(tmp_path, rows), split, seed=3))
        got = load_task(name, split, seed=3, columns=columns)
        assert _key(got) == expected, (kind, split)
        assert {e.source for e in got} == {name}
    assert split_sizes(name, columns=columns) == {"train": 12, "validation": 4, "test": 4, "all": 20}


def test_our_column_names_need_no_mapping_and_default_ids_count_rows(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in _rows(5)]
    pd.DataFrame(rows).to_parquet(tmp_path / "ours.parquet")
    got = load_task(f"parquet:{tmp_path / 'ours.parquet'}", "all")
    assert sorted(e.uid for e in got) == [f"row-{i}" for i in range(1, 6)]
    assert {e.uid: e.answer for e in got} == {f"row-{i + 1}": i % 3 for i in range(5)}


# --------------------------------------------------------------------------------------- the splits
def test_named_splits_are_used_and_a_missing_one_is_cut_from_train(tmp_path):
    frame = _theirs(_rows(30))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame[:20], preserve_index=False),
                               "test": datasets.Dataset.from_pandas(frame[20:], preserve_index=False)})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "dd"))
    name = f"hf:{tmp_path / 'dd'}"
    train, val, test = (load_task(name, s, seed=1, columns=COLUMNS) for s in SPLITS)
    assert len(train) == 16 and len(val) == 4  # validation cut 80/20 from the shipped train split
    assert {e.uid for e in train} | {e.uid for e in val} == {f"q{i:02d}" for i in range(20)}
    assert not {e.uid for e in train} & {e.uid for e in val}
    assert sorted(e.uid for e in test) == [f"q{i:02d}" for i in range(20, 30)]  # shipped, used whole
    # a run whose validation split is `test` reads every shipped split whole: nothing is cut
    assert len(load_task(name, "train", columns=COLUMNS, wanted=("train", "test", "test"))) == 20
    assert len(load_task(name, "train", columns=COLUMNS, wanted=("train", "test", "held_out"))) == 16
    prov = task_provenance(name, COLUMNS)
    assert prov["resolved_from"] == "save_to_disk" and prov["splits"] == {"train": 20, "test": 10}
    assert prov["cut"] == {"from": "train", "fractions": {"train": 0.8, "validation": 0.2}}
    assert prov["columns_ignored"] == ["subject"]


def test_a_cached_hub_dataset_resolves_offline_with_its_revision(tmp_path):
    repo = tmp_path / "hf-hub" / "datasets--acme--apples"
    snap = repo / "snapshots" / "0123abcd"
    (snap / "data").mkdir(parents=True)
    frame = _theirs(_rows(30), "letter")
    frame[:24].to_parquet(snap / "data" / "train-00000-of-00001.parquet")
    frame[24:].to_parquet(snap / "data" / "test-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    test = load_task("hf:acme/apples", "test", columns=COLUMNS)
    assert sorted(e.uid for e in test) == [f"q{i:02d}" for i in range(24, 30)]
    assert {e.uid: e.answer for e in test}["q25"] == 25 % 3
    prov = task_provenance("hf:acme/apples", COLUMNS)
    assert prov["id"] == "acme/apples" and prov["revision"] == "0123abcd" and prov["resolved_from"] == "hub cache"
    assert absolute_task("hf:acme/apples") == "hf:acme/apples"  # a hub id stays an id


def test_an_id_absent_from_the_cache_is_one_line_naming_it_and_offline_mode(tmp_path):
    with pytest.raises(DataError) as info:
        load_task("hf:acme/pears", "train")
    msg = str(info.value)
    assert "\n" not in msg and "hf:acme/pears" in msg and "HF_HUB_OFFLINE" in msg and "never downloaded" in msg


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    assert absolute_task("csv:d.csv") == f"csv:{tmp_path / 'd.csv'}"
    assert absolute_task("hf:folder") == f"hf:{tmp_path / 'folder'}"
    assert absolute_task("hf:folder:main") == f"hf:{tmp_path / 'folder'}:main"


# -------------------------------------------------------------------------------- one-line errors
def _bad(tmp_path, frame, columns=COLUMNS, kind="csv") -> str:
    name = _write_source(tmp_path, kind, frame)
    hf_source._OPENED.clear()
    with pytest.raises(DataError) as info:
        load_task(name, "train", columns=columns)
    msg = str(info.value)
    assert "\n" not in msg and name in msg, msg
    return msg[len(name) :]


def test_bad_rows_and_columns_name_the_row_and_the_column(tmp_path):
    frame = _theirs(_rows())
    f = frame.copy()
    f["label"] = f["label"].astype(float)
    f.loc[2, "label"] = 1.5
    assert _bad(tmp_path, f).startswith(", row 3, column 'label' (answer): must be an integer index")
    f.loc[2, "label"] = float("nan")
    assert _bad(tmp_path, f, kind="parquet") == ", row 3, column 'label' (answer): empty (null, or NaN: an empty " \
                                               "cell); this row needs an answer"
    assert _bad(tmp_path, f, kind="csv").startswith(", row 3, column 'label' (answer): empty")
    f = _theirs(_rows(), "letter")
    f.loc[4, "label"] = "D"
    assert _bad(tmp_path, f) == ", row 5, column 'label' (answer): letter 'D' is outside the 3 choices (labels A..C)"
    f = _theirs(_rows())
    f.loc[6, "opt_b"] = "7 apples\nC) pears"
    assert _bad(tmp_path, f, kind="parquet").startswith(
        ", row 7, column 'opt_b' (choices[1]): choice B holds a line break")
    f = _theirs(_rows())
    f.loc[9, "uid"] = "q01"
    assert _bad(tmp_path, f).startswith(", row 10, column 'uid' (id): 'q01' is already used (row 2)")
    assert _bad(tmp_path, frame, {**COLUMNS, "answer": "labels"}) == (
        ", column 'labels' (data.columns.answer): no such column; the columns are ['uid', 'text', 'opt_a', "
        "'opt_b', 'opt_c', 'label', 'passage', 'subject'] (did you mean 'label'?)")  # fmt: skip
    no_question = {k: v for k, v in COLUMNS.items() if k != "question"}
    assert _bad(tmp_path, frame, no_question).startswith(": no column for 'question'; map one with data.columns")
    typo = frame.rename(columns={"passage": "contxt"})
    msg = _bad(tmp_path, typo, {k: v for k, v in COLUMNS.items() if k != "context"})
    assert msg.startswith(", column 'contxt': not read, but named like the field 'context'"), msg


def test_unreadable_and_missing_files_are_one_line(tmp_path):
    (tmp_path / "bin.parquet").write_bytes(b"\xff\xfe not parquet")
    for name, fragment in [(f"parquet:{tmp_path / 'bin.parquet'}", "cannot be read as PARQUET"),
                           (f"csv:{tmp_path / 'none.csv'}", "no such file"),
                           (f"hf:{tmp_path / 'none'}", "no such folder")]:  # fmt: skip
        with pytest.raises(DataError) as info:
            load_task(name, "train")
        assert "\n" not in str(info.value) and str(info.value).startswith(name) and fragment in str(info.value)


def test_the_column_mapping_is_checked_in_the_config(tmp_path):
    base = packaged_config("run", "tiny")
    with pytest.raises(ConfigError, match=r"data.columns: 'anwser' is not one of our fields \(did you mean 'answer'"):
        load_config(base, [f"data.task=csv:{tmp_path}/d.csv", "data.columns={anwser: label}"])
    with pytest.raises(ConfigError, match="data.columns maps the columns of an hf:, csv:, parquet: or json: source"):
        load_config(base, ["data.columns={answer: label}"])
    with pytest.raises(ConfigError, match="a list must name at least 2 columns"):
        load_config(base, [f"data.task=csv:{tmp_path}/d.csv", "data.columns={choices: [a]}"])
    cfg = load_config(base, ["data.task=csv:d.csv", "data.columns={choices: [a, b], answer: gold}"])
    assert cfg.data.columns == {"choices": ["a", "b"], "answer": "gold"}
    assert cfg.data.task == f"csv:{os.path.abspath('d.csv')}"
    with pytest.raises(UserInputError, match="applies to hf:, csv:, parquet: and json: sources"):
        load_task("sst2", "train", columns={"answer": "label"})


# ------------------------------------------------------------------------ training and prediction
def _train(out, *sets: str):
    args = ["train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={out}",
            "--set", "train.steps=2", "--set", "data.train_limit=null", "--set", "data.val_limit=null",
            "--set", "data.eval_limit=null"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def test_train_on_a_csv_file(tmp_path):
    name = _write_source(tmp_path, "csv", _theirs(_rows(30), "letter"))
    res = _train(tmp_path / "runs", f"data.task={name}", "data.columns=" + json.dumps(COLUMNS))
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    results = json.loads((run / "results.json").read_text())
    assert results["split_sizes"] == {"train": 18, "validation": 6, "eval": 6}
    params = json.loads((run / "params.json").read_text())
    assert params["data.resolved.kind"] == "csv" and params["data.resolved.splits"] == {"train": 30}
    assert params["data.columns.choices"] == ["opt_a", "opt_b", "opt_c"]


def test_a_bad_row_stops_train_in_one_line_before_anything_is_written(tmp_path):
    frame = _theirs(_rows(), "letter")
    frame.loc[7, "label"] = "Z"
    name = _write_source(tmp_path, "csv", frame)
    res = _train(tmp_path / "runs", f"data.task={name}", "data.columns=" + json.dumps(COLUMNS))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"error: {name}, row 8, column 'label' (answer): letter 'Z' is outside the 3 choices (labels A..C)")
    assert not (tmp_path / "runs").exists()
    res = _train(tmp_path / "runs", "data.task=hf:acme/nothing")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in res.output
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A PoLAR-VBLL run trained on a save_to_disk DatasetDict (train / test; validation cut from train)
    through a column mapping, then calibrated."""
    tmp = tmp_path_factory.mktemp("hf_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(tmp / "hf-datasets"))
        return _hf_run(tmp)


def _hf_run(tmp):
    frame = _as_list_column(_theirs(_rows(60)))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame[:50], preserve_index=False),
                               "test": datasets.Dataset.from_pandas(frame[50:], preserve_index=False)})  # fmt: skip
    dd.save_to_disk(str(tmp / "saved"))
    res = _train(tmp / "runs", f"data.task=hf:{tmp / 'saved'}", "data.columns=" + json.dumps(LIST_COLUMNS),
                 "method=polar_vbll")  # fmt: skip
    assert res.exit_code == 0, res.output
    run = tmp / "runs" / "tiny"
    res = runner.invoke(app, ["calibrate", str(run), "--no-progress", "--coverage", "0.5"])
    assert res.exit_code == 0, res.output
    return run, frame


def test_train_on_a_save_to_disk_folder_with_a_column_mapping(hf_run):
    run, _ = hf_run
    results = json.loads((run / "results.json").read_text())
    assert results["split_sizes"] == {"train": 40, "validation": 10, "eval": 10}
    params = json.loads((run / "params.json").read_text())
    assert params["data.resolved.resolved_from"] == "save_to_disk"
    assert params["data.resolved.splits"] == {"train": 50, "test": 10}
    assert params["data.resolved.cut"] == {"from": "train", "fractions": {"train": 0.8, "validation": 0.2}}
    assert params["data.resolved.columns_read"]["choices"] == "options"


def test_a_dataframe_with_float_answers_predicts(hf_run):
    from polar_vbll.predictor import Predictor

    run, frame = hf_run
    p = Predictor.from_run(run)
    df = frame[50:].copy()  # the run's own columns (text, options, label as float, ...)
    df["label"] = df["label"].astype(float)
    df.loc[df.index[1], "label"] = float("nan")  # no answer for this one
    recs = p.predict(df)
    assert [r["id"] for r in recs] == list(df["uid"])
    assert [r.get("label") for r in recs] == ["ABC"[int(v)] if v == v else None for v in df["label"]]
    # the same questions as our own rows, as an Arrow table, and through an explicit mapping
    ours = [{"id": u, "question": q, "choices": list(o), "answer": int(a),
             "context": c if isinstance(c, str) else None} for u, q, o, a, c in
            zip(frame.uid[50:], frame.text[50:], frame.options[50:], frame.label[50:], frame.passage[50:],
                strict=True)]  # fmt: skip
    ours[1].pop("answer")
    assert sum(r["context"] is not None for r in ours) == 2  # q52, q56: a passage (pandas 3: NaN elsewhere)
    assert p.predict(ours) == recs
    assert p.predict(pa.Table.from_pandas(df, preserve_index=False)) == recs
    assert p.predict(df.rename(columns={"text": "q"}), columns={**LIST_COLUMNS, "question": "q"}) == recs
    preds, n_choices = p.predictive([ours[0]])  # dicts, not only MCExamples
    assert preds.probs.shape[0] == 1 and n_choices.tolist() == [3]
    assert preds.probs[0].tolist() == pytest.approx(recs[0]["probs"], abs=1e-6)
    with pytest.raises(DataError, match=r"^the DataFrame, index 51, column 'label' \(answer\): must be an integer"):
        p.predict(df.assign(label=[0.0, 2.5] + [1.0] * (len(df) - 2)))


def test_predict_input_takes_a_parquet_source(hf_run, tmp_path):
    run, frame = hf_run
    frame[50:].to_parquet(tmp_path / "q.parquet")
    out = tmp_path / "decisions.jsonl"
    res = runner.invoke(app, ["predict", str(run), "-i", f"parquet:{tmp_path / 'q.parquet'}", "-o", str(out),
                              "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in recs] == list(range(1, 11)) and [r["id"] for r in recs] == list(frame.uid[50:])
    bad = frame[50:].copy()
    bad["label"] = ["ABC"[v] for v in bad["label"]]
    bad.loc[bad.index[2], "label"] = "Q"
    bad.to_parquet(tmp_path / "bad.parquet")
    out.unlink()
    res = runner.invoke(app, ["predict", str(run), "-i", f"parquet:{tmp_path / 'bad.parquet'}", "-o", str(out),
                              "--no-progress"])  # fmt: skip
    assert res.exit_code == 2 and not out.exists(), res.output
    assert res.output.strip().startswith(f"error: parquet:{tmp_path / 'bad.parquet'}, row 3, column 'label' (answer):")
