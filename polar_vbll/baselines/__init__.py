"""The published baselines PoLAR-VBLL is compared with (docs/method.md section 4), behind the interfaces the
trainer and the evaluation code already use.

- :mod:`~polar_vbll.baselines.lora`: LoRA (MLE; MAP = AdamW weight decay on A, B) on peft, exposing the
  ``PolarModel`` interface; adapter dropout switching for MC dropout. 1 backbone pass at test time.
- :mod:`~polar_vbll.baselines.mc_dropout`: MC dropout over adapter dropout masks. ``n_samples`` passes (10).
- :mod:`~polar_vbll.baselines.ensemble`: deep ensembles of adapters from different seeds. 1 pass per member (3).
- :mod:`~polar_vbll.baselines.laplace`: post-hoc last-layer Laplace (full or KFAC) with the prior precision
  chosen by the marginal likelihood. 1 pass plus K x K algebra per example.

peft is imported only when a LoRA adapter is built. Import from the submodules: this package imports
nothing eagerly, so that the config (which names ``LoraBaselineConfig``) can be loaded without a cycle.
"""
