#!/usr/bin/env bash
# README command 1: set up (once) and run the main job on the bundled SmolLM2 and GLUE SST-2.
# Extra arguments go to `polar-vbll compare`, e.g. `bash scripts/main.sh --set base.train.steps=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
# the track extra too: the main job records itself in the local MLflow store (runs/main/mlflow/)
POLAR_VBLL_EXTRAS="${POLAR_VBLL_EXTRAS:-dev,track}" bash scripts/setup.sh
exec .venv/bin/polar-vbll compare --config main "$@"
