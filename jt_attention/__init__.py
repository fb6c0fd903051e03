"""jt_attention: fused Triton attention for JAX, launched through jax-triton."""

from jt_attention.attention import dot_product_attention, scaled_dot_product_attention
from jt_attention.reference import attention_reference
from jt_attention.ring_attention import ring_attention, ring_layout, ring_unlayout

__all__ = ["dot_product_attention", "scaled_dot_product_attention", "attention_reference",
           "ring_attention", "ring_layout", "ring_unlayout"]
__version__ = "0.1.0"
