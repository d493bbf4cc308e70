"""Evaluation: predictive probabilities over a whole split, then metrics over all of it at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from polar_vbll.features import EncodedSplit, FeatureSource, length_sorted_batches
from polar_vbll.metrics import CalibrationAccumulator


@dataclass
class Predictions:
    """Per-example predictive probabilities ``(N, K)`` in the split's original order, and the labels."""

    split: str
    probs: torch.Tensor
    labels: torch.Tensor

    def metrics(self) -> dict[str, float]:
        acc = CalibrationAccumulator()
        acc.update(self.probs, self.labels)
        return acc.compute()

    def accumulator(self) -> CalibrationAccumulator:
        acc = CalibrationAccumulator()
        acc.update(self.probs, self.labels)
        return acc


@torch.no_grad()
def predict(
    source: FeatureSource, head, enc: EncodedSplit, batch_size: int, progress: bool = True
) -> Predictions:
    """One backbone pass per example (on the cheap path, only the adapted blocks), the head's predictive
    probabilities for every example of ``enc``."""
    from polar_vbll.baselines.lora import set_adapter_dropout

    set_adapter_dropout(source.model, False)  # deterministic features: adapter dropout off
    source.prepare(enc, batch_size, progress=progress)
    probs = torch.zeros((len(enc), head.num_classes), dtype=torch.float32)
    batches = list(length_sorted_batches([len(s) for s in enc.ids], batch_size))
    for idx in tqdm(batches, desc=f"evaluating {enc.name}", disable=not progress):
        phi = source.features(enc, idx)
        probs[idx] = head.predict_proba(phi, enc.n_choices[idx].to(phi.device)).to(torch.float32).cpu()
    return Predictions(enc.name, probs, enc.labels.clone())
