"""Activation checkpointing of the adapted decoder blocks (``train.activation_checkpointing``).

With it on, an adapted block keeps only its input during the forward pass and recomputes its activations
during the backward pass (``torch.utils.checkpoint``, non-reentrant; the RNG state is replayed, so adapter
dropout draws the same mask twice): activation memory falls from one block's intermediates per adapted
block to one block's, for about one more forward of the adapted blocks per step. Frozen blocks carry no
gradient and are never checkpointed (on the cheap path they do not even run during training).

transformers' own ``gradient_checkpointing_enable`` is not used: it checkpoints only modules in training
mode, and the backbone here always stays in eval mode (no backbone dropout; adapter dropout is switched
separately), so it would silently do nothing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from polar_vbll.architecture import blocks_of

_FLAG = "_polar_vbll_checkpointed"


def adapted_blocks(model: nn.Module) -> list[int]:
    """Indices of the decoder blocks holding a trainable parameter (an adapter)."""
    layers = blocks_of(model)
    return [i for i, block in enumerate(layers) if any(p.requires_grad for p in block.parameters())]


def enable_activation_checkpointing(model: nn.Module) -> list[int]:
    """Checkpoint every adapted block of ``model`` (in place; idempotent). Returns their indices. A block
    is recomputed in the backward only when it runs with gradients enabled; evaluation is unchanged."""
    layers = blocks_of(model)
    done = adapted_blocks(model)
    for i in done:
        block = layers[i]
        if getattr(block, _FLAG, False):
            continue
        forward = block.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        setattr(block, _FLAG, True)
    return done


def compile_blocks(model: nn.Module) -> list[int]:
    """``train.compile``: compile every decoder block of ``model`` with ``torch.compile`` (in place; regional
    compilation, so the frozen-prefix and adapted-suffix views of the cheap path, which share the blocks,
    run the compiled code too; dynamic shapes, since batches differ in length). Returns the blocks'
    indices. The first steps pay the compilation; with activation checkpointing the compiled block is the
    one recomputed."""
    layers = blocks_of(model)
    for block in layers:
        block.compile(dynamic=True)
    return list(range(len(layers)))
