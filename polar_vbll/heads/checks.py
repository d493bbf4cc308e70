"""Range checks of a head's inputs, done once per split instead of once per step.

A head checks that every label lies below its question's choice count and that every count lies in
``[1, K]``: without it a bad label gives an infinite loss with no hint of which example caused it. The
check reads the values on the host, a device sync per call on an accelerator. The trainer checks its
training split once (:func:`check_labels`) and then runs the step's loss inside :func:`inputs_checked`,
where the heads skip the per-call check (shape checks stay: they cost nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from polar_vbll.errors import DataError

_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("polar_vbll_inputs_checked", default=False)


@contextlib.contextmanager
def inputs_checked() -> Iterator[None]:
    """Inside: the heads trust that labels and choice counts are in range (checked up front)."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def range_check_due() -> bool:
    """Whether a head should check its inputs' ranges now (False inside :func:`inputs_checked`)."""
    return not _CHECKED.get()


def check_labels(split, num_classes: int | None) -> None:
    """Refuse a split (an ``EncodedSplit``: ``labels`` and ``n_choices``, host tensors) with a choice count
    outside ``[1, num_classes]`` or a label outside ``[0, n_choices)``, naming the first bad example. Raises
    :class:`~polar_vbll.errors.DataError`."""
    labels, counts = split.labels.cpu(), split.n_choices.cpu()
    k = num_classes if num_classes is not None else int(counts.max()) if len(counts) else 0
    bad = (counts < 1) | (counts > k) | (labels < 0) | (labels >= counts)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise DataError(
            f"{split.name}: example {i} has {int(counts[i])} choices and label {int(labels[i])}; the head reads "
            f"{k} classes (need 1 <= choices <= {k} and 0 <= label < choices)"
        )
