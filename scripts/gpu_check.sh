#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py), as one device call runs it: installs the wheels that
# scripts/gpu_prepare.sh left in .gpu/whl (and DeepSpeed from its source distribution, no ops built) into
# /tmp/site, then runs the check within BUDGET_S seconds (default 270: the call ends inside 6 minutes) and
# writes gpu_check.md / gpu_check.json to $OUT. Extra arguments go to bench/gpu_check.py, e.g. --gguf FILE.
# The CPU dry run (CI): DATA=<exported folder> PYTHON=.venv/bin/python bash scripts/gpu_check.sh --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${DATA:-.gpu}
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 POLAR_VBLL_CACHE=${POLAR_VBLL_CACHE:-/tmp/polar-vbll-cache}
if compgen -G "$DATA/whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$DATA"/whl/*.whl
  if compgen -G "$DATA/whl/deepspeed-*.tar.gz" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
      "$DATA"/whl/deepspeed-*.tar.gz || echo "warning: DeepSpeed did not install; section (c) will say so"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PYTHON" bench/gpu_check.py --data "$DATA" --out "${OUT:-gpu-check}" --budget-s "${BUDGET_S:-270}" "$@"
