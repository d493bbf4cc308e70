"""Data through Hugging Face ``datasets``: ``hf:``, ``csv:``, ``parquet:`` and ``json:`` sources (docs/data.md).

- ``hf:<folder>[:config]``: a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder, or a folder of
  data files laid out as a dataset repository (``datasets.load_dataset(folder)``: README configs, split
  names from the file names);
- ``hf:<org/name>[:config]``: a hub dataset **from the local cache only** (never downloaded): the hub's
  file cache first (``HF_HUB_CACHE``; the snapshot ``refs/main`` points to), then the ``datasets`` cache of
  an earlier ``load_dataset`` (``HF_DATASETS_CACHE``), as ``datasets`` itself resolves an id under
  ``HF_HUB_OFFLINE=1``;
- ``csv:<file>``, ``parquet:<file>``, ``json:<file>`` (JSON or JSON Lines): one file, read by
  ``datasets.load_dataset(<kind>, data_files=...)``.

A source opens into named splits of rows (:func:`open_source`, once per process and version of the files);
:func:`split_examples` turns one split into ``MCExample``s through the column mapping
(``polar_vbll.tasks.columns``) and the JSONL reader's validation. Which split a run's ``train`` /
``validation`` / ``test`` is (shipped, or cut by seed) is the registry's rule (``polar_vbll.tasks.registry``).
``datasets`` is imported here only, when such a source is used.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polar_vbll.errors import DataError, UserInputError
from polar_vbll.models import hub_cache_dir
from polar_vbll.tasks.columns import examples_from_rows, resolve
from polar_vbll.tasks.example import MCExample

#: The source kinds read through ``datasets``, by task-name prefix.
PREFIXES = ("hf:", "csv:", "parquet:", "json:")
#: The files a ``save_to_disk`` folder holds (a DatasetDict, or one Dataset).
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_source(name: str) -> bool:
    """Whether ``name`` is a task read through ``datasets``."""
    return isinstance(name, str) and name.startswith(PREFIXES)


@dataclass(frozen=True)
class SourceName:
    """A parsed source: ``kind`` (hf, csv, parquet, json), ``target`` (a path, or a hub id), ``config`` (a
    dataset config, ``hf:`` only) and whether the target is a local path."""

    kind: str
    target: str
    config: str | None
    local: bool

    def spelled(self) -> str:
        return f"{self.kind}:{self.target}" + (f":{self.config}" if self.config else "")


def _looks_local(text: str) -> bool:
    return os.path.exists(os.path.expanduser(text)) or not _HUB_ID.match(text)


def parse_source(name: str) -> SourceName:
    """Split a source name into its parts (nothing is read). An existing local path wins over a hub id of
    the same spelling, as in ``datasets``; ``hf:<target>:<config>`` names a config."""
    kind, _, rest = name.partition(":")
    if not rest:
        example = "hf:data/my_saved_dataset" if kind == "hf" else f"{kind}:data/my_task.{kind}"
        what = "folder or a hub id" if kind == "hf" else "file"
        raise UserInputError(f"task '{kind}:' needs a {what}, e.g. {example}")
    if kind != "hf":
        return SourceName(kind, rest, None, True)
    target, config = rest, None
    if not os.path.exists(os.path.expanduser(rest)) and ":" in rest:
        left, _, right = rest.rpartition(":")
        if left and right and "/" not in right:
            target, config = left, right
    return SourceName(kind, target, config, _looks_local(target))


def absolute_source(name: str) -> str:
    """The source name with a local path made absolute (a hub id stays an id)."""
    src = parse_source(name)
    if not src.local:
        return name
    path = str(Path(src.target).expanduser().resolve())
    return SourceName(src.kind, path, src.config, True).spelled()


@dataclass
class Opened:
    """An opened source: its splits (``datasets.Dataset`` each, struct columns flattened to ``a.b``) and
    what was resolved (:func:`provenance`)."""

    name: str
    splits: dict[str, Any]
    resolved: dict[str, Any]
    examples: dict[tuple[str, str], list[MCExample]] = field(default_factory=dict)


_OPENED: dict[str, tuple[Any, Opened]] = {}


def _signature(src: SourceName) -> Any:
    """What identifies the version of a local source's files (their sizes and modification times), so a
    file edited in this process is read again; a hub id is read once per process."""
    if not src.local:
        return None
    path = Path(src.target).expanduser()
    if path.is_file():
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    if path.is_dir():
        return tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*") if p.is_file()))
    return "missing"


def open_source(name: str) -> Opened:
    """Open ``name`` (checked, every split listed; rows are read per split on demand). Raises
    ``MissingExtra`` without ``datasets``, ``DataError`` for a source that is missing or unreadable (one
    line naming it)."""
    from polar_vbll.extras import require

    require("polar_vbll.tasks.hf_source")
    src = parse_source(name)
    sig = _signature(src)
    cached = _OPENED.get(name)
    if cached is not None and cached[0] == sig:
        return cached[1]
    with _quiet_offline():
        splits, resolved = _open_hf(src) if src.kind == "hf" else _open_file(src)
    splits = {str(k): ds.flatten() for k, ds in splits.items()}
    resolved["splits"] = {k: ds.num_rows for k, ds in splits.items()}
    opened = Opened(name, splits, resolved)
    _OPENED[name] = (sig, opened)
    return opened


def _open_file(src: SourceName) -> tuple[dict[str, Any], dict[str, Any]]:
    import datasets

    path = os.path.expanduser(src.target)
    if not os.path.exists(path):
        raise DataError(f"{src.spelled()}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{src.spelled()}: is a folder; {src.kind}: takes one file (a folder of files: hf:{path})")
    try:
        loaded = datasets.load_dataset(src.kind, data_files=path, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    except Exception as err:  # datasets raises many kinds (a parse error, a bad file)
        raise DataError(f"{src.spelled()}: cannot be read as {src.kind.upper()} by datasets ({_reason(err)})") from None
    return dict(loaded), {"kind": src.kind, "path": path, "resolved_from": "file"}


def _open_hf(src: SourceName) -> tuple[dict[str, Any], dict[str, Any]]:
    import datasets

    spelled = src.spelled()
    info: dict[str, Any] = {"kind": "hf", "config": src.config}
    if src.local:
        path = os.path.expanduser(src.target)
        if not os.path.exists(path):
            raise DataError(f"{spelled}: no such folder (nor a hub id: hub ids look like org/name)")
        if not os.path.isdir(path):
            raise DataError(f"{spelled}: hf: takes a folder or a hub id; read one file with csv:, parquet: or json:")
        info["path"] = path
        if any(os.path.isfile(os.path.join(path, m)) for m in _SAVED_MARKERS):
            if src.config:
                raise DataError(f"{spelled}: a save_to_disk folder has no configs; drop ':{src.config}'")
            info["resolved_from"] = "save_to_disk"
            loaded = _call(spelled, datasets.load_from_disk, path)
        else:
            info["resolved_from"] = "folder"
            loaded = _call(spelled, datasets.load_dataset, path, name=src.config,
                           cache_dir=os.environ.get("HF_DATASETS_CACHE"))  # fmt: skip
    else:
        info["id"] = src.target
        snapshot = _hub_snapshot(src.target)
        if snapshot is not None:
            info.update(resolved_from="hub cache", revision=os.path.basename(snapshot), path=snapshot)
            loaded = _call(spelled, datasets.load_dataset, snapshot, name=src.config,
                           cache_dir=os.environ.get("HF_DATASETS_CACHE"))  # fmt: skip
        else:
            info["resolved_from"] = "datasets cache"
            try:
                loaded = datasets.load_dataset(src.target, name=src.config,
                                               cache_dir=os.environ.get("HF_DATASETS_CACHE"))  # fmt: skip
            except (ConnectionError, FileNotFoundError, OSError) as err:
                hub = hub_cache_dir()
                cache = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
                raise DataError(
                    f"{spelled}: the dataset {src.target!r} is not in the local Hugging Face caches (hub cache "
                    f"{hub}, datasets cache {cache}); "
                    "hub datasets are read from the cache only, as with HF_HUB_OFFLINE=1, never downloaded: fetch "
                    f"it once (hf download --repo-type dataset {src.target}) or give a save_to_disk folder "
                    f"({type(err).__name__})"
                ) from None
            except Exception as err:
                raise DataError(f"{spelled}: cannot be read by datasets ({_reason(err)})") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {str(loaded.split) if loaded.split is not None else "all": loaded}
    return dict(loaded), info


def _hub_snapshot(repo_id: str) -> str | None:
    """The cached snapshot folder of a hub dataset at ``refs/main``, or None (nothing is downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True,
                                 cache_dir=hub_cache_dir())  # fmt: skip
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def _call(spelled: str, fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except Exception as err:  # datasets raises many kinds (a missing config, a corrupt file)
        raise DataError(f"{spelled}: cannot be read by datasets ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    """An exception in one line (the innermost cause's first line, which names the actual problem)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def _quiet_offline() -> Iterator[None]:
    """No network and no progress bars while a source is opened: ``datasets`` and ``huggingface_hub`` run
    as under ``HF_HUB_OFFLINE=1`` (they read the variable at import, so their flags are set here and
    restored after)."""
    import datasets
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE, datasets.are_progress_bars_disabled())
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved[0], saved[1]
        if not saved[2]:
            datasets.enable_progress_bars()


def _where(opened: Opened, split: str) -> str:
    return opened.name if len(opened.splits) == 1 else f"{opened.name} [split {split}]"


def split_examples(name: str, split: str, columns: Mapping[str, Any] | None = None) -> list[MCExample]:
    """Every row of one split of the source as an ``MCExample`` (``columns``: our fields -> the source's
    columns), in the source's order. Raises ``DataError``: the source, the row and the column."""
    opened = open_source(name)
    key = (split, repr(sorted((columns or {}).items())))
    if key not in opened.examples:
        ds = opened.splits[split]
        where = _where(opened, split)
        resolved = resolve(columns, ds.column_names, where)
        needed = sorted({c for v in resolved.read.values() for c in (v if isinstance(v, tuple) else (v,))})
        rows = ds.select_columns(needed).to_list()
        examples = [e for _, e, _ in examples_from_rows(rows, resolved, name, where)]
        if not examples:
            raise DataError(f"{where}: no rows")
        opened.examples[key] = examples
    return opened.examples[key]


def question_rows(name: str, split: str | None, columns: Mapping[str, Any] | None, strict: bool,
                  answers: bool = False) -> tuple[str, Any, list[dict[str, Any]]]:  # fmt: skip
    """``(where, resolved mapping, rows)`` of one split of a source of questions to predict (``split``: which
    one, needed when the source has several; ``strict``: see ``columns.resolve``; ``answers``: each row must
    have one, for calibration)."""
    from polar_vbll.tasks.jsonl import QUESTION_KEYS, REQUIRED_KEYS

    opened = open_source(name)
    names = list(opened.splits)
    if split is None:
        if len(names) > 1:
            raise UserInputError(f"{name} holds the splits {names}: choose one (--split, or split=)")
        split = names[0]
    if split not in opened.splits:
        raise UserInputError(f"{name} has no split {split!r}; its splits are {names}")
    ds = opened.splits[split]
    where = _where(opened, split)
    resolved = resolve(columns, ds.column_names, where, required=REQUIRED_KEYS if answers else QUESTION_KEYS,
                       strict=strict, what="columns" if strict else "the run's data.columns")  # fmt: skip
    return where, resolved, ds.to_list()


def provenance(name: str, columns: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``name`` resolved to: the kind, the path or hub id, the config, where it was found (a file, a
    save_to_disk folder, the hub cache with its snapshot revision, the datasets cache), the rows of each
    split, and the columns read for each field and those ignored."""
    opened = open_source(name)
    out = dict(opened.resolved)
    first = next(iter(opened.splits.values()))
    resolved = resolve(columns, first.column_names, _where(opened, next(iter(opened.splits))))
    out["columns_read"] = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.read.items()}
    out["columns_ignored"] = list(resolved.ignored)
    return out
