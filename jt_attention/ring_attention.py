"""Ring attention: exact attention over a sequence sharded across devices.

Inside `jax.shard_map`, each device of mesh axis `axis_name` holds one block of the
sequence (axis 1 of [batch, seq, heads, head_dim]) for the queries, keys and values.
The queries stay put; the key/value blocks (with their segment ids) travel around
the ring with `jax.lax.ppermute`, one hop per step, so after P steps (P devices) every
query block has met every key block. Each step runs the fused kernels
(`attention_and_logsumexp`) on the local queries against the visiting block, and the
partial results merge exactly through their float32 row logsumexp:

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

No device holds more than two key/value blocks at a time, so memory per device is
that of a sequence P times shorter. The backward (a custom VJP) goes around the ring
once more: each step recomputes the visiting block's partial result and takes the
kernels' VJP of it, with the cotangents the merge gives it; the block's dK and dV
accumulate in float32 as they travel with it, and one last hop brings them home.
Plain autodiff of the forward would be as exact, but would keep every step's block
and partial output for the backward: the whole sequence's K/V on every device.

Layouts (how the global sequence is split over the devices, in 2P chunks for zigzag):

    contiguous: device d holds positions [d·n, (d+1)·n), n = seq / P.
    zigzag:     the sequence is cut into 2P chunks of h = seq / (2P); device d holds
                chunk d followed by chunk 2P-1-d. Under a causal mask every device
                then has the same amount of visible work (the early chunk sees little,
                the late one a lot), where contiguous leaves device 0 nearly idle and
                device P-1 with the full triangle.

The caller gives the sequence in the layout's order: `ring_layout` reorders a global
array into it (and `ring_unlayout` back), which is best done once where the data is
made (tokens, positions, labels), since it is a permutation of the whole sequence.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.custom_derivatives import SymbolicZero

from jt_attention import features as features_lib
from jt_attention.attention import attention_and_logsumexp, varying_axes

LAYOUTS = ("contiguous", "zigzag")
# dot_product_attention's arguments that a ring step cannot take: dropout would draw
# its mask from each element's position in the call, which a ring step does not know.
UNSUPPORTED = ("dropout_rate", "dropout_rng", "broadcast_dropout")


def ring_attention(query, key, value, bias=None, mask=None, *, axis_name, is_causal=False,
                   layout=None, scale=None, query_seq_lengths=None, key_value_seq_lengths=None,
                   local_window_size=None, query_segment_ids=None, key_value_segment_ids=None,
                   logits_soft_cap=None, implementation=None, return_residual=False,
                   **unsupported):
    """Attention over a sequence sharded along mesh axis `axis_name`; call inside
    `jax.shard_map` (or under `jax.jit` of one), with query, key and value sharded
    along axis 1 over `axis_name` (in_specs P(None, axis_name)).

    Equal to `jt_attention.dot_product_attention` on the gathered global arrays, in the
    layout's order (module docstring): out[b, i] attends to keys j of the whole
    sequence. Returns the device's block of the output, [batch, q_block, heads,
    head_dim] in the query's dtype, ordered as the query block.

    Args:
      query: [batch, q_block, num_heads, head_dim], this device's block.
      key, value: [batch, kv_block, num_kv_heads, head_dim] (grouped-query attention
        where num_kv_heads < num_heads).
      axis_name: the mesh axis the sequence is sharded over; P = its size.
      is_causal: global causal: the query at global position i sees the keys at global
        positions j <= i. Needs q_block == kv_block (self-attention).
      layout: "contiguous" or "zigzag"; default "zigzag" when is_causal, else
        "contiguous". Zigzag needs even blocks (seq divisible by 2P). It says which
        global positions each block holds, which matters for causal and lengths.
      scale: logit scale; default 1/sqrt(head_dim).
      bias, mask: as in dot_product_attention, but for this device's query rows
        against the WHOLE key sequence in the layout's order: broadcastable to
        [batch, num_heads, q_block, P * kv_block]. Shard them along axis 2 like the
        query (in_specs P(None, None, axis_name)), or replicate them (P()) where that
        dim is 1. Each step takes the visiting block's columns; the bias gradient
        (where the bias is differentiated) comes back in the bias's shape and dtype.
      query_seq_lengths, key_value_seq_lengths: int32 [batch], GLOBAL lengths
        (replicated: in_specs P()); positions at or past them are padding, and padded
        query rows return 0.
      query_segment_ids, key_value_segment_ids: int32 [batch, q_block] and
        [batch, kv_block], sharded like the query and key; a query sees a key only
        where their ids are equal. The key ids travel with the keys.
      local_window_size: int or (left, right), in GLOBAL positions: the query at i sees
        the keys at i - left .. i + right. Each step turns it into a band mask of the
        block pair from the blocks' global positions (q_block x kv_block booleans);
        the kernels skip the key tiles it hides, so a step whose block lies outside
        every row's window costs a launch and no attention.
      logits_soft_cap: as in dot_product_attention, cap * tanh(logits / cap).
      implementation: as in dot_product_attention: None, 'triton', 'interpret', 'xla'.

      return_residual: also return the row logsumexp over the whole sequence, [batch,
        q_block, heads] in the query's dtype (-inf where a row sees no key), as
        dot_product_attention does; differentiable too.

    Not supported (ValueError naming it): dropout. A row that sees no key at all
    returns 0, as in dot_product_attention. Differentiable in reverse mode
    (jax.grad, jax.vjp) in query, key, value and bias, also under jax.jit; not in
    forward mode. Works with jax.shard_map's check_vma on or off.
    """
    _reject(unsupported)
    layout = _resolved_layout(layout, is_causal)
    num_devices = _axis_size(axis_name)
    _check_blocks(query, key, value, is_causal, layout, num_devices, query_segment_ids,
                  key_value_segment_ids)
    scores_shape = (query.shape[0], query.shape[2], query.shape[1], num_devices * key.shape[1])
    bias = _checked_scores("bias", bias, scores_shape)
    mask = _checked_scores("mask", mask, scores_shape)
    features_lib.check_mask_dtype(mask)
    config = _Config(axis_name, num_devices, layout, bool(is_causal), scale, logits_soft_cap,
                     implementation, features_lib.window(local_window_size))
    features = dict(query_segment_ids=query_segment_ids,
                    key_value_segment_ids=key_value_segment_ids,
                    query_seq_lengths=query_seq_lengths,
                    key_value_seq_lengths=key_value_seq_lengths, mask=mask)
    out, lse = _ring_attention(config, query, key, value, bias, features)
    return (out, lse.astype(query.dtype)) if return_residual else out


@dataclasses.dataclass(frozen=True)
class _Config:
    """What every step of one ring_attention call shares, all static."""
    axis_name: Any
    num_devices: int
    layout: str
    is_causal: bool
    scale: Any
    logits_soft_cap: Any
    implementation: Any
    window: tuple  # (left, right) in global positions; (-1, -1): none


# A custom VJP, where JAX's autodiff of the forward would do: autodiff keeps each
# step's residuals (the visiting key/value block, its partial output), P blocks per
# device, the whole sequence's K/V. The backward here sends K/V around the ring
# again instead, so memory per device stays a few blocks, at the cost of one more
# forward launch per step (the block's partial result, recomputed for its VJP).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(config, query, key, value, bias, features):
    return _ring_forward(_Ring(config, features, bias), query, key, value)


def _ring_forward(ring, query, key, value):
    """(out in the query's dtype, lse float32 [B, T, N]) over every block of the ring."""
    config, features = ring.config, ring.features

    def step(carry, index):
        block, out, lse = carry
        # Send the block on before attending to it: the transfer does not depend on
        # this step's kernels, so XLA can run the two at once.
        arriving = block if _is_last(index, config) else _rotate(block, config)
        partial_out, partial_lse = ring.attend(query, ring.visit(block, index), index)
        if out is None:  # the device's own block, the first step
            return arriving, partial_out.astype(jnp.float32), partial_lse
        return (arriving, *merge_partials(out, lse, partial_out, partial_lse))

    first = _KeyBlock(key, value, features["key_value_segment_ids"])
    _, out, lse = _around_the_ring(step, (first, None, None), config.num_devices)
    return out.astype(query.dtype), lse


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _BiasGrad:
    """A residual that is no array: whether the bias is differentiated."""
    wanted: bool


def _ring_attention_fwd(config, query, key, value, bias, features):
    # symbolic_zeros: the primals come wrapped, telling which are differentiated, so
    # the kernels compute no bias gradient that nobody asked for.
    bias_grad = _BiasGrad(bias is not None and bias.perturbed)
    query, key, value, bias, features = jax.tree.map(lambda x: x.value,
                                                     (query, key, value, bias, features))
    out, lse = _ring_forward(_Ring(config, features, bias), query, key, value)
    return (out, lse), (bias_grad, query, key, value, bias, features, out, lse)


def _ring_attention_bwd(config, residuals, cotangents):
    """dq, dk, dv (and dbias): each step recomputes one block's partial result and
    takes its VJP, with the cotangents that the merge passes to it. dk and dv
    accumulate in float32 beside the block they belong to and travel with it; after
    the P-th step one more hop brings them home to the block's owner. dbias stays:
    each step adds the visiting block's columns."""
    bias_grad, query, key, value, bias, features, out, lse = residuals
    # The logsumexp's cotangent is zero unless the caller differentiates it.
    dout, dlse = (jnp.zeros(c.aval.shape, c.aval.dtype) if isinstance(c, SymbolicZero) else c
                  for c in cotangents)
    ring = _Ring(config, features, bias, bias_grad.wanted)

    def step(carry, index):
        block, dq, dk, dv, dbias = carry
        arriving = block if _is_last(index, config) else _rotate(block, config)
        dq_block, dk_block, dv_block, *dbias_block = ring.block_grads(
            query, block, index, out, lse, dout, dlse)
        if dbias_block:
            dbias = ring.add_columns(dbias, dbias_block[0], index)
        # dk and dv leave once this step's share is in; the next device needs them
        # only after its own kernels, so the transfer can overlap those.
        dk, dv = _rotate((dk + dk_block, dv + dv_block), config)
        return arriving, dq + dq_block, dk, dv, dbias

    zeros = lambda x: jnp.zeros_like(x, dtype=jnp.float32)
    first = (_KeyBlock(key, value, features["key_value_segment_ids"]), zeros(query),
             zeros(key), zeros(value), zeros(bias) if bias_grad.wanted else None)
    _, dq, dk, dv, dbias = _around_the_ring(step, first, config.num_devices)
    if bias_grad.wanted:
        # A bias replicated over the ring (rows dim 1) gets every device's share.
        if config.axis_name not in varying_axes(bias):
            dbias = jax.lax.psum(dbias, config.axis_name)
        dbias = dbias.astype(bias.dtype)
    return (dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype), dbias,
            None)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd, symbolic_zeros=True)


