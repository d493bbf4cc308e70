"""The predictives: how a trained model's class probabilities are made, and what they cost.

Registered by name in ``polar_vbll.methods.PREDICTIVES``:

- ``one_pass`` (:func:`predict`): one backbone pass per example (on the cheap path, the adapted blocks
  only), the head's predictive. For a Bayesian head (VBLL, Laplace) the uncertainty comes from the head's
  posterior over K logits, not from more passes.
- ``mc_dropout`` (:func:`predict_mc_dropout`; Gal & Ghahramani 2016): the backbone in eval mode, the
  *adapter* dropout on, ``n_samples`` stochastic passes averaged in probability space,
  ``p(y|x) ~= (1/S) sum_s softmax(z_s)``. Costs ``n_samples`` passes (10 in the BLoB protocol). On the
  cached-prefix path a pass runs only the adapted top blocks: the frozen blocks below carry no adapter,
  hence no dropout, so their cached outputs are the same for every sample.
- ``ensemble`` (:func:`predict_ensemble`, :func:`ensemble_predictions`; Lakshminarayanan et al. 2017):
  the equal-weight mixture of independently seeded members, one pass per member; members are swapped
  through one model, so one backbone is ever in memory and the frozen-prefix cache is shared.

Every predictive reads features through a :class:`~polar_vbll.protocols.FeatureProvider` (a
``FeatureSource`` in one process, a ``Backend`` on workers) and returns :class:`Predictions` in the split's
original order. Averages are taken in float64, in probability space (never over logits: that would be a
sharper, differently calibrated predictive than the one each baseline is defined by).

Besides the probabilities, every predictive reports per example the **logit variance** (the mean over
valid classes of the variance of the logits under the method's posterior: a Bayesian head's closed form;
over dropout passes or ensemble members, the variance of the log-probabilities; 0 for a single
deterministic model) and the **epistemic** score (the mutual information between the label and the
parameters, in nats: the entropy of the mean predictive minus the mean entropy over posterior samples,
passes or members; 0 for a single deterministic model).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from polar_vbll.adapters.dropout import adapter_dropout, seeded_rng
from polar_vbll.features import EncodedSplit, length_sorted_batches
from polar_vbll.heads.predictive import mutual_information
from polar_vbll.metrics import CalibrationAccumulator
from polar_vbll.placement import to_device
from polar_vbll.protocols import FeatureProvider
from polar_vbll.token_rows import row_lengths

#: Samples (= backbone passes) per example in the BLoB protocol.
DEFAULT_MC_SAMPLES = 10


@dataclass
class Predictions:
    """Per-example predictive probabilities ``(N, K)`` in the split's original order, the labels, and the
    per-example ``logit_var`` and ``epistemic`` scores (N,) (see the module docstring; None when not
    computed, e.g. after temperature scaling)."""

    split: str
    probs: torch.Tensor
    labels: torch.Tensor
    logit_var: torch.Tensor | None = None
    epistemic: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """ACC, ECE, NLL, Brier and n (fractions), AURC (the area under the risk-coverage curve of the
        max-probability ranking, ``polar_vbll.decisions.selective``) and the mean logit variance and
        epistemic score."""
        from polar_vbll.decisions.selective import aurc, confidence_and_correct

        out = self.accumulator().compute()
        out["aurc"] = aurc(*confidence_and_correct(self.probs, self.labels))
        for name in ("logit_var", "epistemic"):
            value = getattr(self, name)
            out[name] = float(value.to(torch.float64).mean()) if value is not None else None
        return out

    def accumulator(self) -> CalibrationAccumulator:
        acc = CalibrationAccumulator()
        acc.update(self.probs, self.labels)
        return acc


def head_probabilities(head, phi: torch.Tensor, enc: EncodedSplit, batch_size: int) -> torch.Tensor:
    """``head.predict_proba`` over a split's features ``(N, d)``, in length-sorted batches of
    ``batch_size`` (float32, CPU, ``(N, K)``)."""
    return head_outputs(head, phi, enc, batch_size, uncertainty=False)[0]


def head_outputs(
    head, phi: torch.Tensor, enc: EncodedSplit, batch_size: int, uncertainty: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(probs (N, K), {"logit_var": (N,), "epistemic": (N,)})`` of a head over a split's features, in
    length-sorted batches; a head without ``uncertainty`` (a single deterministic model) scores 0."""
    device = head_device(head)
    phi = phi.to(device)  # a head predicts where it lives: the backbone's device, or the CPU (float64 post-hoc heads)
    probs = torch.zeros((len(enc), head.num_classes), dtype=torch.float32, device=device)
    extras = {k: torch.zeros(len(enc), dtype=torch.float32, device=device) for k in ("logit_var", "epistemic")}
    scorer = getattr(head, "uncertainty", None) if uncertainty else None
    n_choices = to_device(enc.n_choices, device)
    for batch in length_sorted_batches(row_lengths(enc.ids), batch_size):
        idx = to_device(torch.tensor(batch), device)
        c = n_choices[idx]
        probs[idx] = head.predict_proba(phi[idx], c).to(torch.float32)
        if scorer is not None:
            for k, v in scorer(phi[idx], c).items():
                extras[k][idx] = v.to(torch.float32)
    return probs.cpu(), {k: v.cpu() for k, v in extras.items()}


