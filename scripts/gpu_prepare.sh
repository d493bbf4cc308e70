#!/usr/bin/env bash
# Here, once before a GPU check (needs the bundled packages: bash scripts/setup.sh): the main job's SST-2
# splits and the bundled tokenizer (bench/gpu_check.py --export), and the wheels the GPU machine lacks
# (pydantic and its parts, MAPIE, hjson, gguf, and DeepSpeed's source distribution), all into .gpu/
# (git-ignored; about 8 MB). Then one device call runs scripts/gpu_check.sh with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY bench/gpu_check.py --export --data .gpu "$@"
mkdir -p .gpu/whl
# the GPU machine runs Python 3.12 on x86-64 (its torch, transformers, peft, numpy, scikit-learn are kept)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .gpu/whl "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
  "mapie==1.6.0" "hjson==3.1.0" "gguf==0.19.0"
$PY -m pip download -q --no-deps --no-binary=:all: -d .gpu/whl "deepspeed==0.19.8"
du -sh .gpu
echo "ready: one device call with carry [\".gpu\"] and the command: bash scripts/gpu_check.sh"
