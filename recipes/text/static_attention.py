"""An attention implementation for static shapes (XLA): transformers' SDPA, with the padding mask always applied.

Before every forward, transformers asks the device whether the padding mask is all ones, to skip it when it is.
Under XLA that question is a device-to-host copy at every step, and its answer picks one of two graphs, so which
graphs get compiled depends on the data. Registered under its own name, this implementation computes the same
attention and never asks.
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "static_sdpa"


def always_masked_sdpa_mask(*args, **kwargs):
    """`sdpa_mask`, never skipped: the mask is built from the padding whatever its values."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Registers the implementation (idempotent) and returns the name to pass as `attn_implementation`."""
    AttentionInterface.register(NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, always_masked_sdpa_mask)
    return NAME
