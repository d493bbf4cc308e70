#!/usr/bin/env bash
# README command 2, and exactly what CI runs (.ci/run calls this and adds nothing): set up (once) with every
# extra the tests exercise (dev, dist: Ray + DeepSpeed, track: MLflow, serve: Ray Serve, tune: Optuna + HyperOpt), then ruff, the import floors and the
# default test suite (slow tests deselected; `bash scripts/test.sh -m slow` runs those). Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export POLAR_VBLL_EXTRAS="${POLAR_VBLL_EXTRAS:-dev,dist,track,serve,tune}"
# The tests' own caches stay in the checkout: the converted model, and DeepSpeed's (unused) op builds.
export POLAR_VBLL_CACHE="${POLAR_VBLL_CACHE:-$PWD/.cache/polar-vbll}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
# Ray Train blocks each report about this long (2 s by default): the distributed tests report every step.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.1}"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
