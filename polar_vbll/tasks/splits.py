"""Deterministic, seeded splits of a pool of examples.

No benchmark here ships a training split, so train/validation(/test) are carved out of a shipped split.
The result must depend only on the pool and the seed, never on global RNG state, file order or the Python
version, so that a run can be reproduced and two runs with the same seed never leak test rows into
training. Hence:

- the pool is first sorted by ``uid`` (file order does not matter; uids must be unique);
- it is permuted by a Fisher-Yates shuffle driven by a private ``random.Random(seed)``, using only
  ``Random.random()`` - the one output Python guarantees to reproduce across versions for a given seed
  (``Random.shuffle`` and ``randrange`` are not covered by that promise);
- the permuted list is cut into consecutive blocks: every split but the last gets
  ``floor(fraction * n)`` examples, the last gets the rest, so the splits are disjoint and cover the pool;
- ``limit`` keeps the first ``n`` of a split, so a limited split is a subset of the full one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from polar_vbll.errors import ConfigError, DataError, UserInputError
from polar_vbll.tasks.example import MCExample
from polar_vbll.tasks.file_rows import FileSplit

DEFAULT_SEED = 0


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserInputError(f"the split seed must be an integer, got {seed!r}")


def seeded_order(examples: Sequence[MCExample], seed: int = DEFAULT_SEED, where: str = "") -> Sequence[MCExample]:
    """The examples in a seeded random order that depends only on their uids and ``seed`` (a list; for a
    :class:`~polar_vbll.tasks.file_rows.FileSplit`, a view of it in that order).

    ``where`` names the source in the error raised for duplicate uids (which would make the order, and so
    the split, ambiguous)."""
    if isinstance(examples, FileSplit):  # a large file's rows: ordered by their ids, never read
        return examples.select(seeded_permutation(examples.uids, seed, where))
    return [examples[i] for i in seeded_permutation([ex.uid for ex in examples], seed, where)]


def seeded_permutation(uids: Sequence[str], seed: int = DEFAULT_SEED, where: str = "") -> list[int]:
    """The positions of ``uids`` in the order of :func:`seeded_order` (sorted by uid, then a Fisher-Yates
    shuffle driven by ``random.Random(seed).random()``). Raises ``DataError`` for a repeated uid."""
    _check_seed(seed)
    ordered = sorted(range(len(uids)), key=uids.__getitem__)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if uids[a] == uids[b]:
            prefix = f"{where}: " if where else ""
            raise DataError(
                f"{prefix}field 'id': the id {uids[a]!r} appears more than once; ids must be unique"
            )
    rng = random.Random(seed)
    for i in range(len(ordered) - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        ordered[i], ordered[j] = ordered[j], ordered[i]
    return ordered


def _normalize_fractions(
    fractions: Mapping[str, float] | Sequence[tuple[str, float]],
) -> list[tuple[str, float]]:
    items = list(fractions.items()) if isinstance(fractions, Mapping) else list(fractions)
    if not items:
        raise ConfigError("split fractions are empty")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ConfigError(f"split names repeat in {names}")
    for name, frac in items:
        if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac <= 1:
            raise ConfigError(f"split fraction for {name!r} must be in (0, 1], got {frac!r}")
    total = sum(frac for _, frac in items)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must sum to 1, got {total:g} ({dict(items)})")
    return items


def split_counts(n: int, fractions: Mapping[str, float] | Sequence[tuple[str, float]]) -> dict[str, int]:
    """Sizes of the blocks :func:`split_examples` cuts from ``n`` examples (floor for each split but the
    last, which takes the rest)."""
    items = _normalize_fractions(fractions)
    sizes: dict[str, int] = {}
    for name, frac in items[:-1]:
        sizes[name] = math.floor(frac * n + 1e-9)
    sizes[items[-1][0]] = n - sum(sizes.values())
    return sizes


def split_examples(
    examples: Sequence[MCExample],
    fractions: Mapping[str, float] | Sequence[tuple[str, float]],
    seed: int = DEFAULT_SEED,
    where: str = "",
) -> dict[str, Sequence[MCExample]]:
    """Cut ``examples`` into disjoint, covering splits by ``fractions`` (e.g. ``{"train": 0.8,
    "validation": 0.2}``), in the seeded order of :func:`seeded_order`. Every split must get at least one
    example; ``where`` names the source in errors."""
    sizes = split_counts(len(examples), fractions)
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        prefix = f"{where}: " if where else ""
        raise DataError(
            f"{prefix}{len(examples)} examples are too few to split by "
            f"{dict(_normalize_fractions(fractions))}: split(s) {empty} would be empty"
        )
    ordered = seeded_order(examples, seed, where)
    out: dict[str, Sequence[MCExample]] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = ordered[start : start + size]
        start += size
    return out


def apply_limit(examples: Sequence[MCExample], limit: int | None) -> Sequence[MCExample]:
    """The first ``limit`` examples (all when ``limit`` is None). Applied after the seeded shuffle, so it
    is a deterministic random subsample and a subset of the unlimited split."""
    if limit is None:
        return examples
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise UserInputError(f"limit must be a positive integer or None, got {limit!r}")
    return examples[:limit]
