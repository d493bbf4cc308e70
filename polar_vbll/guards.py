"""The honesty guard of every table: what a predictor that learned nothing scores on the same split.

- the **uniform** predictor: ``1 / n_choices`` for every choice of every question;
- the **majority-class** predictor: the training split's class frequencies (restricted to each question's
  choices and renormalised) for every question, so its accuracy is the evaluation split's share of the
  training split's most frequent answer position;
- **chance accuracy** ``c``: the larger of the two predictors' accuracies (the uniform predictor's is its
  expected accuracy ``mean(1 / n_choices)``), with the standard error ``sqrt(c (1 - c) / n)`` of an
  accuracy measured on ``n`` questions;
- a method is **at chance** when its accuracy is below ``c + 2 SE``: its ECE and NLL then measure
  abstention (how close to uniform it is), not calibration of knowledge, and tables flag it.
"""

from __future__ import annotations

import math

import torch

from polar_vbll.metrics import summarize

#: A method whose accuracy is below chance + Z_GUARD standard errors is flagged as at chance.
Z_GUARD = 2.0


def uniform_probs(n_choices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K): 1 / n_choices on each question's choices, 0 on padding."""
    valid = torch.arange(num_classes).unsqueeze(0) < n_choices.unsqueeze(1)
    return valid.to(torch.float64) / n_choices.unsqueeze(1).to(torch.float64)


def majority_probs(train_labels: torch.Tensor, n_choices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K): the training labels' class frequencies (add-one smoothed, so no choice gets probability 0
    and the NLL stays finite), restricted to each question's choices and renormalised."""
    counts = torch.bincount(train_labels.long(), minlength=num_classes)[:num_classes].to(torch.float64) + 1.0
    valid = torch.arange(num_classes).unsqueeze(0) < n_choices.unsqueeze(1)
    p = counts.unsqueeze(0) * valid
    return p / p.sum(-1, keepdim=True)


def chance_reference(
    train_labels: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor, num_classes: int
) -> dict:
    """The guard block of a split: the uniform and majority-class predictors' metrics, chance accuracy
    and its standard error (see the module docstring)."""
    uni = summarize(uniform_probs(n_choices, num_classes).to(torch.float32), labels)
    maj = summarize(majority_probs(train_labels, n_choices, num_classes).to(torch.float32), labels)
    uni["acc"] = float((1.0 / n_choices.to(torch.float64)).mean())  # expected accuracy (ties broken at random)
    c = max(uni["acc"], maj["acc"])
    n = int(labels.shape[0])
    return {"uniform": uni, "majority": maj, "chance_acc": c, "chance_se": math.sqrt(c * (1 - c) / max(n, 1))}


def at_chance(acc: float, reference: dict, z: float = Z_GUARD) -> bool:
    """Is ``acc`` below chance accuracy plus ``z`` standard errors?"""
    return acc < reference["chance_acc"] + z * reference["chance_se"]
