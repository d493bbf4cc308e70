"""Search spaces written as YAML files (``polar-vbll tune --space path/to/space.yaml``).

A space file is a flat mapping from dotted run-config keys to a domain, or to a plain value for a setting
every trial shares::

    method: polar_vbll                                  # fixed
    optim.lr_theta: {loguniform: [1.0e-4, 1.0e-2]}      # log-uniform on [low, high]
    head.vbll.prior_scale: {uniform: [0.1, 1.0]}        # uniform on [low, high]
    polar.r: {choice: [4, 8]}                           # one of the values
    head.vbll.cov_rank: {randint: [1, 5]}               # an integer in [low, high): 1..4
    head.vbll.dof: {quniform: [1.0, 5.0, 0.5]}          # uniform, rounded to a multiple of q
    optim.lr_stiefel: {qloguniform: [1.0e-3, 1.0e-2, 1.0e-3]}
    head.fit.optimizer: {grid_search: [lbfgs, adam]}    # every value (random search only)

Each domain becomes the ``ray.tune`` domain of the same name. :func:`load_space_file` refuses, in one
line naming the file and the key, bad YAML, a value that is not a mapping, an unknown domain, wrong
bounds; the driver then checks every key and value against the run config (``check_space``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from polar_vbll.errors import ConfigError, UserInputError

#: A domain's name -> how many numbers it takes (None: a non-empty list of values).
DOMAINS: dict[str, tuple[str, ...] | None] = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "qloguniform": ("low", "high", "q"),
    "randint": ("low", "high"),
    "choice": None,
    "grid_search": None,
}
ALLOWED = ", ".join(f"{{{name}: [{', '.join(args) if args else 'values...'}]}}" for name, args in DOMAINS.items())


@dataclass(frozen=True)
class SpaceSource:
    """Where a space came from: a named space of ``tune_spaces.spaces``, or a file (absolute path and the
    sha256 of its bytes, so that a resumed search with an edited file is refused)."""

    name: str
    path: str | None = None
    sha256: str | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None

    def record(self) -> dict[str, str]:
        """What search.json and the parent run's params record (``space.file``, ``space.sha256``)."""
        return {"space.file": self.path, "space.sha256": self.sha256} if self.is_file else {"space.name": self.name}


def looks_like_file(spec: str) -> bool:
    """Whether ``--space`` names a file (a ``.yaml``/``.yml`` name, a path, or an existing file), not a
    named space."""
    return spec.endswith((".yaml", ".yml")) or "/" in spec or "\\" in spec or Path(spec).is_file()


def load_space_file(path: str | Path) -> tuple[dict[str, Any], SpaceSource]:
    """The ``ray.tune`` param space of the YAML file ``path`` and its source (absolute path, sha256).

    Raises :class:`UserInputError` for a missing or unreadable file, :class:`ConfigError` (one line: the
    file, the key, what is allowed) for bad YAML, a non-mapping, an unknown domain or bad bounds."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise UserInputError(f"space file {path} not found (give a YAML file or a named space)")
    raw = file.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"space file {file}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"space file {file}: expected a mapping of dotted config keys to domains or values, e.g. "
            "`optim.lr_theta: {loguniform: [1.0e-4, 1.0e-2]}`"
        )
    space = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"space file {file}: key {key!r} is not a dotted config key (e.g. head.vbll.prior_scale)")
        space[key] = to_domain(value, f"space file {file}: {key}")
    return space, SpaceSource(name=file.stem, path=str(file), sha256=hashlib.sha256(raw).hexdigest())


def to_domain(value: Any, where: str) -> Any:
    """One entry of a space file as a ``ray.tune`` domain (a ``{"grid_search": [...]}`` dict for grid
    search), or the plain value itself; ``where`` prefixes the one-line :class:`ConfigError`."""
    from ray import tune

    if not isinstance(value, dict):
        return value  # a fixed setting (a number, a string, a list such as polar.target_modules)
    if len(value) != 1 or next(iter(value)) not in DOMAINS:
        names = ", ".join(map(str, value)) or "an empty mapping"
        raise ConfigError(f"{where}: unknown domain {names}; allowed: {ALLOWED}, or a plain value")
    (kind, args), = value.items()
    wanted = DOMAINS[kind]
    if wanted is None:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} takes a non-empty list of values, e.g. {{{kind}: [4, 8]}}")
        return {"grid_search": list(args)} if kind == "grid_search" else tune.choice(list(args))
    if (not isinstance(args, list) or len(args) != len(wanted)
            or any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in args)):  # fmt: skip
        raise ConfigError(f"{where}: {kind} takes [{', '.join(wanted)}] (numbers), got {args!r}")
    if not all(math.isfinite(a) for a in args):
        raise ConfigError(f"{where}: {kind} takes finite numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise ConfigError(f"{where}: {kind} needs 0 < low, got {low}")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint takes integers [low, high) (high excluded), got {args!r}")
        return tune.randint(low, high)
    if len(args) == 3 and not args[2] > 0:
        raise ConfigError(f"{where}: {kind} needs q > 0, got {args[2]}")
    make: dict[str, Callable[..., Any]] = {
        "uniform": tune.uniform, "loguniform": tune.loguniform,
        "quniform": tune.quniform, "qloguniform": tune.qloguniform,
    }  # fmt: skip
    return make[kind](*(float(a) for a in args))
