"""Task names -> examples: the one entry point the trainer and the CLI use (``load_task``).

Names: ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``winogrande``, ``boolq``, the learnable GLUE /
SuperGLUE sets ``sst2``, ``rte``, ``mrpc``, ``cb``, ``mmlu:<subject>``
(any of the 57 MMLU subjects), ``jsonl:<path>`` for a user's data (a file, split by seed, or a
directory of ``<split>.jsonl`` files) and the sources read through ``datasets`` (``hf:``, ``csv:``,
``parquet:``, ``json:``; ``polar_vbll.tasks.hf_source``). ``:`` separates a family from its argument, as in
the configs.

Each task declares its *pools* (the splits the data ships with) and how the requested splits come from
them: either a shipped pool as is, or a seeded cut of one pool (see ``splits``). Every split is returned
in a seeded shuffled order, so ``limit`` is a deterministic random subsample.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from polar_vbll.errors import UserInputError
from polar_vbll.files import check_name
from polar_vbll.tasks import builtin, hf_source
from polar_vbll.tasks.example import MCExample, num_classes
from polar_vbll.tasks.file_rows import FileSplit, scan_jsonl
from polar_vbll.tasks.jsonl import load_jsonl
from polar_vbll.tasks.splits import DEFAULT_SEED, apply_limit, seeded_order, split_counts, split_examples

Reader = Callable[[str], Sequence[MCExample]]  # data root -> the rows of one shipped split

TRAIN_VAL = (("train", 0.8), ("validation", 0.2))
TRAIN_VAL_TEST = (("train", 0.6), ("validation", 0.2), ("test", 0.2))
BUILTIN_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "winogrande", "boolq", "sst2", "rte", "mrpc", "cb")
MMLU_PREFIX = "mmlu:"
JSONL_PREFIX = "jsonl:"


@dataclass(frozen=True)
class TaskSpec:
    """How one task's splits are made.

    ``pools`` maps a shipped split to its reader; ``carve`` = (pool, fractions) is cut by seed into the
    named splits; ``shipped`` maps further split names to pools used whole. ``needs_root`` is False for
    user files, which do not need the data package.
    """

    name: str
    pools: Mapping[str, Reader]
    carve: tuple[str, tuple[tuple[str, float], ...]] | None = None
    shipped: Mapping[str, str] = field(default_factory=dict)
    needs_root: bool = True

    @property
    def splits(self) -> tuple[str, ...]:
        carved = tuple(name for name, _ in self.carve[1]) if self.carve else ()
        return carved + tuple(s for s in self.shipped if s not in carved)


def _builtin_spec(name: str) -> TaskSpec:
    b = builtin
    if name in ("arc_easy", "arc_challenge"):
        config = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
        pools = {
            "validation": _reader(b.load_labelled_mc, "ai2_arc", config, "validation", "question", name),
            "test": _reader(b.load_oe_test, name, name),
        }
        return TaskSpec(name, pools, ("validation", TRAIN_VAL), {"test": "test"})
    if name == "openbookqa":
        pools = {
            "validation": _reader(
                b.load_labelled_mc, "openbookqa", "main", "validation", "question_stem", name
            ),
            "test": _reader(b.load_oe_test, "openbookqa", name),
        }
        return TaskSpec(name, pools, ("validation", TRAIN_VAL), {"test": "test"})
    if name == "winogrande":
        return TaskSpec(
            name, {"validation": _reader(b.load_winogrande, name)}, ("validation", TRAIN_VAL_TEST)
        )
    if name == "boolq":
        return TaskSpec(name, {"validation": _reader(b.load_boolq, name)}, ("validation", TRAIN_VAL_TEST))
    if name in b.PAIR_TASKS:
        return TaskSpec(name, {"validation": _reader(b.load_pair_task, name, name)}, ("validation", TRAIN_VAL_TEST))
    raise AssertionError(name)


def _reader(fn: Callable[..., Sequence[MCExample]], *args: object) -> Reader:
    """A reader that calls ``fn(root, *args)``: pools stay lazy, so loading ``train`` never parses the
    test file."""
    return lambda root: fn(root, *args)


def _mmlu_spec(name: str, subject: str) -> TaskSpec:
    if subject not in builtin.MMLU_SUBJECTS:
        close = difflib.get_close_matches(subject, builtin.MMLU_SUBJECTS, n=3)
        hint = f" (did you mean {', '.join(MMLU_PREFIX + c for c in close)}?)" if close else ""
        raise UserInputError(
            f"unknown MMLU subject {subject!r}{hint}. The 57 subjects are: {', '.join(builtin.MMLU_SUBJECTS)}"
        )
    pools = {split: _reader(builtin.load_mmlu, subject, split, name) for split in builtin.MMLU_SPLITS}
    return TaskSpec(name, pools, None, {split: split for split in builtin.MMLU_SPLITS})


def _jsonl_spec(name: str, raw_path: str, fractions: Sequence[tuple[str, float]] | None) -> TaskSpec:
    if not raw_path:
        raise UserInputError("task 'jsonl:' needs a path, e.g. jsonl:data/my_task.jsonl")
    path = os.path.expanduser(raw_path)
    if os.path.isdir(path):
        if fractions is not None:
            raise UserInputError(
                f"{path} is a directory of per-split files; fractions apply to a single file"
            )
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")) + glob.glob(os.path.join(path, "*.jsonl.gz")))
        pools: dict[str, Reader] = {}
        for file in files:
            split = os.path.basename(file).split(".jsonl")[0]
            if split in pools:
                raise UserInputError(f"{path}: split {split!r} is given twice ({split}.jsonl and .jsonl.gz)")
            pools[split] = _user_reader(file, name)
        if not pools:
            raise UserInputError(
                f"{path}: directory holds no <split>.jsonl files (e.g. train.jsonl, test.jsonl)"
            )
        return TaskSpec(name, pools, None, {s: s for s in pools}, needs_root=False)
    pools = {"all": _user_reader(path, name)}
    return TaskSpec(
        name, pools, ("all", tuple(fractions or TRAIN_VAL_TEST)), {"all": "all"}, needs_root=False
    )


def _user_reader(path: str, source: str) -> Reader:
    """A reader for a user file (it ignores the data root: user data needs no data package): a plain file is
    checked in one streaming pass and kept as columns (``file_rows.FileSplit``, read back row by row); a
    gzipped one is loaded whole (``load_jsonl``)."""
    if path.endswith(".gz"):
        return lambda _root: load_jsonl(path, source=source)
    return lambda _root: FileSplit(scan_jsonl(path, source))


#: The split names a run asks for when the caller does not say (``train``, ``validation``, ``test``).
STANDARD_SPLITS = ("train", "validation", "test")


def _datasets_spec(
    name: str, fractions: Sequence[tuple[str, float]] | None, columns: Mapping[str, object] | None,
    wanted: Sequence[str] | None,
) -> TaskSpec:  # fmt: skip
    """The split rule of a ``datasets`` source (docs/data.md). ``wanted``: the run's train, validation and
    evaluation split names (default train, validation, test).

    - one split (a CSV, Parquet or JSON file; a dataset of one split): cut by seed like one JSONL file,
      into the wanted names (60/20/20) and ``all``;
    - several splits: each used whole under its own name; a wanted split the source lacks is cut, by seed,
      from the wanted training split (which then keeps the rest): 80/20 for one missing split, 60/20/20
      for two.
    """
    opened = hf_source.open_source(name)
    names = list(opened.splits)
    want = tuple(wanted or STANDARD_SPLITS)

    def reader(split: str) -> Reader:
        return lambda _root: hf_source.split_examples(name, split, columns)

    if len(names) == 1:
        cut = tuple(fractions) if fractions else _default_cut(want[0], [s for s in want[1:] if s != want[0]])
        return TaskSpec(name, {"all": reader(names[0])}, ("all", cut), {"all": "all"}, needs_root=False)
    pools = {s: reader(s) for s in names}
    shipped = {s: s for s in names}
    missing = list(dict.fromkeys(s for s in want[1:] if s not in names))
    if not missing:
        if fractions is not None:
            raise UserInputError(f"{name} ships every split the run reads ({list(want)}): fractions cut nothing")
        return TaskSpec(name, pools, None, shipped, needs_root=False)
    train = want[0]
    if train not in names:
        raise UserInputError(
            f"{name} has no split {train!r} to cut {missing} from; its splits are {names} "
            "(set data.train_split, data.val_split and data.eval_split to names it has)"
        )
    cut = tuple(fractions) if fractions else _default_cut(train, missing)
    return TaskSpec(name, pools, (train, cut), {s: s for s in names if s != train}, needs_root=False)


def _default_cut(train: str, others: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``train`` and the splits cut beside it: 60/20/20 for two others, 80/20 for one."""
    others = list(dict.fromkeys(others))
    if not others:
        raise UserInputError(f"the training split {train!r} cannot also be the validation and evaluation split")
    return tuple(zip([train, *others], (0.6, 0.2, 0.2) if len(others) == 2 else (0.8, 0.2), strict=True))


