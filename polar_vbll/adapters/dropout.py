"""Adapter noise (dropout, posterior sampling) and seeded randomness, for every adapter kind.

- :func:`set_adapter_dropout` / :func:`adapter_dropout` switch only the adapters' own noise on or off
  (``PolarLinear.polar_dropout``, peft's ``lora_dropout``, and a Bayesian adapter's posterior sampling:
  BLoB's ``blob_posterior`` modules, which sample in train mode), leaving the backbone in eval mode: on
  while training, off for deterministic features, on again for a sampling predictive (MC dropout, BLoB).
- :func:`seeded_rng` runs a block under a seeded, forked global RNG (dropout masks and peft's
  initialisers draw from the global generators).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from polar_vbll.adapters.layer import PolarLinear


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with the global CPU and CUDA RNGs seeded with ``seed``, restoring them afterwards.

    Dropout and peft's initialisers draw from the global generators (they take no ``generator``), so this
    is the only way to make them reproducible without disturbing the caller's random stream.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------- dropout
def _adapter_dropouts(model: nn.Module) -> list[nn.Module]:
    """The noise modules of the adapters: ``PolarLinear.polar_dropout``, every entry of a peft LoRA layer's
    ``lora_dropout``, and a BLoB layer's ``blob_posterior`` (duck-typed, so peft need not be importable)."""
    found: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, PolarLinear):
            found.append(m.polar_dropout)
            if isinstance(getattr(m, "blob_posterior", None), nn.Module):
                found.append(m.blob_posterior)
        elif isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict):
            found.extend(m.lora_dropout.values())
            if isinstance(getattr(m, "blob_posterior", None), nn.Module):
                found.append(m.blob_posterior)
    return found


def _is_active_dropout(m: nn.Module) -> bool:
    """Whether switching ``m`` on makes passes differ: dropout with ``p > 0``, or posterior sampling."""
    return getattr(m, "samples_in_train_mode", False) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)


def set_adapter_dropout(model: nn.Module, enabled: bool) -> int:
    """Switch the adapters' dropout modules (only those) to train (``enabled``) or eval mode.

    For MC dropout the backbone stays in eval mode (its own attention/hidden dropout off, as at test time)
    while the adapter dropout samples a mask per pass. Works on a :class:`LoraAdapter`, a ``PolarModel``
    or a bare model holding either kind of layer. Note that a later ``model.eval()`` switches them off
    again. Returns how many of the switched modules actually drop something (``p > 0``); 0 means MC
    dropout would repeat one deterministic pass.
    """
    mods = _adapter_dropouts(model)
    for m in mods:
        m.train(enabled)
    return sum(_is_active_dropout(m) for m in mods)


@contextlib.contextmanager
def adapter_dropout(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Context manager form of :func:`set_adapter_dropout` that restores each module's previous mode.
    Yields the number of active (``p > 0``) adapter dropout modules."""
    mods = _adapter_dropouts(model)
    before = [m.training for m in mods]
    try:
        for m in mods:
            m.train(enabled)
        yield sum(_is_active_dropout(m) for m in mods)
    finally:
        for m, t in zip(mods, before, strict=True):
            m.train(t)
