"""Pure-jnp attention: the `implementation='xla'` path and the tests' reference.

Same signature and layout as `jax.nn.dot_product_attention` ([batch, seq, heads,
head_dim]); logits, softmax and the P.V product are all computed in fp32 at
HIGHEST precision, and the output is cast back to the input dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np


def attention_reference(query, key, value, *, scale=None, is_causal=False):
    """Returns (out [B, T, N, H] in the input dtype, lse [B, N, T] fp32, natural log)."""
    batch, seq_q, num_heads, head_dim = query.shape
    seq_k, num_kv_heads = key.shape[1], key.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    group = num_heads // num_kv_heads
    q = query.astype(jnp.float32).reshape(batch, seq_q, num_kv_heads, group, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    if is_causal:  # top-left aligned, as in jax.nn
        visible = jnp.tril(jnp.ones((seq_q, seq_k), dtype=bool))
        logits = jnp.where(visible, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskh->btkgh", probs, value.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(batch, seq_q, num_heads, head_dim).astype(query.dtype)
    return out, lse.reshape(batch, num_heads, seq_q)
