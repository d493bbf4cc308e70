#!/usr/bin/env bash
# README command 1: set up (once) and run the main job on the bundled SmolLM2 and real ARC-Easy data.
# Extra arguments go to `polar-vbll compare`, e.g. `bash scripts/main.sh --set base.train.steps=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/polar-vbll compare --config main "$@"
