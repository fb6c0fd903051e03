"""Pure-jnp attention with every feature: the `implementation='xla'` path and the tests' oracle.

Same arguments and layout as `jax.nn.dot_product_attention` ([batch, seq, heads,
head_dim]; bias and mask of up to 4 dims broadcastable to [batch, heads, q_len,
kv_len]), plus the soft-cap and segment ids (features.py defines them all). Logits,
softmax and P.V are computed in float32 at HIGHEST precision, or in float64 for
float64 inputs under `jax.enable_x64` (the tests' float64 reference is this function
run so); the output is cast back to the input dtype. Rows that see no key return 0
and a logsumexp of -inf, with zero gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jt_attention import features

HIGHEST = jax.lax.Precision.HIGHEST


def attention_reference(query, key, value, bias=None, mask=None, *, scale=None,
                        is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                        local_window_size=None, logits_soft_cap=None, query_segment_ids=None,
                        key_value_segment_ids=None, dropout_rate=0.0, dropout_rng=None,
                        broadcast_dropout=False):
    """Returns (out [B, T, N, H] in the input dtype, lse [B, N, T] in the logits dtype,
    natural log). Differentiable in every floating-point argument, bias included.
    Dropout draws the kernels' mask (features.dropout_keep) from `dropout_rng`."""
    batch, seq_q, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_heads // num_kv_heads
    weights, lse = _grouped_weights(
        query, key, bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
        local_window_size, logits_soft_cap, query_segment_ids, key_value_segment_ids)
    seeds = features.dropout_seeds(dropout_rate, dropout_rng, batch, num_heads,
                                   broadcast_dropout)
    if seeds is not None:  # the kernels' mask: same keys, same Philox streams
        keep = features.dropout_keep(seeds, dropout_rate, seq_q, key.shape[1])
        weights = weights * _grouped(keep, num_kv_heads, group) / (1.0 - dropout_rate)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, value.astype(weights.dtype),
                     precision=HIGHEST)
    out = out.reshape(batch, seq_q, num_heads, head_dim).astype(query.dtype)
    return out, lse.reshape(batch, num_heads, seq_q)


def attention_weights(query, key, bias=None, mask=None, *, scale=None, is_causal=False,
                      query_seq_lengths=None, key_value_seq_lengths=None,
                      local_window_size=None, logits_soft_cap=None, query_segment_ids=None,
                      key_value_segment_ids=None):
    """The softmax weights [B, N, T, S] of attention_reference (before dropout), in the
    logits dtype; rows that see no key are 0."""
    weights, _ = _grouped_weights(
        query, key, bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
        local_window_size, logits_soft_cap, query_segment_ids, key_value_segment_ids)
    return weights.reshape(weights.shape[0], -1, *weights.shape[3:])


def _grouped_weights(query, key, bias, mask, scale, is_causal, query_seq_lengths,
                     key_value_seq_lengths, local_window_size, logits_soft_cap,
                     query_segment_ids, key_value_segment_ids):
    """(softmax weights [B, K, G, T, S], lse [B, K, G, T]), by query head group."""
    batch, seq_q, num_heads, head_dim = query.shape
    seq_k, num_kv_heads = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    q = query.astype(dtype).reshape(batch, seq_q, num_kv_heads, group, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key.astype(dtype), precision=HIGHEST) * scale
    if bias is not None:
        logits = logits + _grouped(bias, num_kv_heads, group).astype(dtype)
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    visible = _grouped(visibility(
        (batch, num_heads, seq_q, seq_k), mask, is_causal, query_seq_lengths,
        key_value_seq_lengths, local_window_size, query_segment_ids, key_value_segment_ids),
        num_kv_heads, group)
    visible = jnp.broadcast_to(visible, logits.shape)
    # No -inf literal anywhere: under jax.debug_infs it would raise even where no row is
    # fully masked. Hidden logits are filled with the lowest finite value instead.
    hidden = jnp.finfo(dtype).min
    row_max = jax.lax.stop_gradient(jnp.max(jnp.where(visible, logits, hidden), axis=-1))
    row_max = jnp.where(jnp.any(visible, axis=-1) & jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(visible, jnp.exp(logits - row_max[..., None]), 0.0)
    row_sum = jnp.sum(probs, axis=-1)
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)  # the double where keeps gradients NaN-free
    # log(0) = -inf for the rows that see no key, with no gradient through it
    lse = jnp.where(seen, jnp.log(safe_sum) + row_max, jax.lax.stop_gradient(jnp.log(row_sum)))
    return probs / safe_sum[..., None], lse


def visibility(shape, mask=None, is_causal=False, query_seq_lengths=None,
               key_value_seq_lengths=None, local_window_size=None, query_segment_ids=None,
               key_value_segment_ids=None):
    """Boolean [B or 1, N or 1, T, S]: whether query i sees key j (features.py)."""
    batch, _, seq_q, seq_k = shape
    rows = jnp.arange(seq_q)[:, None]
    cols = jnp.arange(seq_k)[None, :]
    visible = jnp.ones((1, 1, seq_q, seq_k), bool)
    if is_causal:
        visible &= cols <= rows
    if local_window_size is not None:
        left, right = ((local_window_size, local_window_size)
                       if isinstance(local_window_size, int) else local_window_size)
        visible &= (cols >= rows - left) & (cols <= rows + right)
    if query_seq_lengths is not None:
        visible &= rows < query_seq_lengths.reshape(batch, 1, 1, 1)
    if key_value_seq_lengths is not None:
        visible &= cols < key_value_seq_lengths.reshape(batch, 1, 1, 1)
    if query_segment_ids is not None:
        visible &= (query_segment_ids.reshape(batch, 1, seq_q, 1)
                    == key_value_segment_ids.reshape(batch, 1, 1, seq_k))
    if mask is not None:
        visible &= _as_4d(mask).astype(bool)
    return visible


def _as_4d(x):
    return jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)


def _grouped(x, num_kv_heads, group):
    """[B, N, T, S] (N = 1 or num_heads) -> [B, K, G, T, S] (or [B, 1, 1, T, S])."""
    x = _as_4d(x)
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, group, *x.shape[2:])
