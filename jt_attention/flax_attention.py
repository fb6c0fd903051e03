"""Flax adapter: jt_attention as the `attention_fn` of `flax.linen` attention modules.

    attention = nn.MultiHeadDotProductAttention(
        num_heads=8, attention_fn=jt_attention.flax_attention.make_attention_fn(is_causal=True))

Flax expresses causality as a `mask` array; a mask reaches the kernels as one (and
they skip the blocks it hides), but `is_causal` skips them without reading a mask,
so build the function with it for causal attention. Masks and biases pass through;
attention dropout is not supported yet and raises.
"""

import functools

from jt_attention.attention import dot_product_attention


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                 dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                 precision=None, module=None, *, is_causal=False, implementation=None):
    """Signature of `flax.linen.dot_product_attention`; inputs are [batch, seq, heads, dim]."""
    del broadcast_dropout, dropout_rng, precision, module  # no dropout; kernels pick precision
    if dropout_rate > 0.0 and not deterministic:
        raise NotImplementedError(f"jt_attention has no attention dropout ({dropout_rate=}); "
                                  "use deterministic=True or dropout_rate=0")
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    if mask is not None:  # Flax builds float masks (make_attention_mask): nonzero is visible
        mask = mask.astype(bool)
    return dot_product_attention(query, key, value, bias, mask, is_causal=is_causal,
                                 implementation=implementation)


def make_attention_fn(*, is_causal=False, implementation=None):
    """An `attention_fn` for flax.linen modules with the causal mask and backend fixed."""
    return functools.partial(attention_fn, is_causal=is_causal, implementation=implementation)
