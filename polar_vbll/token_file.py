"""A user's JSONL file tokenised once, in chunks, into the memory-mapped token cache (``token_cache``).

:func:`encode_file_split` gives a split of a large file (``tasks.file_rows.FileSplit``) what
``features.encode_examples`` gives a list of examples: its token ids (a :class:`~polar_vbll.token_rows.TokenRows`
view of the cache entry, in the split's order), labels, choice counts, the shortened prompts per part and
the ids of the rows whose question was shortened. The ids are the same, token for token: each prompt is
rendered and fitted by the same ``fit_prompt`` (a prompt that fits as rendered, the common case, is
tokenised in a batch of ``CHUNK`` rows through the tokenizer; one that does not is fitted row by row, as
before), BOS added as ``tokens.tokenize_prompts`` adds it.

The entry covers every row of the file, in file order, so the train, validation and test splits of one
file, any seed, fractions or limits, and every Ray worker on the node share one entry. Its key
(``token_cache.entry_key``) is made of:

- the file: the sha256 of its bytes (all of them: an edit that keeps the size and time is still seen; about
  40 ms per 20 MB) and its task name (``jsonl:<path>``, which the rows and the errors carry);
- the tokenizer: its class, the sha256 of its full serialisation (a fast tokenizer's ``tokenizer.json``:
  vocabulary, merges, normaliser, pre-tokeniser; else its vocabulary and special tokens), its BOS id, and
  the versions of ``transformers`` and ``tokenizers``;
- ``max_length``, ``add_bos`` and the prompt template's version (``tasks.TEMPLATE_VERSION``).

A tokenizer that cannot be identified so (no vocabulary) is not cached: the split is then encoded in
memory from its rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polar_vbll import token_cache
from polar_vbll.errors import DataError
from polar_vbll.tasks import SHORTENABLE, TEMPLATE_VERSION, fit_prompt, render_prompt
from polar_vbll.tasks.file_rows import FileSplit, ScannedFile
from polar_vbll.token_rows import TokenRows

#: Rows tokenised per batch while an entry is written (a chunk's examples and ids are all it holds).
CHUNK = 4096


@dataclass
class FileEncoding:
    """One split of a file, encoded: ``ids`` (a view of the cache entry, split order), ``labels`` and
    ``n_choices`` (``(n,)`` int64), ``shortened`` (part -> prompts shortened), ``cut_questions`` (ids of the
    rows whose question was shortened, split order)."""

    ids: TokenRows
    labels: torch.Tensor
    n_choices: torch.Tensor
    shortened: dict[str, int]
    cut_questions: list[str]


def tokenizer_identity(tokenizer) -> str | None:
    """sha256 (hex) of what a tokenizer maps text to ids by (module docstring); None when it cannot be
    told (no ``backend_tokenizer`` and no ``get_vocab``)."""
    import transformers

    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    else:
        return None
    try:
        import tokenizers

        versions = [transformers.__version__, tokenizers.__version__]
    except ImportError:  # pragma: no cover - transformers requires it
        versions = [transformers.__version__]
    h.update(json.dumps([getattr(tokenizer, "bos_token_id", None), versions]).encode())
    return h.hexdigest()


def key_parts(scan: ScannedFile, tokenizer_id: str, max_length: int, add_bos: bool) -> dict[str, object]:
    """What an entry's key is made of (module docstring)."""
    return {"file_sha256": scan.sha256, "file_bytes": scan.stat[0], "source": scan.source, "tokenizer": tokenizer_id,
            "max_length": max_length, "add_bos": add_bos, "template": TEMPLATE_VERSION}  # fmt: skip


