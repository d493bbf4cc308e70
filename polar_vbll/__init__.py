"""polar-vbll: PoLAR adapters + a variational Bayesian last layer for calibrated LLM fine-tuning.

This package is the single-process method; it never imports ray, deepspeed or mlflow.
"""

__version__ = "0.1.0"
