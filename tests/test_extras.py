"""A missing optional package is one line naming the extra, before any work; tests that need one are
skipped with that reason (polar_vbll.extras, tests/optional.py).

Every entry of ``polar_vbll.extras.ENTRIES`` is walked with its packages hidden: the commands through the
real command line in a fresh process (``tests/fixtures/without.py`` hides the packages as an uninstalled
extra would), the API functions in this process (``sys.modules[name] = None``). Each must stop with exactly
one line that names every missing package and the ``pip install`` that brings it, exit status 2 for a
command, and nothing written. Then the whole suite is collected and its optional tests run with Ray,
DeepSpeed and MLflow hidden: no error, every optional test skipped with the extra named.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from polar_vbll import extras
from polar_vbll.extras import ENTRIES, PACKAGES, MissingExtra, require
from tests.optional import reason

ROOT = Path(__file__).resolve().parent.parent
WITHOUT = ROOT / "tests" / "fixtures" / "without.py"
PACKAGE_DIRS = ("polar_vbll", "distributed", "tune_spaces", "polar_vbll_cli")
INSTALL = re.compile(r"pip install -e (?:'\.\[([a-z,]+)\]'|\.)$")


def _hidden_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def _without(modules, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in a fresh process with ``modules`` not importable."""
    return subprocess.run(
        [sys.executable, str(WITHOUT), ",".join(modules), "-m", *args],
        capture_output=True, text=True, cwd=ROOT, env=_hidden_env(), timeout=timeout,
    )  # fmt: skip


def _assert_names_the_extras(line: str, modules) -> None:
    """One line naming every module's package and the pip command with exactly their extras."""
    assert "\n" not in line.strip(), line
    for m in modules:
        assert PACKAGES[m].label in line, (m, line)
    found = INSTALL.search(line.strip())
    assert found, line
    extras_named = set(filter(None, (found.group(1) or "").split(",")))
    assert extras_named == {PACKAGES[m].extra for m in modules} - {None}, line


# --------------------------------------------------------------------------------------- the helper
def test_require_is_silent_when_everything_is_installed():
    require(*[e for e in ENTRIES if all(extras.installed(m) for m in ENTRIES[e])])


@pytest.mark.parametrize("module", sorted(PACKAGES))
def test_each_package_missing_is_one_line_naming_its_extra(module, monkeypatch):
    """Every line of the table, the planned ones (Ray Serve, Optuna) included."""
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(ENTRIES, "polar-vbll probe", (module,))
    with pytest.raises(MissingExtra) as err:
        require("polar-vbll probe")
    message = str(err.value)
    assert message.startswith(f"polar-vbll probe needs {PACKAGES[module].label}")
    _assert_names_the_extras(message, [module])
    assert isinstance(err.value, ModuleNotFoundError) and err.value.name == module
    if PACKAGES[module].extra is None:
        assert "core dependency" in message and message.endswith("pip install -e .")


def test_only_the_missing_packages_are_named_and_each_once(monkeypatch):
    monkeypatch.setattr(extras, "installed", lambda m: m not in ("deepspeed", "mlflow"))  # whatever is installed
    with pytest.raises(MissingExtra) as err:
        require("polar-vbll train --workers", "polar-vbll train --track", "distributed.launch.train_distributed")
    assert str(err.value) == (
        "polar-vbll train --workers needs DeepSpeed; polar-vbll train --track needs MLflow: "
        "pip install -e '.[dist,track]'"
    )