def _around_the_ring(step, carry, num_devices):
    """carry after step(carry, index) for index 0 .. P-1: the first (a Python 0: the
    device's own block) and the last traced alone, the steps between as one
    lax.scan, traced once whatever P is."""
    carry = step(carry, 0)
    if num_devices > 2:
        carry, _ = jax.lax.scan(lambda c, index: (step(c, index), None), carry,
                                jnp.arange(1, num_devices - 1, dtype=jnp.int32))
    if num_devices > 1:
        carry = step(carry, num_devices - 1)
    return carry


def _is_last(index, config):
    """Whether step `index` is the last (a Python int then): its block goes no further."""
    return isinstance(index, int) and index == config.num_devices - 1


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets, from each one's output
    ([B, T, N, D]) and float32 row logsumexp ([B, T, N]): (out in float32, lse).

    Rows that see no key on either side (lse -inf on both) give out 0 and lse -inf,
    with zero gradients: the shift `high` is 0 there rather than -inf, so exp sees
    -inf (value and derivative 0), never -inf - -inf, and log never sees 0; no NaN
    appears in the forward or the backward."""
    high = jnp.maximum(lse_a, lse_b)
    high = jnp.where(jnp.isfinite(high), high, 0.0)
    weight_a, weight_b = jnp.exp(lse_a - high), jnp.exp(lse_b - high)
    total = weight_a + weight_b
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, high + jnp.log(total), -jnp.inf)
    out = ((weight_a / total)[..., None] * out_a.astype(jnp.float32)
           + (weight_b / total)[..., None] * out_b.astype(jnp.float32))
    return out, lse


def ring_layout(x, num_devices, *, axis=1, layout="zigzag"):
    """A global array, sequence along `axis`, in `layout`'s order: what ring_attention
    expects to find when the result is sharded in P equal blocks along `axis`.

    zigzag: chunks [0, 2P-1, 1, 2P-2, ..., P-1, P] of 2P equal chunks; contiguous:
    unchanged. Works on numpy and jax arrays (queries, keys, values, segment ids,
    labels)."""
    return _permute_chunks(x, num_devices, axis, layout, inverse=False)


def ring_unlayout(x, num_devices, *, axis=1, layout="zigzag"):
    """The inverse of ring_layout: an array in `layout`'s order back in global order."""
    return _permute_chunks(x, num_devices, axis, layout, inverse=True)


