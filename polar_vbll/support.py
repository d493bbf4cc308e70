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


def check_supported(cfg: RunConfig, entry: EntryPoint) -> None:
    """Refuse, with one line, the first field of ``cfg`` that ``entry`` does not run."""
    default = RunConfig(method=cfg.method)
    for path, refusal in entry.refused.items():
        value = field_value(cfg, path)
        ok = refusal.allowed(value) if refusal.allowed is not None else value == field_value(default, path)
        if not ok:
            raise ConfigError(f"{entry.name} does not run {path} = {value!r}: {refusal.reason}")