def test_a_missing_parent_package_hides_its_subpackage(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert not extras.installed("ray.serve") and not extras.installed("ray")


#: Modules of a core or optional package that import another optional package (Ray Tune's searchers).
VIA = {"ray.tune.search.optuna": "optuna", "ray.tune.search.hyperopt": "hyperopt"}


def _optional_imports() -> dict[str, set[str]]:
    """Every import in the four packages of a module in PACKAGES (or below one, or one of :data:`VIA`):
    module -> files."""
    found: dict[str, set[str]] = {}
    for d in PACKAGE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    via = [m for v, m in VIA.items() if name == v or name.startswith(v + ".")]
                    for m in via:
                        found.setdefault(m, set()).add(str(path.relative_to(ROOT)))
                    keys = [k for k in PACKAGES if name == k or name.startswith(k + ".")]
                    if keys:
                        key = max(keys, key=len)  # ray.serve before ray
                        found.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_optional_import_has_an_entry_point_and_every_planned_package_is_unused():
    """A module the code imports is in an entry of ENTRIES (so it is walked below); a package of the table
    that no code imports yet (a planned extra) is named by no entry either."""
    imported = _optional_imports()
    needed = {m for mods in ENTRIES.values() for m in mods}
    assert set(imported) <= needed, f"imported but no entry point requires them: {set(imported) - needed}"
    unused = set(PACKAGES) - set(imported)
    assert unused == set(), unused  # every optional package has code that imports it
    assert not unused & needed


def test_every_extra_the_table_names_for_a_used_package_is_in_pyproject():
    from importlib.metadata import metadata

    declared = metadata("polar-vbll").get_all("Provides-Extra")
    used = {PACKAGES[m].extra for mods in ENTRIES.values() for m in mods} - {None}
    assert used <= set(declared), used - set(declared)


# --------------------------------------------------------------------- every entry, packages hidden
def _cli_args(entry: str, tmp: Path) -> list[str]:
    """The command a user would type for ``entry``, writing (if it got that far) under ``tmp``."""
    out = f"output_dir={tmp / 'runs'}"
    run, q, o = str(tmp / "runs" / "tiny"), str(tmp / "q.jsonl"), str(tmp / "decisions.jsonl")
    return {
        "polar-vbll train": ["train", "--config", "tiny", "--no-track", "--set", out],
        "polar-vbll train --workers": ["train", "--config", "tiny", "--workers", "2", "--no-track", "--set", out],
        "polar-vbll train --track": ["train", "--config", "tiny", "--track", "--set", out],
        "polar-vbll compare": ["compare", "--config", "tiny", "--no-track", "--set", out],
        "polar-vbll compare --track": ["compare", "--config", "tiny", "--track", "--set", out],
        "polar-vbll tune": ["tune", "--space", "priors", "--config", "tiny", "--trials", "2", "--set", out],
        "polar-vbll tune --search optuna": ["tune", "--space", "priors", "--config", "tiny", "--search", "optuna",
                                            "--set", out],
        "polar-vbll tune --search hyperopt": ["tune", "--space", "priors", "--config", "tiny", "--search",
                                              "hyperopt", "--set", out],
        "polar-vbll runs": ["runs", str(tmp / "runs")],
        "polar-vbll eval": ["eval", run],
        "polar-vbll calibrate": ["calibrate", run],
        "polar-vbll predict": ["predict", run, "-i", q, "-o", o],
        "polar-vbll predict --workers": ["predict", run, "-i", q, "-o", o, "--workers", "2"],
        "polar-vbll register": ["register", run, "--name", "x"],
        "polar-vbll serve": ["serve", run, "--port", "8999"],
        "polar-vbll serve MODEL_URI": ["serve", "runs:/0123456789abcdef/model", "--port", "8999"],
    }[entry]


COMMANDS = [e for e in ENTRIES if e.startswith("polar-vbll ")]


@pytest.mark.parametrize("entry", COMMANDS)
def test_every_command_says_which_extra_in_one_line_before_any_work(entry, tmp_path):
    """The real command line in a fresh process, the entry's packages hidden as if their extra were not
    installed: exit 2, one line on stderr naming each package and the extra, nothing on stdout, nothing
    written."""
    modules = ENTRIES[entry]
    (tmp_path / "q.jsonl").write_text('{"question": "q?", "choices": ["a", "b"]}\n')
    done = _without(modules, "polar_vbll_cli", *_cli_args(entry, tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {entry} needs "), done.stderr
    _assert_names_the_extras(lines[0], modules)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]


def test_the_issues_three_commands_with_ray_hidden(tmp_path):
    """Issue #26's acceptance: with Ray hidden, `train --workers 2`, `tune` and `predict --workers 2` each
    print one line naming the `dist` extra and exit 2 (also naming whatever else this environment lacks)."""
    for entry in ("polar-vbll train --workers", "polar-vbll tune", "polar-vbll predict --workers"):
        done = _without(["ray"], "polar_vbll_cli", *_cli_args(entry, tmp_path))
        assert done.returncode == 2 and done.stdout == "", done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"error: {entry} needs Ray") and "'.[dist" in line, line
        _assert_names_the_extras(line, ["ray", *extras.missing(ENTRIES[entry])])
    assert not (tmp_path / "runs").exists()


def test_tracking_by_default_without_mlflow_is_a_note_and_the_run_goes_on(tmp_path):
    """Tracking is on by default only where the `track` extra is installed: without it a run says so and
    trains (``--track`` insists, above). Checked up to the start of work: a bad task stops it there."""
    done = _without(["mlflow"], "polar_vbll_cli", "train", "--config", "tiny", "--no-progress",
                    "--set", f"output_dir={tmp_path}", "--set", "data.task=no_such_task")  # fmt: skip
    assert done.returncode == 2 and "MLflow" not in done.stderr and "no_such_task" in done.stderr, done.stderr


def _tiny_cfg(tmp: Path):
    from polar_vbll.config import load_config, packaged_config

    return load_config(packaged_config("run", "tiny"), [f"output_dir={tmp / 'runs'}"])


def _api_call(entry: str, tmp: Path):
    """A call of the API entry point ``entry`` with plausible arguments."""
    if entry == "distributed.launch.train_distributed":
        from distributed.launch import train_distributed

        return lambda: train_distributed(_tiny_cfg(tmp), workers=2, track=True)
    if entry == "distributed.batch_predict.decide_on_ray":
        from distributed.batch_predict import decide_on_ray

        return lambda: decide_on_ray(tmp / "runs" / "tiny", [], None, workers=2)
    if entry == "distributed.serving":

        def _import_serving():
            sys.modules.pop("distributed.serving", None)
            import distributed.serving  # noqa: F401

        return _import_serving
    if entry == "distributed.server.running":
        from distributed.server import ServeSettings, running

        return lambda: running(tmp / "runs" / "tiny", ServeSettings()).__enter__()
    if entry == "tune_spaces.driver.run_search":
        if not extras.installed("ray"):  # the module itself needs Ray to import (the next entry)
            pytest.skip(reason(["ray"]))
        from tune_spaces.driver import SearchSettings, run_search

        return lambda: run_search(_tiny_cfg(tmp), SearchSettings(space="priors"))
    if entry.startswith("tune_spaces.driver.run_search(searcher="):
        from tune_spaces.driver import SearchSettings, run_search

        searcher = entry.split("'")[1]
        return lambda: run_search(_tiny_cfg(tmp), SearchSettings(space="priors", searcher=searcher))
    if entry == "tune_spaces.spaces":

        def _import():
            for name in ("tune_spaces.spaces", "tune_spaces.driver"):
                sys.modules.pop(name, None)
            import tune_spaces.driver  # noqa: F401

        return _import
    if entry == "polar_vbll.tracking":
        from polar_vbll.tracking import client_for

        return lambda: client_for(f"sqlite:///{tmp / 'mlflow.db'}")
    if entry == "polar_vbll.mlflow_model":

        def _import_model():
            sys.modules.pop("polar_vbll.mlflow_model", None)
            import polar_vbll.mlflow_model  # noqa: F401

        return _import_model
    if entry == "polar_vbll.decisions":
        from polar_vbll.decisions.conformal import ConformalSets, set_metrics
        from polar_vbll.decisions.selective import aurc, risk_threshold

        conf, ok = np.linspace(0.5, 1.0, 20), np.arange(20) % 3 > 0
        calls = [lambda: aurc(conf, ok), lambda: risk_threshold(conf, ok, 0.2),
                 lambda: ConformalSets.calibrate(np.full((20, 2), 0.5), np.arange(20) % 2, 0.2),
                 lambda: set_metrics(np.ones((2, 2, 1), dtype=bool)[..., 0], np.array([0, 1]))]  # fmt: skip
        return calls
    if entry == "polar_vbll.adapters.lora":
        from polar_vbll.adapters.lora import LoraAdapter
        from tests.conftest import make_tiny_llama

        return lambda: LoraAdapter(make_tiny_llama(), {"r": 2, "target_modules": ["q_proj"]})
    if entry == "polar_vbll.tasks.hf_source":
        from polar_vbll.tasks import load_task

        return lambda: load_task(f"csv:{tmp / 'q.csv'}", "train")
    raise AssertionError(f"no call for the API entry {entry!r}: add one here")


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e not in COMMANDS])
def test_every_api_entry_says_which_extra_in_one_line_before_any_work(entry, tmp_path, monkeypatch):
    modules = ENTRIES[entry]
    call = _api_call(entry, tmp_path)
    for name in list(sys.modules) if entry == "tune_spaces.spaces" else ():
        if name.startswith("tune_spaces."):
            monkeypatch.setitem(sys.modules, name, sys.modules[name])  # restored after the forced re-import
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)
    for c in call if isinstance(call, list) else [call]:
        with pytest.raises(MissingExtra) as err:
            c()
        assert str(err.value).startswith(f"{entry} needs "), str(err.value)
        _assert_names_the_extras(str(err.value), modules)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- the suite without the extras
