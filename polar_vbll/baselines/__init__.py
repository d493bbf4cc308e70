"""The published baselines PoLAR-VBLL is compared with (docs/method.md section 4), behind the interfaces the
trainer and the evaluation code already use.

- :mod:`~polar_vbll.baselines.lora`: LoRA (MLE; MAP = AdamW weight decay on A, B) on peft, exposing the
  ``PolarModel`` interface; adapter dropout switching for MC dropout. 1 backbone pass at test time.
- :mod:`~polar_vbll.baselines.mc_dropout`: MC dropout over adapter dropout masks. ``n_samples`` passes (10).
- :mod:`~polar_vbll.baselines.ensemble`: deep ensembles of adapters from different seeds. 1 pass per member (3).
- :mod:`~polar_vbll.baselines.laplace`: post-hoc last-layer Laplace (full or KFAC) with the prior precision
  chosen by the marginal likelihood. 1 pass plus K x K algebra per example.

peft is imported only when a LoRA adapter is built.
"""

from polar_vbll.baselines.ensemble import ensemble_predictions, predict_ensemble
from polar_vbll.baselines.laplace import LastLayerLaplace, fit_laplace, full_ggn, kron_factors, split_features
from polar_vbll.baselines.lora import (
    LoraAdapter,
    LoraBaselineConfig,
    adapter_dropout,
    inject_lora,
    lora_config_from_dict,
    seeded_rng,
    set_adapter_dropout,
)
from polar_vbll.baselines.mc_dropout import DEFAULT_MC_SAMPLES, mc_dropout_predict, predict_mc_dropout

__all__ = [
    "DEFAULT_MC_SAMPLES",
    "LastLayerLaplace",
    "LoraAdapter",
    "LoraBaselineConfig",
    "adapter_dropout",
    "ensemble_predictions",
    "fit_laplace",
    "full_ggn",
    "inject_lora",
    "kron_factors",
    "lora_config_from_dict",
    "mc_dropout_predict",
    "predict_ensemble",
    "predict_mc_dropout",
    "seeded_rng",
    "set_adapter_dropout",
    "split_features",
]