def head_device(head) -> torch.device:
    """Where a head's parameters (or buffers) live; the CPU for a head that holds no tensor."""
    for t in (*head.parameters(), *head.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def predict(
    source: FeatureProvider, head, enc: EncodedSplit, batch_size: int, progress: bool = True
) -> Predictions:
    """The ``one_pass`` predictive: one backbone pass per example, adapter dropout off."""
    with adapter_dropout(source.model, False):
        phi = source.split_features(enc, batch_size, progress)
    probs, extras = head_outputs(head, phi, enc, batch_size)
    return Predictions(enc.name, probs, enc.labels.clone(), **extras)


def sample_moments(samples: Sequence[torch.Tensor], n_choices: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logit variance and epistemic score of an equal-weight mixture of predictives ``samples`` (each
    (N, K): dropout passes or ensemble members): the variance over samples of the log-probabilities,
    averaged over valid classes, and the mutual information (float32, (N,))."""
    stack = torch.stack([p.to(torch.float64) for p in samples])  # (S, N, K)
    logp = torch.log(stack.clamp_min(1e-12))
    valid = torch.arange(stack.shape[-1]).unsqueeze(0) < n_choices.unsqueeze(1)
    var = logp.var(0, unbiased=False) if len(samples) > 1 else torch.zeros_like(logp[0])
    return {
        "logit_var": ((var * valid).sum(-1) / valid.sum(-1)).to(torch.float32),
        "epistemic": mutual_information(stack).to(torch.float32),
    }


def _warn_if_deterministic(n_active: int) -> None:
    if n_active == 0:
        warnings.warn(
            "MC dropout: the model has no adapter dropout with p > 0, so every sample is the same "
            "deterministic pass (set the adapter's `dropout` > 0 to get an MC-dropout predictive)",
            stacklevel=3,
        )


@torch.no_grad()
def predict_mc_dropout(
    source: FeatureProvider,
    head,
    enc: EncodedSplit,
    batch_size: int,
    n_samples: int = DEFAULT_MC_SAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> Predictions:
    """The ``mc_dropout`` predictive: ``n_samples`` stochastic passes over the split with adapter dropout
    on (backbone in eval mode), probabilities averaged in float64.

    Reproducible: the passes run under a seeded, forked RNG (the same seed, batch size and split give the
    same probabilities; the caller's random stream is untouched). The frozen prefix is prepared first,
    outside the seeded block, so the result does not depend on whether the cache was already filled.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    source.prepare(enc, batch_size, progress=progress)
    passes: list[torch.Tensor] = []
    with seeded_rng(seed), adapter_dropout(source.model, True) as n_active:
        _warn_if_deterministic(n_active)
        for _ in range(n_samples):
            phi = source.split_features(enc, batch_size, progress)
            passes.append(head_probabilities(head, phi, enc, batch_size).to(torch.float64))
    mean = torch.stack(passes).mean(0)
    return Predictions(enc.name, mean.to(torch.float32), enc.labels.clone(), **sample_moments(passes, enc.n_choices))


def ensemble_predictions(members: Sequence[Predictions], n_choices: torch.Tensor | None = None) -> Predictions:
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
    if n_choices is None:  # every class a member gave probability > 0 counts as a choice
        n_choices = (mean > 0).sum(-1)
    extras = sample_moments([m.probs.detach().cpu() for m in members], n_choices.cpu())
    return Predictions(first.split, mean.to(torch.float32), first.labels.clone(), **extras)


@torch.no_grad()
def predict_ensemble(
    adapter,
    source: FeatureProvider,
    enc: EncodedSplit,
    batch_size: int,
    members: Sequence[tuple[Mapping[str, torch.Tensor], object]],
    progress: bool = True,
) -> Predictions:
    """The ``ensemble`` predictive: each member ``(adapter_state_dict, head)`` loaded into ``adapter`` (the
    adapter ``source`` reads) and evaluated with :func:`predict`, then averaged. The adapter's own state is
    restored afterwards. Members must share the adapter layout (same config, different seeds), so the
    cached frozen prefix of ``source`` is valid for all of them."""
    saved = adapter.adapter_state_dict()
    preds: list[Predictions] = []
    try:
        for i, (state, head) in enumerate(members):
            adapter.load_adapter_state_dict(state, where=f"ensemble member {i}")
            preds.append(predict(source, head, enc, batch_size, progress=progress))
    finally:
        adapter.load_adapter_state_dict(saved, where="the adapter's own state")
    return ensemble_predictions(preds, enc.n_choices)
