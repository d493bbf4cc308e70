"""Which run-config fields each entry point honours, and the one-line refusal of the rest.

Every entry point (``train``, ``train --workers``, ``compare``, a search trial) reads the whole config and
passes it to the same trainer and evaluation; a few values it cannot run are refused before any work, with
one line naming the field, the value and the reason (:func:`check_supported`, a ``ConfigError``: exit 2).
``tests/test_entry_points.py`` holds the table of every field against every entry point, so a new field
must be classified there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from polar_vbll.config import RunConfig
from polar_vbll.errors import ConfigError


@dataclass(frozen=True)
class Refused:
    """A field an entry point does not run: ``allowed(value)`` says which values it does run (None: only
    the field's default)."""

    reason: str
    allowed: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class EntryPoint:
    """An entry point's name (as the user types it) and the fields it refuses."""

    name: str
    refused: Mapping[str, Refused]


#: ``polar-vbll train`` (one process) runs every field.
TRAIN = EntryPoint("polar-vbll train", {})


def config_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf field of a config model as a dotted path (``head.vbll.prior_scale``), in order."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += config_fields(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def field_value(cfg: BaseModel, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


#: Optimizer settings that act on Stiefel factors only.
STIEFEL_OPTIM = ("optim.method", "optim.retraction", "optim.second_moment", "optim.lr_stiefel",
                 "optim.landing_lambda", "optim.landing_safe_distance")  # fmt: skip
#: Settings that act only on the eta-phase's schedule (a head the coordinator refits).
REFIT_SCHEDULE = ("train.alternation", "train.round_steps", "train.final_head_refit")
#: Settings of the training loop (a method that does not train reads none of them).
TRAINING_ONLY = ("train.steps", "train.batch_size", "train.checkpoint_every", "train.keep_checkpoints",
                 "train.eval_every", "train.activation_checkpointing", "train.compile")  # fmt: skip


def used_by(method: str, path: str) -> bool:
    """Whether ``method`` (a name in ``polar_vbll.methods.METHODS``) reads the config field ``path``: decided
    by the registry (its adapter kind's section, its head kind's sections, its predictive's settings,
    whether it trains and whether its head is refitted), one rule for every field."""
    from polar_vbll.methods import ADAPTERS, METHODS, PREDICTIVES

    m = METHODS[method]
    section, _, rest = path.partition(".")
    if section in {kind.section for kind in ADAPTERS.values()}:
        return section == m.adapter_kind.section
    if section == "optim":
        return m.trains and (m.adapter_kind.stiefel or path not in STIEFEL_OPTIM)
    if section == "head":
        return rest.split(".")[0] in m.head_kind.reads
    claimed = [k for k in PREDICTIVES.values() if any(path == s or (s.endswith(".") and path.startswith(s))
                                                       for s in k.settings)]  # fmt: skip
    if claimed:  # a setting only some predictives read
        return m.predictive_kind in claimed
    if path in REFIT_SCHEDULE:
        return m.trains and m.head_kind.refitted
    if path in TRAINING_ONLY:
        return m.trains
    return True


def explicit_fields(cfg: BaseModel, prefix: str = "") -> list[str]:
    """The dotted paths of the fields a config was given (a YAML file's keys, ``--set`` overrides, a
    method's defaults), not those left at their defaults."""
    out: list[str] = []
    for name in sorted(cfg.model_fields_set):
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            out += explicit_fields(value, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def unused_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings ``cfg`` was given that its method does not read (:func:`used_by`), with their values: what
    a run records as unused (``results.json`` ``unused_settings``, ``params.json``) and warns about once."""
    return {p: field_value(cfg, p) for p in explicit_fields(cfg) if not used_by(cfg.method, p)}


def unused_note(cfg: RunConfig) -> str | None:
    """The one line a run prints about :func:`unused_settings` (None when there are none)."""
    unused = unused_settings(cfg)
    if not unused:
        return None
    shown = ", ".join(f"{k}={v!r}" for k, v in list(unused.items())[:8])
    more = f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""
    return (f"note: {cfg.method} does not use {shown}{more}; recorded as unused (results.json unused_settings) "
            "and without effect on this run")  # fmt: skip


def check_supported(cfg: RunConfig, entry: EntryPoint) -> None:
    """Refuse, with one line, the first field of ``cfg`` that ``entry`` does not run."""
    default = RunConfig(method=cfg.method)
    for path, refusal in entry.refused.items():
        value = field_value(cfg, path)
        ok = refusal.allowed(value) if refusal.allowed is not None else value == field_value(default, path)
        if not ok:
            raise ConfigError(f"{entry.name} does not run {path} = {value!r}: {refusal.reason}")
