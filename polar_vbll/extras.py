"""Optional packages: which extra installs each, and the one check every entry point makes before any work.

The method runs in one process on the core dependencies. Ray and DeepSpeed (the ``dist`` extra), MLflow
(``track``) and the packages later work adds (Ray Serve: ``serve``, Optuna: ``tune``) are optional; core
dependencies imported lazily (MAPIE, peft, Hugging Face ``datasets``) are checked the same way. Every
command and API function that needs one calls :func:`require` first thing, before it reads data or writes a
folder; a missing package is then one line (a :class:`MissingExtra`, which
the command line prints with exit status 2) naming the extra that installs it::

    polar-vbll train --workers needs Ray and DeepSpeed: pip install -e '.[dist]'

:data:`PACKAGES` says which extra installs each optional module; :data:`ENTRIES` lists every entry point
that needs one (the command line's commands and options, the API functions behind them), and
``tests/test_extras.py`` walks each of them with its packages hidden. A new optional import gets a line in
:data:`PACKAGES` (its extra in ``pyproject.toml``), and the entry point that reaches it a line in
:data:`ENTRIES` and a ``require`` call.

Deliberately light: it imports nothing but the standard library and ``polar_vbll.errors``, so the command
line can check before it imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

from polar_vbll.errors import UserInputError


class MissingExtra(UserInputError, ModuleNotFoundError):
    """An entry point needs an optional package that is not installed; the message is one line naming the
    extra that installs it. Also a ``ModuleNotFoundError``, so code that handles a failed import keeps
    working."""

    def __init__(self, message: str, name: str | None = None):
        ModuleNotFoundError.__init__(self, message, name=name)


@dataclass(frozen=True)
class Package:
    """An optional module: what a user calls it, the extra that installs it (None: a core dependency, so a
    missing one means a broken install), and whether finding it is enough (``import_check``: the module
    ships inside another package, but its own dependencies come with the extra, so it is imported)."""

    label: str
    extra: str | None
    import_check: bool = False


#: Every optional module a polar-vbll entry point may import, by import name.
PACKAGES: dict[str, Package] = {
    "ray": Package("Ray", "dist"),
    "deepspeed": Package("DeepSpeed", "dist"),
    "mlflow": Package("MLflow", "track"),
    # core dependencies (pyproject.toml) that are imported lazily: checked the same way
    "mapie": Package("MAPIE", None),
    "peft": Package("peft", None),
    "datasets": Package("Hugging Face datasets", None),  # hf:, csv:, parquet:, json: data sources
    "ray.serve": Package("Ray Serve", "serve", import_check=True),  # in every Ray wheel; ray[serve] its deps
    "optuna": Package("Optuna", "tune"),
    "hyperopt": Package("HyperOpt", "tune"),
}

#: Every entry point that needs an optional package (as the user types or calls it) and the modules it
#: needs. A command that has several (``train --workers --track``) requires each of its entries at once.
ENTRIES: dict[str, tuple[str, ...]] = {
    # the command line (polar_vbll_cli.app)
    "polar-vbll train": ("mapie",),
    "polar-vbll train --workers": ("ray", "deepspeed"),
    "polar-vbll train --track": ("mlflow",),
    "polar-vbll compare": ("mapie",),
    "polar-vbll compare --track": ("mlflow",),
    "polar-vbll tune": ("ray", "deepspeed", "mlflow", "mapie"),
    "polar-vbll tune --search optuna": ("optuna",),
    "polar-vbll tune --search hyperopt": ("hyperopt",),
    "polar-vbll runs": ("mlflow",),
    "polar-vbll eval": ("mapie",),
    "polar-vbll calibrate": ("mapie",),
    "polar-vbll predict": ("mapie",),
    "polar-vbll predict --workers": ("ray",),
    "polar-vbll register": ("mlflow",),
    "polar-vbll serve": ("ray.serve", "mapie"),  # the `serve` extra brings Ray with Serve's dependencies
    "polar-vbll serve MODEL_URI": ("mlflow",),  # an MLflow model URI instead of a run folder
    # the API behind it, for library use
    "distributed.launch.train_distributed": ("ray", "deepspeed"),
    "distributed.batch_predict.decide_on_ray": ("ray",),
    "distributed.serving": ("ray.serve",),  # the deployment (imports Ray Serve and FastAPI)
    "distributed.server.running": ("ray.serve",),
    "tune_spaces.driver.run_search": ("ray", "deepspeed", "mlflow"),
    "tune_spaces.driver.run_search(searcher='optuna')": ("optuna",),  # SearchSettings(searcher="optuna")
    "tune_spaces.driver.run_search(searcher='hyperopt')": ("hyperopt",),
    "tune_spaces.spaces": ("ray",),
    "polar_vbll.tracking": ("mlflow",),
    "polar_vbll.mlflow_model": ("mlflow",),
    "polar_vbll.decisions": ("mapie",),
    "polar_vbll.adapters.lora": ("peft",),
    "polar_vbll.tasks.hf_source": ("datasets",),  # load_task / Predictor inputs with hf:, csv:, parquet:, json:
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, or for an ``import_check`` package, imported)."""
    try:
        if module in PACKAGES and PACKAGES[module].import_check:
            parts = module.split(".")
            for parent in (".".join(parts[:i]) for i in range(1, len(parts))):
                if parent in sys.modules and sys.modules[parent] is None:
                    return False  # a hidden parent; the import below would return a copy already imported
            importlib.import_module(module)
            return True
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module set to None in sys.modules
        return False


def missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The modules of ``modules`` that are not installed, in order."""
    return [m for m in modules if not installed(m)]


def install_hint(modules: tuple[str, ...] | list[str]) -> str:
    """The pip command that installs ``modules``: the editable install with their extras (a core
    dependency comes with the plain install)."""
    extras = sorted({e for m in modules if (e := PACKAGES[m].extra) is not None})
    return f"pip install -e '.[{','.join(extras)}]'" if extras else "pip install -e ."


def describe(modules: list[str]) -> str:
    """``Ray``, ``Ray and DeepSpeed``, ``MAPIE (a core dependency, missing from this install)``."""
    names = [PACKAGES[m].label for m in modules]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if all(PACKAGES[m].extra is None for m in modules):
        text += " (a core dependency, missing from this install)"
    return text


def message(needs: dict[str, list[str]]) -> str:
    """One line: each entry point and the packages it lacks, then the command that installs them all."""
    parts = [f"{entry} needs {describe(mods)}" for entry, mods in needs.items()]
    return "; ".join(parts) + ": " + install_hint([m for mods in needs.values() for m in mods])


def require(*entries: str) -> None:
    """Raise :class:`MissingExtra` (one line, naming the extra) when a package that one of ``entries``
    (keys of :data:`ENTRIES`) needs is not installed; call it before any work."""
    needs: dict[str, list[str]] = {}
    seen: set[str] = set()
    for entry in entries:
        lacking = [m for m in missing(ENTRIES[entry]) if m not in seen]
        seen.update(lacking)
        if lacking:
            needs[entry] = lacking
    if needs:
        first = next(iter(needs.values()))[0]
        raise MissingExtra(message(needs), name=first)
