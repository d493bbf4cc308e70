"""Peak resident memory of a few training steps of one configuration, in a fresh interpreter.

Called by ``common.probe_memory`` (one subprocess per configuration) with a JSON spec; prints one JSON line:
``rss_setup_kib`` (after building the model, adapter, head and optimizers, before the first step),
``peak_kib`` (VmHWM over the steps, reset just before them) and ``overhead_kib`` (their difference: the
memory training itself needs, i.e. activations, gradients and optimizer state).

    python bench/memprobe.py '{"adapter": {"kind": "polar"}, "head": "vbll"}'
"""

from __future__ import annotations

import gc
import json
import sys
import warnings

import torch
from common import (
    SMALL,
    AdapterSpec,
    OptimSpec,
    Shape,
    TrainStep,
    attach_adapter,
    build_llama,
    make_batch,
    make_head,
    read_rss_kb,
    reset_peak_rss,
    set_threads,
)


def main(spec: dict) -> dict:
    warnings.filterwarnings("ignore")
    set_threads(int(spec.get("threads", 2)))
    shape = Shape(**spec["shape"]) if "shape" in spec else SMALL
    adapter_spec = dict(spec["adapter"])
    for key in ("targets", "layers"):
        if adapter_spec.get(key) is not None:
            adapter_spec[key] = tuple(adapter_spec[key])
    model = build_llama(shape, dtype=getattr(torch, spec.get("dtype", "float32")))
    adapter = attach_adapter(model, AdapterSpec(**adapter_spec))
    step = TrainStep(adapter, make_head(model, spec.get("head", "det")), OptimSpec(**spec.get("opt", {})))
    batch = make_batch(int(spec.get("batch", 8)), int(spec.get("seq", 64)), shape.vocab)
    gc.collect()
    setup = read_rss_kb()["VmRSS"]
    reset_ok = reset_peak_rss()
    for _ in range(int(spec.get("steps", 3))):
        step(batch)
    peak = read_rss_kb()["VmHWM"]
    return {
        "rss_setup_kib": setup,
        "peak_kib": peak,
        "overhead_kib": peak - setup,
        "hwm_reset": reset_ok,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
