"""Tests of optional packages: marked, and skipped with the reason (the extra to install) where one is missing.

``@pytest.mark.extras("ray", "deepspeed")`` on a test (or ``pytestmark`` on a module) names the optional
modules it needs (keys of ``polar_vbll.extras.PACKAGES``); ``tests/conftest.py`` skips it, before any
fixture runs, with ``needs Ray and DeepSpeed: pip install -e '.[dist]'`` when one is not installed.
:func:`for_entry` marks a test with what an entry point needs; :func:`skip_module_unless` skips a whole
module at import, for modules that import an optional package at their top. ``bash scripts/test.sh``
installs every extra, so nothing is skipped there; ``tests/test_extras.py`` checks that the suite collects
and skips cleanly with Ray, DeepSpeed and MLflow hidden.
"""

from __future__ import annotations

import pytest

from polar_vbll.extras import ENTRIES, PACKAGES, describe, install_hint, missing


def reason(lacking: list[str]) -> str:
    """``needs Ray and DeepSpeed: pip install -e '.[dist]'``."""
    return f"needs {describe(lacking)}: {install_hint(lacking)}"


def for_entry(entry: str) -> pytest.MarkDecorator:
    """The ``extras`` mark of what ``entry`` (a key of ``polar_vbll.extras.ENTRIES``) needs."""
    return pytest.mark.extras(*ENTRIES[entry])


def skip_module_unless(*modules: str) -> None:
    """Skip the calling test module, naming the extra, unless ``modules`` are installed (call it before
    the module imports them)."""
    lacking = missing(modules)
    if lacking:
        pytest.skip(reason(lacking), allow_module_level=True)


def skip_marked(items: list[pytest.Item]) -> None:
    """Add a skip (with :func:`reason`) to every item whose ``extras`` marks name a missing module."""
    for item in items:
        modules = [m for mark in item.iter_markers("extras") for m in mark.args]
        unknown = [m for m in modules if m not in PACKAGES]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.extras names unknown modules {unknown}; "
                                    f"known: {sorted(PACKAGES)}")  # fmt: skip
        lacking = missing(modules)
        if lacking:
            item.add_marker(pytest.mark.skip(reason=reason(lacking)))
