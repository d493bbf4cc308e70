"""Last layers mapping features phi (B, d) to class logits over K answer letters."""

from polar_vbll.heads.deterministic import DeterministicHead, masked_logits

__all__ = ["DeterministicHead", "masked_logits"]

# The variational Bayesian last layer (docs/method.md section 2).
from polar_vbll.heads.config import VBLLConfig, vbll_config_from_dict  # noqa: E402
from polar_vbll.heads.vbll import VBLLHead, vbll_parameter_count  # noqa: E402

__all__ += ["VBLLConfig", "VBLLHead", "vbll_config_from_dict", "vbll_parameter_count"]