def _permute_chunks(x, num_devices, axis, layout, inverse):
    _check_layout(layout)
    if not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} must be a positive int")
    if layout == "contiguous":
        return x
    length = x.shape[axis]
    if length % (2 * num_devices):
        raise ValueError(f"layout='zigzag' cuts the sequence into 2 * num_devices = "
                         f"{2 * num_devices} chunks: x.shape[{axis}]={length} must be "
                         f"divisible by {2 * num_devices}")
    order = zigzag_chunk_order(num_devices)
    if inverse:
        order = np.argsort(order)
    xp = np if isinstance(x, np.ndarray) else jnp
    chunks = xp.split(x, 2 * num_devices, axis=axis)
    return xp.concatenate([chunks[i] for i in order], axis=axis)


def zigzag_chunk_order(num_devices):
    """The global chunk indices in zigzag order: device d's are entries 2d and 2d+1."""
    return [c for d in range(num_devices) for c in (d, 2 * num_devices - 1 - d)]


class _KeyBlock(NamedTuple):
    """What travels around the ring (a pytree, for lax.scan's carry): a key/value block
    and its segment ids (or None)."""
    key: Any
    value: Any
    segment_ids: Any


class _Visit(NamedTuple):
    """A visiting block as one step attends to it: the block, and the columns of the
    local bias and mask (or None) that belong to its keys."""
    key: Any
    value: Any
    segment_ids: Any
    bias: Any
    mask: Any

    def first_half(self):
        """The block's first half along the keys: zigzag's early chunk."""
        keys = slice(0, self.key.shape[1] // 2)
        return _Visit(*(_cut(x, 1, keys) for x in self[:3]),
                      *(_cut(x, 3, keys) for x in self[3:]))


def _cut(x, axis, part):
    """x[part] along `axis`, where x has that axis (None and size-1 dims broadcast)."""
    if x is None or x.shape[axis] == 1:
        return x
    return x[(slice(None),) * axis + (part,)]


def _rotate(tree, config):
    """`tree` (arrays, or None) from the previous device on the ring: device d gets
    d-1's."""
    pairs = [(d, (d + 1) % config.num_devices) for d in range(config.num_devices)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, config.axis_name, pairs), tree)