def test_without_ray_deepspeed_and_mlflow_the_suite_collects_and_skips_the_optional_tests(tmp_path):
    """The whole suite collected, and every test marked as needing an extra run, with Ray, DeepSpeed and
    MLflow hidden: no collection error, nothing fails, every one skipped with the extra named."""
    report = tmp_path / "junit.xml"
    done = _without(
        ["ray", "deepspeed", "mlflow"], "pytest", "-q", "-p", "no:cacheprovider", "-m", "extras",
        f"--junitxml={report}", "-o", "junit_family=xunit2", str(ROOT / "tests"), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cases = ET.parse(report).getroot().iter("testcase")
    skipped = {}
    for case in cases:
        assert case.find("failure") is None and case.find("error") is None, ET.tostring(case)
        skip = case.find("skipped")
        assert skip is not None, f"{case.get('classname')}::{case.get('name')} ran without its extras"
        # a test's reason is its message; a module skipped at import says "collection skipped", the reason after
        skipped[f"{case.get('classname')}::{case.get('name')}"] = f"{skip.get('message')} {skip.text or ''}"
    wrong = {t: r for t, r in skipped.items() if not re.search(r"needs .+: pip install -e '\.\[[a-z,]+\]'", r)}
    assert not wrong, wrong
    names = " ".join(skipped)
    for expected in ("test_workers_on_ray_data_give_the_one_process_output",
                     "test_an_unreachable_ray_address_fails_before_any_work",
                     "test_train_is_tracked_in_the_run_folders_mlflow_store",
                     "test_distributed", "test_tune", "test_sharded_loading"):  # fmt: skip
        assert expected in names, (expected, sorted(skipped))


SIGNALS = {"--workers", "--address", "--track"}  # command-line flags that reach an optional package


_MARK = r"extras|for_entry|marks="


def _mark_aliases(tree: ast.Module) -> set[str]:
    """Module-level names bound to a mark (``WORKERS = for_entry("polar-vbll train --workers")``)."""
    return {t.id for n in tree.body if isinstance(n, ast.Assign) and re.search(_MARK, ast.unparse(n.value))
            for t in n.targets if isinstance(t, ast.Name)}  # fmt: skip


def _marked(node: ast.FunctionDef, aliases: set[str] = frozenset()) -> bool:
    return any(re.search(_MARK, ast.unparse(d)) or ast.unparse(d) in aliases for d in node.decorator_list)


def test_tests_that_reach_an_optional_package_are_marked():
    """A test (or fixture) that imports an optional package or passes a flag that needs one (``--workers``,
    ``--address``, ``--track``) carries an ``extras`` mark, or its module skips itself without them
    (``skip_module_unless``): otherwise it fails instead of skipping on a machine without the extra."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == Path(__file__).name:  # hides the packages itself
            continue
        tree = ast.parse(path.read_text())
        aliases = _mark_aliases(tree)
        module_level = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Expr | ast.Assign)]
        if any("skip_module_unless" in s or s.startswith("pytestmark") for s in module_level):
            continue
        for node in ast.walk(tree):
            is_test = node.name.startswith("test_") if isinstance(node, ast.FunctionDef) else False
            if not is_test and not (isinstance(node, ast.FunctionDef) and "fixture" in str(
                    [ast.unparse(d) for d in node.decorator_list])):  # fmt: skip
                continue
            reaches = False
            for n in ast.walk(node):
                if isinstance(n, ast.Constant) and n.value in SIGNALS:
                    reaches = True
                names = [a.name for a in n.names] if isinstance(n, ast.Import) else (
                    [n.module] if isinstance(n, ast.ImportFrom) and n.module else [])  # fmt: skip
                if any(x.split(".")[0] in ("ray", "deepspeed", "mlflow", "tune_spaces") for x in names):
                    reaches = True
            if reaches and not _marked(node, aliases):
                unmarked.append(f"{path.name}:{node.lineno} {node.name}")
    assert not unmarked, "mark these @pytest.mark.extras(...) (tests/optional.py): " + ", ".join(unmarked)
