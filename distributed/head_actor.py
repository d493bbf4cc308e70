"""The driver-side head coordinator: ``polar_vbll.training.coordinator.HeadCoordinator`` behind a Ray actor.

After each theta-round every worker sends the features and labels of its shard; when all ranks of the
round have arrived, the actor concatenates them in rank order (which is the global example order, see
``distributed.sharding``), runs the one eta-phase implementation (``HeadCoordinator.refit``) and answers
every waiting worker with the same head parameters. The eta-phase math is not repeated here.

Fault tolerance: the actor is owned by the driver, so it outlives a worker-group restart. A restarted
group calls :meth:`HeadCoordinatorService.start` with the coordinator state of the checkpoint it resumes
from; that opens a new *generation*, and contributions or waiters of the old one are refused. A worker that
hits an error no restart can fix (replicas diverged, loss non-finite, bad input) records it with
:meth:`record_fatal`; restarted workers read it and stop at once instead of repeating the failure.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polar_vbll.config import HeadFitConfig
from polar_vbll.training.coordinator import HeadCoordinator


class StaleGeneration(RuntimeError):
    """A contribution from a worker group that has since been replaced."""


@dataclass
class _Round:
    world: int
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    collected: int = 0


class HeadCoordinatorService:
    """The actor's body as a plain asyncio class (``ray.remote`` wraps it; tests drive it directly)."""

    def __init__(self) -> None:
        self._coordinator: HeadCoordinator | None = None
        self._generation = 0
        self._rounds: dict[int, _Round] = {}
        self._fatal: str | None = None

    async def start(
        self, head: nn.Module, fit: HeadFitConfig | dict, state: dict[str, Any] | None, warm: bool = False
    ) -> int:
        """(Re)build the coordinator around ``head``, optionally from a checkpointed state (``warm``: keep
        this config's optimizer settings, a warm start); returns the new generation number that every
        contribution must carry."""
        self._generation += 1
        for r in self._rounds.values():  # wake waiters of the replaced group
            r.error = StaleGeneration("the worker group was restarted")
            r.done.set()
        self._rounds = {}
        fit_cfg = fit if isinstance(fit, HeadFitConfig) else HeadFitConfig.model_validate(fit)
        self._coordinator = HeadCoordinator(head, fit_cfg)
        if state is not None:
            self._coordinator.load_state_dict(state, keep_settings=warm)
        return self._generation

    async def refit_shard(
        self,
        generation: int,
        key: int,
        rank: int,
        world: int,
        features: torch.Tensor,
        labels: torch.Tensor,
        n_choices: torch.Tensor,
        steps: int | None,
    ) -> dict[str, Any]:
        """Contribute rank ``rank``'s rows to refit number ``key``; returns ``{"head": state dict,
        "refits": count}`` once all ``world`` ranks have contributed (the same object for all)."""
        if generation != self._generation or self._coordinator is None:
            raise StaleGeneration(f"generation {generation} is not the current one ({self._generation})")
        r = self._rounds.setdefault(key, _Round(world))
        if r.world != world or rank in r.parts:
            raise RuntimeError(f"refit {key}: unexpected contribution from rank {rank} of {world}")
        r.parts[rank] = (features, labels, n_choices)
        if len(r.parts) == world:
            try:
                ordered = [r.parts[i] for i in range(world)]
                f, y, c = (torch.cat([p[j] for p in ordered]) for j in range(3))
                head = self._coordinator.refit(f, y, c, steps)
                r.result = {"head": head, "refits": self._coordinator.refits,
                            "report": self._coordinator.last_report}  # fmt: skip
            except Exception as exc:  # every waiting rank gets the error, not a hang
                r.error = exc
            r.done.set()
        await r.done.wait()
        r.collected += 1
        if r.collected == r.world:
            self._rounds.pop(key, None)
        if r.error is not None:
            raise r.error
        assert r.result is not None
        return r.result

    async def state_dict(self) -> dict[str, Any]:
        if self._coordinator is None:
            raise RuntimeError("the head coordinator has not been started")
        return self._coordinator.state_dict()

    async def record_fatal(self, message: str) -> None:
        self._fatal = self._fatal or message

    async def fatal(self) -> str | None:
        return self._fatal


#: How often Ray restarts a dead coordinator actor (a crashed or killed process, a lost node). A restarted
#: actor starts empty; the worker group, restarted by Ray Train from its last checkpoint, hands it that
#: checkpoint's head state (``CoordinatorClient.start``), so the run continues where the checkpoint was.
COORDINATOR_RESTARTS = 3


def head_coordinator_actor():
    """The Ray actor class (created lazily so that importing this module does not need Ray)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=COORDINATOR_RESTARTS)(HeadCoordinatorService)


class CoordinatorClient:
    """A worker's view of the coordinator actor (the :class:`~polar_vbll.protocols.Coordinator` of a
    distributed run): blocking calls tagged with this group's generation."""

    def __init__(self, handle, rank: int, world: int) -> None:
        self.handle = handle
        self.rank = rank
        self.world = world
        self.generation: int | None = None
        self.refits = 0
        self.last_report: dict[str, Any] | None = None

    def fatal(self) -> str | None:
        import ray

        return ray.get(self.handle.fatal.remote())

    def record_fatal(self, message: str) -> None:
        import ray

        ray.get(self.handle.record_fatal.remote(message))

    def start(
        self, head: nn.Module | None, fit: HeadFitConfig, state: dict[str, Any] | None, warm: bool = False
    ) -> None:
        """Rank 0 (re)starts the coordinator (``warm``: a warm start's state); every rank learns the
        generation. A collective."""
        import ray

        from distributed.collectives import broadcast_object

        if head is not None:  # the actor fits on the CPU (and may run where no GPU is): a CPU copy travels
            head = copy.deepcopy(head).to("cpu")
        gen = ray.get(self.handle.start.remote(head, fit, state, warm)) if self.rank == 0 else None
        self.generation = int(broadcast_object(gen))  # type: ignore[arg-type]
        self.refits = int(state["refits"]) if state is not None else 0
        self.last_report = state.get("last_report") if state is not None else None

    def refit(
        self,
        key: int,
        features: torch.Tensor,
        labels: torch.Tensor,
        n_choices: torch.Tensor,
        steps: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Send this rank's rows; returns the new head state and the coordinator's refit count."""
        import ray

        ref = self.handle.refit_shard.remote(
            self.generation,
            key,
            self.rank,
            self.world,
            features.detach().cpu(),
            labels.cpu(),
            n_choices.cpu(),
            steps,
        )
        try:
            out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the refit's own error (HeadFitDiverged), not Ray's wrapper
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        self.refits = int(out["refits"])
        self.last_report = out.get("report")
        return out["head"], self.refits

    def state_dict(self) -> dict[str, Any]:
        import ray

        return ray.get(self.handle.state_dict.remote())