def _encoded_rows(scan: ScannedFile, tokenizer, max_length: int, add_bos: bool,
                  errors: dict[int, str]) -> Iterator[tuple[list[int], int]]:  # fmt: skip
    """Every row's token ids and flag byte, in file order, ``CHUNK`` rows at a time (module docstring)."""
    budget = max_length - (1 if add_bos else 0)
    bos = [tokenizer.bos_token_id] if add_bos else []

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    cap = 16 * budget  # fit_prompt cuts longer parts first; such a row always takes its path
    for start in range(0, len(scan), CHUNK):
        rows = range(start, min(start + CHUNK, len(scan)))
        examples = list(scan.read(rows))
        texts = [render_prompt(ex.context, ex.question, ex.choices) for ex in examples]
        batch = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for r, ex, ids in zip(rows, examples, batch, strict=True):
            too_big = any(len(c) > cap for c in ex.choices) or len(ex.question) > cap or len(ex.context or "") > cap
            if len(ids) <= budget and not too_big:
                yield [*bos, *ids], 0
                continue
            try:
                fitted = fit_prompt(ex, count, budget)
            except DataError as err:
                errors[r] = str(err)
                yield [], token_cache.TOO_LONG
                continue
            flag = sum(bit for part, bit in token_cache.FLAG_BITS.items() if part in fitted.shortened)
            yield [*bos, *tokenizer(fitted.text, add_special_tokens=False)["input_ids"]], flag


def open_or_build(scan: ScannedFile, tokenizer, max_length: int, add_bos: bool,
                  root: Path | None = None) -> token_cache.Entry | None:  # fmt: skip
    """The checked cache entry of ``scan``'s file under this tokenizer and prompt settings, written first
    when there is none (or the one there is damaged: it is removed, with a note, and written again). None
    for a tokenizer that cannot be identified. Raises ``DataError`` if the file changed since its scan."""
    tokenizer_id = tokenizer_identity(tokenizer)
    if tokenizer_id is None:
        return None
    scan.check_unchanged()
    root = root or token_cache.default_root()
    parts = key_parts(scan, tokenizer_id, max_length, add_bos)
    folder = root / token_cache.entry_key(parts)
    if folder.exists():
        try:
            entry = token_cache.open_entry(folder)
            if entry.rows == len(scan):
                return entry
            problem = f"{entry.rows} rows, the file has {len(scan)}"
        except (ValueError, OSError) as err:
            problem = str(err)
        print(f"note: the token cache entry {folder} is damaged ({problem}); tokenising {scan.path} again", flush=True)
        token_cache.remove_entry(folder)
    errors: dict[int, str] = {}
    written = token_cache.write_entry(root, folder.name, parts, _encoded_rows(scan, tokenizer, max_length, add_bos,
                                                                              errors), errors)  # fmt: skip
    return token_cache.open_entry(written)


def _reopen(folder: str) -> TokenRows:
    entry = token_cache.open_entry(Path(folder), verify=False)
    return TokenRows(entry.ids, entry.offsets, reopen=(_reopen, (folder,)))


def encode_file_split(split: FileSplit, entry: token_cache.Entry) -> FileEncoding:
    """``split`` encoded from its file's cache entry (:func:`open_or_build`). Raises the ``DataError`` of
    ``fit_prompt`` for the first row of the split (in its order) whose prompt cannot fit."""
    index = split.index
    flags = np.asarray(entry.flags[index]) if len(index) else np.zeros(0, dtype=np.uint8)
    bad = np.flatnonzero(flags & token_cache.TOO_LONG)
    if len(bad):
        raise DataError(entry.meta["errors"][str(int(index[bad[0]]))])
    ids = TokenRows(entry.ids, entry.offsets, index, reopen=(_reopen, (str(entry.folder),)))
    uids = split.scan.uids
    return FileEncoding(
        ids=ids,
        labels=torch.from_numpy(split.answers.astype(np.int64)),
        n_choices=torch.from_numpy(split.n_choices.astype(np.int64)),
        shortened={part: int(((flags & token_cache.FLAG_BITS[part]) > 0).sum()) for part in SHORTENABLE},
        cut_questions=[uids[int(r)] for r in index[(flags & token_cache.FLAG_BITS["question"]) > 0]],
    )
