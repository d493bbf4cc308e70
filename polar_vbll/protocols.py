"""The shapes the trainer and the evaluation rely on, as typing ``Protocol``s.

Anything with these methods plugs in: an adapter kind (``PolarModel``, ``LoraAdapter``), a head
(``DeterministicHead``, ``VBLLHead``, ``LastLayerLaplace``), a compute backend (one process:
``polar_vbll.training.local.LocalBackend``; Ray Train workers with DeepSpeed:
``distributed.backend.DeepSpeedBackend``), a head coordinator (``HeadCoordinator`` in one process, the
coordinator actor's client on workers) and a checkpoint store (a run folder, or Ray Train's storage).
Shapes: ``B`` examples of a batch, ``N`` of a split, ``d`` feature width, ``K`` answer letters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from polar_vbll.features import EncodedSplit


@runtime_checkable
class AdapterModel(Protocol):
    """An adapted backbone (``polar_vbll.methods.ADAPTERS``): the HF model holding the adapted layers,
    the trainable parameters split by geometry, state dicts and files."""

    @property
    def base_model(self) -> nn.Module: ...

    def stiefel_parameters(self) -> list[nn.Parameter]:
        """Factors on a Stiefel manifold (U, V), stepped by ``StiefelOptimizer``; ``[]`` for LoRA."""
        ...

    def theta_parameters(self) -> list[nn.Parameter]:
        """Euclidean trainables (Theta; LoRA's A, B), stepped by AdamW."""
        ...

    def adapter_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_adapter_state_dict(self, state_dict: Any, where: str = ...) -> None: ...

    def save_adapter(self, directory: Any) -> Path: ...

    def export_peft_lora(self, directory: Any) -> Path: ...

    def orthogonality_error(self) -> float:
        """``max ||X^T X - I||_F`` over the Stiefel factors (0.0 without any)."""
        ...

    def stable_ranks(self) -> dict[str, float]:
        """Module path -> stable rank ``||dW||_F^2 / ||dW||_2^2`` of its update."""
        ...


@runtime_checkable
class Head(Protocol):
    """A last layer over ``K`` answer letters: features ``(B, d)`` to a loss and probabilities ``(B, K)``
    (letters beyond a question's ``n_choices`` get probability exactly 0)."""

    @property
    def num_classes(self) -> int: ...

    def loss(self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor: ...

    def predict_proba(self, phi: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any: ...


class FeatureProvider(Protocol):
    """What the predictives need: features of a whole split (float32 on the CPU, in the split's order,
    ``(N, d)``, no grad) and the model whose adapter dropout they switch."""

    @property
    def model(self) -> nn.Module: ...

    def prepare(self, enc: EncodedSplit, batch_size: int, progress: bool = False) -> None:
        """The frozen-prefix pass of the cheap path over a split (a no-op on the full path)."""
        ...

    def split_features(self, enc: EncodedSplit, batch_size: int, progress: bool = False) -> torch.Tensor: ...


class Backend(FeatureProvider, Protocol):
    """Where the per-step math runs: one process, or one rank of N data-parallel workers.

    The trainer calls, per optimizer step: :meth:`step_batches` (this rank's share of the step's examples),
    :meth:`features` and :meth:`backward` per micro-batch, :meth:`mean` of the loss across ranks,
    :meth:`reduce_gradients` of the Stiefel factors (one flat all-reduce), then :meth:`theta_step` (the
    Euclidean parameters, owned by the backend: a local AdamW, or a DeepSpeed engine). Collectives must be
    called by every rank at the same point.
    """

    rank: int
    world: int
    sync_check_every: int  # compare replicas every N steps (0: never; one process has nothing to compare)
    # check every step's loss on the host before anything moves (True on the CPU, where a sync is free);
    # False: at logging, validation and checkpoint steps only, so a step never waits for the device
    sync_every_step: bool

    def step_batches(self, step: int, n: int, batch_size: int, seed: int) -> list[list[int]]:
        """This rank's micro-batches (indices into the training split of ``n`` examples) of optimizer step
        ``step``, whose examples over all ranks number ``batch_size``: a pure function of its arguments and
        the rank (one process: ``[batch_indices(step, n, batch_size, seed)]``)."""
        ...

    def features(self, enc: EncodedSplit, idx: Sequence[int]) -> torch.Tensor:
        """``phi`` ``(len(idx), d)`` float32, gradients flowing into the adapters."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (float64)."""
        ...

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None: ...

    def set_theta_lr(self, lr: float) -> None: ...

    def theta_step(self) -> None: ...

    def theta_state_dict(self) -> dict[str, Any]:
        """The Euclidean optimizer's state as a one-process ``torch.optim.AdamW`` holds it."""
        ...

    def load_theta_state_dict(self, state: dict[str, Any]) -> None: ...

    def gathered(self, params: Sequence[nn.Parameter]) -> AbstractContextManager[None]:
        """Full values of (possibly partitioned) parameters inside the block."""
        ...

    def shard(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous shard of ``range(n)``."""
        ...

    def shard_features(self, enc: EncodedSplit, batch_size: int) -> torch.Tensor:
        """``phi`` of this rank's shard (see :meth:`shard`), no grad, ``(stop - start, d)``."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def verify(self, named: dict[str, torch.Tensor], where: str) -> str | None:
        """Check that every rank holds bitwise the same tensors; returns a digest (None in one process)."""
        ...


class Coordinator(Protocol):
    """The eta-phase behind one interface: features and labels in, new head parameters out."""

    @property
    def refits(self) -> int: ...

    #: the last full eta-phase's report (``polar_vbll.heads.fit.FitReport`` as a dict), None before one
    last_report: dict[str, Any] | None

    def refit(
        self,
        key: int,
        features: torch.Tensor,
        labels: torch.Tensor,
        n_choices: torch.Tensor,
        steps: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Refit number ``key`` on this rank's rows; returns ``(head state dict, refits so far)``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...


class CheckpointStore(Protocol):
    """Where checkpoints and a run's final artifacts go, and where progress is reported."""

    def latest(self) -> dict[str, Any] | None:
        """The newest intact checkpoint's state, or None."""
        ...

    def save(self, step: int, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        """Write a checkpoint (``state`` is None on ranks that do not write) and report ``metrics``."""
        ...

    def report(self, metrics: dict[str, Any]) -> None:
        """Report metrics without a checkpoint (mid-training validation: what a search scheduler reads)."""
        ...

    def save_final(
        self, step: int, state: dict[str, Any] | None, metrics: dict[str, Any], artifacts: Path | None
    ) -> None:
        """The last checkpoint with the run's artifacts (adapter, head, results: files staged in the
        directory ``artifacts`` on the writing rank, None elsewhere); the caller removes ``artifacts``."""
        ...


StepHook = Callable[[Any, int], None]
"""``hook(trainer, step)``: called on every rank after each completed step (fault injection, tests)."""
