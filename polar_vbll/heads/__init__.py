"""Last layers mapping features phi (B, d) to class logits over K answer letters."""

from polar_vbll.heads.deterministic import DeterministicHead, masked_logits

__all__ = ["DeterministicHead", "masked_logits"]
