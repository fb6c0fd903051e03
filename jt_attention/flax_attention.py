"""Flax adapter: jt_attention as the attention function of Flax's attention modules.

    import flax.linen as nn
    from flax import nnx
    from jt_attention.flax_attention import make_attention_fn

    nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=make_attention_fn())
    nnx.MultiHeadAttention(num_heads=8, in_features=512, rngs=nnx.Rngs(0),
                           attention_fn=make_attention_fn(is_causal=True))

It takes every argument the two modules pass (flax 0.12): bias and mask (a float mask
counts nonzero as visible, as Flax does), any number of batch dims, dropout (fused in
the kernels: `dropout_rng`, `dropout_rate`, `deterministic`, `broadcast_dropout`),
`dtype` (the inputs are promoted to it, as Flax does), `precision` and
`force_fp32_for_softmax` (accepted: the kernels accumulate in fp32 and take the
softmax in fp32 whatever they say), `module` (sow_weights: the softmax weights come
from jt_attention.reference.attention_weights, beside the kernels, logged once; sown in
float32 under force_fp32_for_softmax, else in the inputs' dtype, as Flax sows them) and
nnx's `is_causal`. AQT's quantized einsums (`qk_attn_weights_einsum`,
`attn_weights_value_einsum`) raise NotImplementedError.

Masks reach the kernels as they are: a causal mask (`nn.make_causal_mask`), a padding
mask or a KV-cache mask (`decode=True`) becomes per-row key spans, so the kernels skip
the blocks it hides and read it only in the blocks at its edges, as they do for
is_causal and lengths. `make_attention_fn(is_causal=True)` skips them without reading
a mask: every call with as many queries as keys is causal, whatever the module passes;
a decode step (one query against the cache) keeps to the module's cache mask. One
difference from Flax's own attention: a query row whose keys are all masked returns 0,
not the mean of the values.
"""

import jax.numpy as jnp

from jt_attention.attention import dot_product_attention
from jt_attention.log import log_once
from jt_attention.reference import attention_weights


def make_attention_fn(*, is_causal=False, local_window_size=None, logits_soft_cap=None,
                      implementation=None):
    """An `attention_fn` for flax.linen and flax.nnx attention modules.

    local_window_size, logits_soft_cap and implementation are those of
    jt_attention.dot_product_attention. is_causal=True makes every self-attention call
    (as many queries as keys) causal, whatever the module passes (nnx always passes
    is_causal); a call with fewer queries than keys, a decode=True step against its
    cache, is left to the module's mask, which already hides the keys not yet written.
    The module's own is_causal is applied as Flax applies it, top-left aligned.
    float64 and complex inputs are not supported (the kernels take fp16, bf16, fp32)."""
    options = dict(local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                   implementation=implementation)
    causal_adapter = is_causal

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                     dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                     precision=None, module=None, force_fp32_for_softmax=False,
                     qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
                     is_causal=False):
        """Signature of Flax's dot_product_attention; [batch..., seq, heads, dim] inputs."""
        del precision  # the kernels accumulate in fp32 and take the softmax in fp32
        for name, einsum in (("qk_attn_weights_einsum", qk_attn_weights_einsum),
                             ("attn_weights_value_einsum", attn_weights_value_einsum)):
            if einsum is not None:
                raise NotImplementedError(f"jt_attention has no {name} (AQT's quantized "
                                          "einsums); leave it None")
        query, key, value = _promoted(query, key, value, dtype)
        if mask is not None:
            mask = mask.astype(bool)
        self_attention = query.shape[-3] == key.shape[-3]
        causal = (causal_adapter and self_attention) or is_causal
        if module is not None:
            # Flax sows float32 weights under force_fp32_for_softmax, else the inputs' dtype
            weights_dtype = jnp.float32 if force_fp32_for_softmax else query.dtype
            _sow_weights(module, query, key, bias, mask, causal, options, weights_dtype)
        dropout = {} if deterministic or not dropout_rate else dict(
            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
            broadcast_dropout=broadcast_dropout)
        return dot_product_attention(query, key, value, bias, mask, is_causal=causal,
                                     **options, **dropout)

    return attention_fn


# The default: no causal mask, the Triton kernels where there is a GPU.
attention_fn = make_attention_fn()


def _promoted(query, key, value, dtype):
    """Flax's promote_dtype: the inputs in `dtype`, or in their common dtype."""
    dtype = dtype or jnp.result_type(query.dtype, key.dtype, value.dtype)
    return tuple(x.astype(dtype) for x in (query, key, value))


def _sow_weights(module, query, key, bias, mask, is_causal, options, dtype):
    """module.sow of the softmax weights [batch..., heads, q_len, kv_len] in `dtype`, as
    Flax's own attention sows them (before dropout)."""
    log_once("jt_attention: sow_weights computes the attention weights with the XLA "
             "reference (a [batch, heads, q_len, kv_len] array), beside the kernels")
    batch_shape = query.shape[:-3]
    fold = lambda x: x.reshape(-1, *x.shape[-3:])
    weights = attention_weights(
        fold(query), fold(key), _folded_operand(bias, batch_shape),
        _folded_operand(mask, batch_shape), is_causal=is_causal,
        local_window_size=options["local_window_size"],
        logits_soft_cap=options["logits_soft_cap"])
    weights = weights.reshape(*batch_shape, *weights.shape[1:]).astype(dtype)
    try:
        from flax import nnx
        collection = nnx.Intermediate if isinstance(module, nnx.Module) else "intermediates"
    except ImportError:
        collection = "intermediates"
    module.sow(collection, "attention_weights", weights)


def _folded_operand(x, batch_shape):
    """A bias or mask broadcast over [batch..., heads, q_len, kv_len], with the batch dims
    folded into one (broadcast to the batch first where it has several)."""
    if x is None:
        return None
    x = jnp.reshape(x, (1,) * (len(batch_shape) + 3 - x.ndim) + x.shape)
    x = jnp.broadcast_to(x, (*batch_shape, *x.shape[len(batch_shape):]))
    return x.reshape(-1, *x.shape[len(batch_shape):])