class _Ring:
    """The device's side of the ring: where its queries sit globally, and what every
    step shares."""

    def __init__(self, config, features, bias, bias_grad=False):
        self.config = config
        self.device = jax.lax.axis_index(config.axis_name)  # traced
        self.features = features
        self.bias = bias
        self.bias_grad = bias_grad  # whether block_grads returns the bias's too

    def source(self, step):
        """The device whose block arrives `step` hops back on the ring."""
        return (self.device - step) % self.config.num_devices

    def visit(self, block, step):
        """`block` with the columns of the local bias and mask that hold its keys: the
        source's block is columns [source, source + 1) * kv_block of the global keys
        in the layout's order."""
        return _Visit(*block, *(self._columns(x, step)
                                for x in (self.bias, self.features["mask"])))

    def _columns(self, x, step):
        if x is None or x.shape[3] == 1:
            return x
        width = x.shape[3] // self.config.num_devices
        return jax.lax.dynamic_slice_in_dim(x, self.source(step) * width, width, axis=3)

    def add_columns(self, total, columns, step):
        """total (the bias's shape) with `columns` (a visit's bias gradient) added where
        `visit` took them."""
        if total.shape[3] == 1:
            return total + columns
        width, start = columns.shape[3], self.source(step) * columns.shape[3]
        current = jax.lax.dynamic_slice_in_dim(total, start, width, axis=3)
        return jax.lax.dynamic_update_slice_in_dim(total, current + columns, start, axis=3)

    def chunks(self, owner):
        """The global chunk indices of a block held by device `owner`, in local order."""
        if self.config.layout == "contiguous":
            return (owner,)
        return (owner, 2 * self.config.num_devices - 1 - owner)

    def attend(self, query, block, step):
        """(out, lse) of the local queries against `block` (a _Visit), which started
        `step` hops back on the ring (0: the device's own block, a Python int; else an
        int or a traced one); hidden key chunks are skipped, not masked."""
        source = self.source(step)
        queries, keys = self.chunks(self.device), self.chunks(source)
        if not self.config.is_causal:
            return self._attend(query, queries, block, keys, is_causal=False)
        if isinstance(step, int) and step == 0:
            # Own block: causal inside it. For zigzag the local order (chunk d, then
            # 2P-1-d) keeps global order, so local causal is global causal there too.
            return self._attend(query, queries, block, keys, is_causal=True)
        # Other blocks: earlier (source < device) or later in the sequence.
        if self.config.layout == "contiguous":
            return jax.lax.cond(
                source < self.device,
                lambda: self._attend(query, queries, block, keys, is_causal=False),
                lambda: _nothing_seen(query))
        early = block.first_half()
        return jax.lax.cond(
            source < self.device,
            # The visitor's early chunk precedes both of ours; its late chunk
            # (2P-1-source > 2P-1-device) follows both.
            lambda: self._attend(query, queries, early, keys[:1], is_causal=False),
            # Both visiting chunks precede our late chunk and follow our early one.
            lambda: self._late_queries_only(query, queries, block, keys))

    def block_grads(self, query, block, step, out, lse, dout, dlse):
        """(dq, dk, dv, and dbias's columns where the bias is differentiated) in float32:
        the share of `block` (a _KeyBlock: see `attend`) in the gradients of the merged
        output `out` and its float32 row logsumexp `lse`, for cotangents dout and dlse.

        out = sum_b w_b out_b and lse = log sum_b exp(lse_b), with w_b = exp(lse_b -
        lse), so the block's output gets the cotangent w_b dout and its logsumexp
        w_b (<dout, out_b - out> + dlse)."""
        visit = self.visit(block, step)

        def attend(q, k, v, bias=visit.bias):
            return self.attend(q, visit._replace(key=k, value=v, bias=bias), step)

        differentiated = (query, visit.key, visit.value) + (
            (visit.bias,) if self.bias_grad else ())
        (block_out, block_lse), vjp = jax.vjp(attend, *differentiated)
        seen = jnp.isfinite(lse)  # rows that see no key at all have lse -inf: weight 0
        weight = jnp.where(seen, jnp.exp(block_lse - jnp.where(seen, lse, 0.0)), 0.0)
        dout = dout.astype(jnp.float32)
        block_dlse = weight * (jnp.sum(dout * (block_out.astype(jnp.float32)
                                               - out.astype(jnp.float32)), axis=-1)
                               + dlse.astype(jnp.float32))
        grads = vjp(((weight[..., None] * dout).astype(block_out.dtype), block_dlse))
        return tuple(g.astype(jnp.float32) for g in grads)

    def _late_queries_only(self, query, queries, block, keys):
        """Zigzag, a later block: only the late query chunk sees it (all of it)."""
        half = query.shape[1] // 2
        out, lse = self._attend(query, queries[1:], block, keys, is_causal=False,
                                rows=slice(half, None))
        none_out, none_lse = _nothing_seen(query[:, :half])
        return (jnp.concatenate([none_out, out], axis=1),
                jnp.concatenate([none_lse, lse], axis=1))

    def _attend(self, query, query_chunks, block, key_chunks, is_causal, rows=slice(None)):
        """attention_and_logsumexp of the query rows `rows` (global chunks `query_chunks`)
        against `block` (a _Visit of global chunks `key_chunks`), with the global lengths
        turned into the block's local ones and the window into a band mask."""
        query = query[:, rows]
        features, config = self.features, self.config
        segments = features["query_segment_ids"]
        mask = _cut(block.mask, 2, rows)
        band = self._band(query_chunks, query.shape[1], key_chunks, block.key.shape[1])
        if band is not None:
            mask = band if mask is None else mask & band
        return attention_and_logsumexp(
            query, block.key, block.value, _cut(block.bias, 2, rows), mask,
            is_causal=is_causal, scale=config.scale,
            query_seq_lengths=_local_lengths(features["query_seq_lengths"], query_chunks,
                                             query.shape[1] // len(query_chunks)),
            key_value_seq_lengths=_local_lengths(features["key_value_seq_lengths"],
                                                 key_chunks,
                                                 block.key.shape[1] // len(key_chunks)),
            query_segment_ids=None if segments is None else segments[:, rows],
            key_value_segment_ids=block.segment_ids,
            logits_soft_cap=config.logits_soft_cap, implementation=config.implementation)

    def _band(self, query_chunks, q_len, key_chunks, kv_len):
        """The window as a [1, 1, q_len, kv_len] mask from the rows' and keys' global
        positions (query i sees key j iff -left <= pos(j) - pos(i) <= right), or None."""
        left, right = self.config.window
        if (left, right) == (-1, -1):
            return None
        offset = (_positions(key_chunks, kv_len // len(key_chunks))[None, :]
                  - _positions(query_chunks, q_len // len(query_chunks))[:, None])
        return ((offset >= -left) & (offset <= right))[None, None]


def _positions(chunks, chunk_length):
    """The global positions of a block made of global `chunks` (traced ints), in order."""
    return jnp.concatenate([c * chunk_length + jnp.arange(chunk_length) for c in chunks])


def _nothing_seen(query):
    """(0, -inf): the partial result of query rows that see no key of a block. Built
    from the query so that under shard_map's type check it varies over the axis like
    lax.cond's other branch."""
    zeros = jnp.zeros_like(query)
    return zeros, jnp.full_like(zeros[..., 0], -jnp.inf, dtype=jnp.float32)


def _local_lengths(lengths, chunks, chunk_length):
    """Global lengths -> the valid positions in a block made of global `chunks` (of
    `chunk_length` each, in local order). They are a prefix of the block: the chunks
    are in increasing global order, and a later chunk has a valid position only where
    every earlier one is full."""
    if lengths is None:
        return None
    return sum(jnp.clip(lengths - c * chunk_length, 0, chunk_length)
               for c in chunks).astype(jnp.int32)


def _reject(unsupported):
    for name in unsupported:
        if name in UNSUPPORTED:
            raise ValueError(f"ring_attention does not support {name}: it supports bias, "
                             "mask, is_causal, sequence lengths, local_window_size, segment "
                             "ids, logits_soft_cap and return_residual (dropout draws its "
                             "mask from positions that a ring step does not know)")
        raise TypeError(f"ring_attention() got an unexpected keyword argument {name!r}")


def _checked_scores(name, array, scores_shape):
    """The bias or mask as a 4-D array broadcastable to [batch, num_heads, q_block,
    P * kv_block], or None."""
    if array is None:
        return None
    try:
        return features_lib.as_4d(name, array, scores_shape)
    except ValueError as error:
        raise ValueError(f"ring_attention: {error}. A ring's {name} holds this device's "
                         "query rows (q_len: the query block) against every key of the "
                         "sequence in the layout's order (kv_len: P x the key block); shard "
                         "it along axis 2 like the query") from error


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")


def _resolved_layout(layout, is_causal):
    if layout is None:
        return "zigzag" if is_causal else "contiguous"
    _check_layout(layout)
    return layout


def _axis_size(axis_name):
    """P, the static size of the ring's mesh axis."""
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as err:
        raise NameError(f"ring_attention(axis_name={axis_name!r}): no such mesh axis is bound "
                        "here; call ring_attention inside jax.shard_map over a mesh with that "
                        "axis, the sequence (axis 1) sharded over it") from err


def _check_blocks(query, key, value, is_causal, layout, num_devices, query_segment_ids,
                  key_value_segment_ids):
    for name, array in (("query", query), ("key", key), ("value", value)):
        if array.ndim != 4:
            raise ValueError(f"ring_attention: {name}.ndim={array.ndim}; expected 4 "
                             "([batch, seq_block, heads, head_dim], this device's block)")
    q_block, kv_block = query.shape[1], key.shape[1]
    if is_causal and q_block != kv_block:
        raise ValueError(f"ring_attention(is_causal=True) needs query and key blocks of one "
                         f"length (self-attention); got query.shape[1]={q_block}, "
                         f"key.shape[1]={kv_block}")
    if layout == "zigzag":
        for name, length in (("query", q_block), ("key", kv_block)):
            if length % 2:
                raise ValueError(
                    f"layout='zigzag' splits the sequence into 2P = {2 * num_devices} chunks, "
                    f"two per device: the global {name} length {length * num_devices} must "
                    f"be divisible by {2 * num_devices} ({name}.shape[1]={length} per device "
                    "must be even)")
    for name, ids, length in (("query_segment_ids", query_segment_ids, q_block),
                              ("key_value_segment_ids", key_value_segment_ids, kv_block)):
        if ids is not None and tuple(ids.shape) != (query.shape[0], length):
            raise ValueError(f"{name}.shape={tuple(ids.shape)}; expected "
                             f"{(query.shape[0], length)}, this device's block: shard it "
                             "along axis 1 like the query and key")