def _unknown_task(name: str) -> UserInputError:
    valid = list(BUILTIN_TASKS) + ["mmlu:<subject>", "jsonl:<path>", "hf:<folder|org/name>[:config]",
                                   "csv:<file>", "parquet:<file>", "json:<file>"]
    close = difflib.get_close_matches(name, available_tasks(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UserInputError(
        f"unknown task {name!r}.{hint} Valid names: {', '.join(valid)} "
        f"(MMLU subjects e.g. mmlu:college_chemistry, mmlu:college_physics; see docs/data.md)"
    )


def get_spec(
    name: str, fractions: Mapping[str, float] | Sequence[tuple[str, float]] | None = None, *,
    columns: Mapping[str, object] | None = None, wanted: Sequence[str] | None = None,
) -> TaskSpec:  # fmt: skip
    """The ``TaskSpec`` for a task name; raises ``UserInputError`` listing the valid names. ``columns``
    (the column mapping) and ``wanted`` (the run's split names: the split rule) are for ``datasets``
    sources only."""
    if not isinstance(name, str):
        raise UserInputError(f"a task name must be a string, got {name!r}")
    norm_fractions = None
    if fractions is not None:
        norm_fractions = list(fractions.items()) if isinstance(fractions, Mapping) else list(fractions)
        split_counts(1, norm_fractions)  # validates names and values
    if hf_source.is_source(name):
        return _datasets_spec(name, norm_fractions, columns, wanted)
    if columns:
        raise UserInputError(
            f"a column mapping (data.columns) applies to hf:, csv:, parquet: and json: sources, not to {name!r} "
            "(a jsonl: file uses our field names; read it as json:<file> to map its columns)"
        )
    if name.startswith(JSONL_PREFIX):
        return _jsonl_spec(name, name[len(JSONL_PREFIX) :], norm_fractions)
    if fractions is not None:
        raise UserInputError(
            f"fractions apply only to jsonl:<file> and datasets sources; the splits of {name!r} are fixed "
            "(see docs/data.md)"
        )
    if name in BUILTIN_TASKS:
        return _builtin_spec(name)
    if name.startswith(MMLU_PREFIX):
        return _mmlu_spec(name, name[len(MMLU_PREFIX) :])
    raise _unknown_task(name)


def task_folder(name: str) -> str:
    """The folder (and file-name part) a comparison files task ``name``'s runs under: the name itself when it
    is one plain folder name (``sst2``, ``mmlu:anatomy``), else, for a task named by a path
    (``jsonl:../data/x.jsonl``, ``hf:/data/sets/sst5``), ``<family>-<file or folder stem>-<8 hex of the name>``:
    never a separator or ``..`` (the runs stay inside the comparison's folder) and one folder per name."""
    try:
        return check_name(name)
    except ValueError:
        pass
    family, _, arg = name.rpartition(":") if ":" in name else ("task", "", name)
    stem = os.path.splitext(os.path.basename(os.path.normpath(arg.rstrip("/\\"))))[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "data"
    family = re.sub(r"[^A-Za-z0-9_-]+", "_", family.split(":")[0]) or "task"
    return f"{family}-{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def available_tasks() -> list[str]:
    """Every built-in task name (the five BLoB tasks, then ``mmlu:<subject>`` for the 57 subjects). User data
    is ``jsonl:<path>`` on top of these."""
    return list(BUILTIN_TASKS) + [MMLU_PREFIX + s for s in builtin.MMLU_SUBJECTS]


def task_splits(
    name: str, *, columns: Mapping[str, object] | None = None, wanted: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The split names ``load_task`` accepts for ``name`` (for a ``jsonl:<dir>``, the files present)."""
    return get_spec(name, columns=columns, wanted=wanted).splits


def _root_for(spec: TaskSpec, data_dir: str | os.PathLike[str] | None) -> str:
    return builtin.resolve_data_dir(data_dir) if spec.needs_root else ""


def load_task(
    name: str,
    split: str,
    seed: int = DEFAULT_SEED,
    limit: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    fractions: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    columns: Mapping[str, object] | None = None,
    wanted: Sequence[str] | None = None,
) -> Sequence[MCExample]:
    """The examples of one split of a task, in a seeded order; ``limit`` keeps the first ``limit``. A list;
    for a plain ``jsonl:`` file, a :class:`~polar_vbll.tasks.file_rows.FileSplit` (the same rows, read back
    from the file when asked for; ``features.encode_examples`` tokenises it through a memory-mapped cache).

    ``seed`` fixes both the train/validation(/test) cut and the order; ``data_dir`` replaces the
    installed data package by a directory of the same layout; ``fractions`` (``jsonl:<file>`` and
    ``datasets`` sources) replaces the default cut, e.g. ``{"train": 0.9, "validation": 0.1}``.
    ``columns`` maps our fields to a ``datasets`` source's columns (``data.columns``); ``wanted``: the
    run's train, validation and evaluation split names, which decide what a ``datasets`` source's missing
    splits are cut from (:func:`_datasets_spec`; pass the same for every split of one run).
    """
    spec = get_spec(name, fractions, columns=columns, wanted=wanted)
    if split not in spec.splits:
        raise UserInputError(f"task {name!r} has no split {split!r}; its splits are {list(spec.splits)}")
    root = _root_for(spec, data_dir)
    if spec.carve is not None and split in dict(spec.carve[1]):
        pool_name, fracs = spec.carve
        examples = split_examples(spec.pools[pool_name](root), fracs, seed, where=name)[split]
    else:
        examples = seeded_order(spec.pools[spec.shipped[split]](root), seed, where=name)
    return apply_limit(examples, limit)


def split_sizes(
    name: str,
    seed: int = DEFAULT_SEED,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    fractions: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    columns: Mapping[str, object] | None = None,
    wanted: Sequence[str] | None = None,
) -> dict[str, int]:
    """Number of examples in each split of ``name`` (sizes do not depend on the seed; it is accepted so a
    caller can pass the same arguments as to ``load_task``)."""
    kw = {"fractions": fractions, "columns": columns, "wanted": wanted}
    spec = get_spec(name, fractions, columns=columns, wanted=wanted)
    return {split: len(load_task(name, split, seed, None, data_dir, **kw)) for split in spec.splits}


def task_num_classes(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    fractions: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    columns: Mapping[str, object] | None = None,
    wanted: Sequence[str] | None = None,
) -> int:
    """The classifier width for a task: the most choices in any of its splits. Use this rather than
    ``num_classes`` of the training split, which can be smaller (ARC-Challenge has a single 5-choice
    validation question, so a seeded train split may hold none while its test set has several)."""
    kw = {"fractions": fractions, "columns": columns, "wanted": wanted}
    spec = get_spec(name, fractions, columns=columns, wanted=wanted)
    return max(num_classes(load_task(name, split, 0, None, data_dir, **kw)) for split in spec.splits)


def run_split(data: object, split: str, limit: int | None = None) -> Sequence[MCExample]:
    """One split of a run's task as the run reads it: ``data`` is its ``DataConfig`` (``task``,
    ``split_seed``, ``columns`` and the three split names, which the split rule of a ``datasets`` source
    reads)."""
    d: object = data
    return load_task(d.task, split, seed=d.split_seed, limit=limit, columns=d.columns,  # type: ignore[attr-defined]
                     wanted=run_splits(d))  # fmt: skip


def run_splits(data: object) -> tuple[str, str, str]:
    """A run's train, validation and evaluation split names (``DataConfig``)."""
    return (data.train_split, data.val_split, data.eval_split)  # type: ignore[attr-defined]


def task_provenance(name: str, columns: Mapping[str, object] | None = None,
                    wanted: Sequence[str] | None = None) -> dict[str, object]:  # fmt: skip
    """What a ``datasets`` source resolved to (``hf_source.provenance``) and how its splits were made
    (``cut``: the pool and fractions of the seeded cut, None when every split is shipped); empty for the
    other tasks, whose data is fixed by their name (built-in) or path (``jsonl:``)."""
    if not hf_source.is_source(name):
        return {}
    spec = get_spec(name, columns=columns, wanted=wanted)
    out = hf_source.provenance(name, columns)
    out["cut"] = None if spec.carve is None else {"from": spec.carve[0], "fractions": dict(spec.carve[1])}
    return out
