"""A large training file's rows checked in one streaming pass and tokenised once into a memory-mapped cache
(issue #25 part 4, training side): the ids equal the in-memory encoding's exactly, the cache key follows
everything the ids depend on, a damaged entry is rebuilt, a bad row is reported before anything is
written."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from polar_vbll.config import ModelConfig
from polar_vbll.errors import DataError
from polar_vbll.features import encode_examples
from polar_vbll.models import load_tokenizer
from polar_vbll.tasks import load_jsonl, load_task, seeded_order, split_examples
from polar_vbll.tasks.file_rows import FileSplit, scan_jsonl
from polar_vbll.token_rows import TokenRows

LONG = " ".join(f"word{i}" for i in range(120))


def _rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"question": f"Is item {i} good?", "choices": ["no", "yes", "maybe"][: 2 + i % 2], "answer": i % 2}
        if i % 5 == 0:
            row["context"] = f"Passage {i}. " + (LONG if i % 10 == 0 else "short")
        if i % 7 == 0:
            row["question"] = LONG + " is it?"  # shortened at max_length 64
        if i % 3 == 0:
            row["id"] = f"q{i}"
        rows.append(row)
    return rows


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(source="tiny"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "tokens"
    monkeypatch.setenv("POLAR_VBLL_TOKEN_CACHE", str(root))
    return root


def _encode(name, examples, tok, max_length=64, add_bos=True):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        enc = encode_examples(name, examples, tok, max_length, add_bos)
    return enc, [str(w.message) for w in seen]


def test_memory_mapped_ids_equal_the_in_memory_encoding(tmp_path, tok, cache):
    """The oracle: every split of a file, through the cache, is the in-memory encoding, id for id, with
    the same labels, choice counts, shortened counts and warning."""
    path = _write(tmp_path / "data.jsonl", _rows())
    source = f"jsonl:{path}"
    listed = split_examples(load_jsonl(path, source), (("train", 0.6), ("validation", 0.2), ("test", 0.2)), seed=3)
    for split in ("train", "validation", "test"):
        lazy = load_task(source, split, seed=3)
        assert isinstance(lazy, FileSplit) and lazy == listed[split]
        for add_bos in (True, False):
            old, old_warn = _encode(split, listed[split], tok, add_bos=add_bos)
            new, new_warn = _encode(split, lazy, tok, add_bos=add_bos)
            assert isinstance(new.ids, TokenRows) and isinstance(new.ids[0], list)
            assert new.ids == old.ids and [list(r) for r in new.ids] == old.ids
            assert torch.equal(new.labels, old.labels) and torch.equal(new.n_choices, old.n_choices)
            assert new.shortened == old.shortened and new_warn == old_warn
            assert new.fingerprint() == old.fingerprint() and new.ids_digest() == old.ids_digest()
            assert new.ids.lengths().tolist() == [len(r) for r in old.ids]
    assert any(old.shortened.values()) or any(_encode("all", load_jsonl(path, source), tok)[0].shortened.values())
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # one entry per add_bos


def test_a_view_pickles_without_its_ids_and_slices(tmp_path, tok, cache):
    path = _write(tmp_path / "data.jsonl", _rows())
    enc, _ = _encode("train", load_task(f"jsonl:{path}", "train"), tok)
    blob = pickle.dumps(enc.ids)
    assert len(blob) < 2000 and pickle.loads(blob) == enc.ids
    assert enc.ids[1:4] == [enc.ids[1], enc.ids[2], enc.ids[3]] and enc.ids[-1] == enc.ids[len(enc.ids) - 1]
    with pytest.raises(IndexError):
        enc.ids[len(enc.ids)]


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def test_the_key_follows_the_file_the_tokenizer_the_length_and_the_template(tmp_path, tok, cache, monkeypatch):
    path = _write(tmp_path / "data.jsonl", _rows())
    source = f"jsonl:{path}"
    split = load_task(source, "train")
    first, _ = _encode("train", split, tok)
    entries = _entries(cache)
    assert len(entries) == 1
    stamp = (entries[0] / "meta.json").stat().st_mtime_ns
    again, _ = _encode("train", load_task(source, "train"), tok)  # a rerun hits the cache
    assert _entries(cache) == entries and (entries[0] / "meta.json").stat().st_mtime_ns == stamp
    assert again.ids == first.ids
    _encode("train", split, tok, max_length=80)
    assert len(_entries(cache)) == 2
    import polar_vbll.token_file as token_file

    monkeypatch.setattr(token_file, "TEMPLATE_VERSION", 999)
    _encode("train", split, tok)
    assert len(_entries(cache)) == 3
    monkeypatch.undo()
    monkeypatch.setenv("POLAR_VBLL_TOKEN_CACHE", str(cache))
    other = load_tokenizer(ModelConfig(source="tiny"))
    other.add_tokens(["<extra-token>"])
    _encode("train", split, other)
    assert len(_entries(cache)) == 4
    rows = _rows()
    rows[1]["question"] = "Is item 1 fine?"  # same file, one row edited
    _write(path, rows)
    edited, _ = _encode("train", load_task(source, "train"), tok)
    assert len(_entries(cache)) == 5
    assert edited.ids == _encode("train", split_examples(load_jsonl(path, source), (("train", 0.6),
                                 ("validation", 0.2), ("test", 0.2)))["train"], tok)[0].ids  # fmt: skip


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_a_damaged_entry_is_rebuilt_never_trusted(tmp_path, tok, cache, capsys, damage):
    path = _write(tmp_path / "data.jsonl", _rows())
    split = load_task(f"jsonl:{path}", "train")
    good, _ = _encode("train", split, tok)
    (entry,) = _entries(cache)
    ids = entry / "ids.bin"
    if damage == "truncate":
        ids.write_bytes(ids.read_bytes()[:-4])
    elif damage == "flip":
        blob = bytearray(ids.read_bytes())
        blob[8] ^= 0x01
        ids.write_bytes(bytes(blob))
    else:
        (entry / "meta.json").write_text("{")
    rebuilt, _ = _encode("train", load_task(f"jsonl:{path}", "train"), tok)
    assert "is damaged" in capsys.readouterr().out
    assert rebuilt.ids == good.ids and _entries(cache) == [entry]


def test_a_bad_row_names_file_line_and_field_and_nothing_is_written(tmp_path, tok, cache):
    rows = _rows()
    rows[30] = {"question": "q", "choices": ["a", "b"], "answr": 1}
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl, line 31, field 'answr': unknown key"):
        load_task(f"jsonl:{path}", "train")
    rows[30] = {"question": "q", "choices": ["a", "b"], "answer": 1, "id": "q3"}
    path = _write(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DataError, match=r"dup\.jsonl, line 31, field 'id': 'q3' is already used on line 4"):
        load_task(f"jsonl:{path}", "train")
    assert not cache.exists() or not list(cache.iterdir())


def test_an_unfittable_row_fails_only_the_split_that_holds_it(tmp_path, tok, cache):
    rows = _rows(10)
    rows[4] = {"question": "q?", "choices": [f"choice {i} " + LONG for i in range(20)], "answer": 0, "id": "huge"}
    path = _write(tmp_path / "data.jsonl", rows)
    source = f"jsonl:{path}"
    listed = load_jsonl(path, source)
    order = seeded_order(listed)
    where = [i for i, ex in enumerate(order) if ex.uid == "huge"][0]
    with pytest.raises(DataError) as old:
        encode_examples("all", order, tok, 64, True)
    with pytest.raises(DataError) as new:
        encode_examples("all", load_task(source, "all"), tok, 64, True)
    assert str(new.value) == str(old.value) and "'huge'" in str(new.value)
    rest = [i for i in range(len(order)) if i != where]
    kept = load_task(source, "all").select(rest)
    assert encode_examples("rest", kept, tok, 64, True).ids == encode_examples("rest", [order[i] for i in rest],
                                                                               tok, 64, True).ids  # fmt: skip


def test_scanned_columns_answer_without_reading_the_rows(tmp_path):
    path = _write(tmp_path / "data.jsonl", _rows())
    scan = scan_jsonl(path)
    assert scan_jsonl(path) is scan  # kept while the file is unchanged
    split = FileSplit(scan)
    listed = load_jsonl(path)
    assert split.uids == [e.uid for e in listed] and split.answers.tolist() == [e.answer for e in listed]
    assert split.max_choices() == 3 and list(split) == listed and split[5] == listed[5]
    assert isinstance(np.asarray(split.n_choices), np.ndarray)
