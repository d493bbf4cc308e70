"""Where to centre last-layer Laplace (``head.laplace.mean``): around the head as trained, or at the MAP
refit on the same final features (MacKay's evidence iteration, as the linear probe). Chosen on the
VALIDATION split; the test split is printed for the record only.

Input: a finished run folder of a method with a trainable linear head (``polar_mle``, ``lora_mle``), e.g.
the main job's PoLAR-MLE run. Its adapters are loaded, the final features of train / validation / test are
computed once (through the frozen-prefix cache), and each variant's predictive is summarised.

    python bench/laplace_mean.py runs/main/sst2/polar_mle/seed0 [--out bench/results/laplace_mean_sst2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_vbll.config import load_config  # noqa: E402
from polar_vbll.features import FeatureSource, encode_examples  # noqa: E402
from polar_vbll.heads.laplace import LastLayerLaplace  # noqa: E402
from polar_vbll.heads.probe import fit_probe  # noqa: E402
from polar_vbll.methods import METHODS  # noqa: E402
from polar_vbll.metrics import summarize  # noqa: E402
from polar_vbll.models import load_backbone  # noqa: E402
from polar_vbll.readout import load_readout  # noqa: E402
from polar_vbll.saved import _load_head_state  # noqa: E402
from polar_vbll.session import build_head, load_examples  # noqa: E402

SPLITS = ("train", "validation", "eval")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = load_config(args.run / "config.yaml")
    readout = load_readout(args.run)
    examples = load_examples(cfg)
    model, tok = load_backbone(cfg.model)
    enc = {n: encode_examples(n, examples[n], tok, readout.max_length, readout.add_bos) for n in SPLITS}
    adapter = METHODS[cfg.method].adapter_kind.load(model, args.run / "adapter")
    head = build_head(cfg, model, readout.answer_token_ids, n_train=len(enc["train"]))
    head.load_state_dict(_load_head_state(args.run / "head.safetensors"))
    source = FeatureSource.for_config(adapter.base_model, tok.pad_token_id, cfg.train)
    phi = {n: source.split_features(enc[n], cfg.train.eval_batch_size) for n in SPLITS}
    tr = enc["train"]

    def row(probs_of, extra):
        out = {n: summarize(probs_of(n), enc[n].labels) for n in SPLITS}
        return {**out, **extra}

    rows = {}
    norm = float(head.weight.detach().square().sum())
    rows["point head (as trained)"] = row(
        lambda n: torch.softmax(head.logits(phi[n], enc[n].n_choices), -1), {"weight_sq_norm": norm}
    )
    trained = LastLayerLaplace.from_head(head).fit(phi["train"], tr.labels, tr.n_choices)
    logit_var = trained.uncertainty(phi["validation"], enc["validation"].n_choices)["logit_var"].mean().item()
    rows["Laplace at the trained head (mean: trained)"] = row(
        lambda n: trained.predict_proba(phi[n], enc[n].n_choices),
        {"prior_precision": trained.prior_precision, "val_logit_var": logit_var},
    )
    probe = fit_probe(head, phi["train"], tr.labels, tr.n_choices, cfg.head.fit, structure=cfg.head.laplace.structure)
    at_map = LastLayerLaplace.from_head(probe, prior_precision=1.0 / probe.prior_var).fit(
        phi["train"], tr.labels, tr.n_choices
    )
    logit_var = at_map.uncertainty(phi["validation"], enc["validation"].n_choices)["logit_var"].mean().item()
    rows["Laplace at the evidence-MAP refit (mean: map)"] = row(
        lambda n: at_map.predict_proba(phi[n], enc[n].n_choices),
        {"prior_precision": at_map.prior_precision, "val_logit_var": logit_var, "probe": probe.probe_report},
    )
    result = {
        "run": str(args.run), "rows": rows, "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "load_avg": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    for name, r in rows.items():
        cells = "  ".join(f"{n} {100 * r[n]['acc']:.1f}/{100 * r[n]['ece']:.1f}/{r[n]['nll']:.3f}" for n in SPLITS)
        print(f"{name:48s} {cells}  (ACC%/ECE%/NLL)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
