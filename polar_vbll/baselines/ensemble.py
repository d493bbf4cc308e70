"""Deep ensembles (Lakshminarayanan et al. 2017) of adapters: average the members' predictive probabilities.

Members are the same adapter and head trained from different seeds (3 in the protocol), so the baseline
costs one backbone pass per member per example. Each member is evaluated on its own with
``polar_vbll.evaluate.predict`` (or any predictor returning ``Predictions``) and the results are combined
here; :func:`predict_ensemble` does both for members kept as adapter state dicts, swapping them through one
model so only one backbone is ever in memory (and the frozen-prefix cache is shared by every member).

The average is taken in probability space (a mixture), never over logits: averaging logits would give a
sharper, differently calibrated predictive than the ensemble the baseline is defined by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from polar_vbll.evaluate import Predictions, predict
from polar_vbll.features import EncodedSplit, FeatureSource


def ensemble_predictions(members: Sequence[Predictions]) -> Predictions:
    """The equal-weight mixture of ``members``: probabilities averaged (in float64) per example.

    Raises ``ValueError`` unless every member is of the same split, with the same number of examples and
    classes and exactly the same labels in the same order: averaging predictions of different examples
    would silently produce a meaningless ensemble.
    """
    if not members:
        raise ValueError("ensemble_predictions: no members")
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
        if m.split != first.split:
            raise ValueError(f"ensemble member {i} is of split {m.split!r}, member 0 of {first.split!r}")
        if tuple(m.probs.shape) != tuple(first.probs.shape):
            raise ValueError(
                f"ensemble member {i} has probabilities of shape {tuple(m.probs.shape)}, member 0 "
                f"{tuple(first.probs.shape)}"
            )
        if not torch.equal(m.labels.cpu(), first.labels.cpu()):
            raise ValueError(
                f"ensemble member {i} has different labels from member 0 (another split, or examples in "
                "another order)"
            )
    mean = torch.stack([m.probs.detach().cpu().to(torch.float64) for m in members]).mean(dim=0)
    return Predictions(first.split, mean.to(torch.float32), first.labels.clone())


@torch.no_grad()
def predict_ensemble(
    adapter,
    source: FeatureSource,
    enc: EncodedSplit,
    batch_size: int,
    members: Sequence[tuple[Mapping[str, torch.Tensor], object]],
    progress: bool = True,
) -> Predictions:
    """Evaluate each member ``(adapter_state_dict, head)`` on ``enc`` with ``evaluate.predict`` by loading
    its state into ``adapter`` (a ``PolarModel`` or ``LoraAdapter`` whose model ``source`` reads), then
    average. The adapter's own state is restored afterwards. Members must share the adapter layout (same
    config, different seeds), so the cached frozen prefix of ``source`` is valid for all of them."""
    saved = adapter.adapter_state_dict()
    preds: list[Predictions] = []
    try:
        for i, (state, head) in enumerate(members):
            adapter.load_adapter_state_dict(state, where=f"ensemble member {i}")
            preds.append(predict(source, head, enc, batch_size, progress=progress))
    finally:
        adapter.load_adapter_state_dict(saved, where="the adapter's own state")
    return ensemble_predictions(preds)
