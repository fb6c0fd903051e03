"""Masks and score modifiers: what a call asks of attention besides query, key and value.

Query i sees key j (positions top-left aligned, as in jax.nn) iff all of these hold:
  - causal:   j <= i
  - window:   i - left <= j <= i + right              (local_window_size=(left, right))
  - lengths:  i < query_seq_lengths[b] and j < key_value_seq_lengths[b]
  - segments: query_segment_ids[b, i] == key_value_segment_ids[b, j]
  - mask:     mask[b, n, i, j]                         (broadcast as jax.nn does)
and its logit is cap * tanh((scale * q.k + bias[b, n, i, j]) / cap), or without the
cap where none is given. A row that sees no key returns 0 (logsumexp -inf). Dropout
multiplies each probability by keep / (1 - rate) after the softmax; whether element
(b, n, i, j) is kept is a pure function of the call's key, the stream of (b, n) and
the position (i, j) (`dropout_keep`, the same Philox draw the kernels make), so the
backward draws it again and no mask is stored; with broadcast dropout every batch
element and head shares one stream.

`prepare` checks the arguments of `dot_product_attention` and returns the static
`Features`, which join plan.Problem, and the `Arguments` (the reference takes them as
they are); `kernel_operands` turns those into the arrays the kernels read (`Operands`).
Causal and the window are static (kernels/masking.py turns them into block bounds);
lengths, segment ids and the mask reach the kernels as per-row key spans (and
per-key query spans for the kernels that walk keys): for each query row the first
and last key it can see, and whether every key between them is visible. Those spans
let the kernels skip blocks that no query of a row block sees and drop the predicate
where every query sees every key; the segment ids and the mask are still checked
element by element elsewhere, so a span only needs to contain what is visible.
"""

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

# Bits of a dense operand's layout (bias, mask) or of a span array's: which of the
# [batch, heads, queries, keys] dims it has (the others are broadcast), and PRESENT.
BATCH, HEADS, QUERIES, KEYS, PRESENT = 1, 2, 4, 8, 16
KERNEL_BIAS_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Features:
    """The static part of the masks and score modifiers of one call.

    bias, mask: the operand's [B, N, T, S] shape, 1 where it broadcasts; () if none.
    spans: [RB, RH] of the span arrays (RB in (1, B), RH in (1, N)); () if none.
    bias_grad: the backward also returns the bias's gradient."""
    window: tuple = (-1, -1)    # (left, right) keys around the query; -1: unbounded
    soft_cap: float = 0.0       # 0: none
    bias: tuple = ()
    bias_dtype: np.dtype = np.dtype(np.float32)
    mask: tuple = ()
    segments: bool = False
    spans: tuple = ()
    bias_grad: bool = False
    dropout_rate: float = 0.0
    dropout_broadcast: bool = False  # one mask for every batch element and head

    @property
    def dropout_threshold(self):
        """16-bit draws below this are dropped (0: no dropout)."""
        return dropout_threshold(self.dropout_rate)


@dataclasses.dataclass(frozen=True)
class Operands:
    """The arrays the kernels read besides q, k and v; a one-element placeholder where a
    feature is absent. key_spans: [RB, RH, 3, T] int32, the (first, end, full_from) of
    the keys each query row sees, where keys [full_from, end) are all visible;
    query_spans: [RB, RH, 3, S], the same per key over the queries."""
    bias: jax.Array
    mask: jax.Array
    query_segments: jax.Array
    key_segments: jax.Array
    key_spans: jax.Array
    query_spans: jax.Array

    dropout_seeds: jax.Array

    NAMES = ("bias", "mask", "query_segments", "key_segments", "key_spans", "query_spans",
             "dropout_seeds")

    def arrays(self):
        return tuple(getattr(self, name) for name in self.NAMES)


def layout(shape):
    """PRESENT | the dims of a [B, N, T, S]-shaped operand that are not broadcast (0: none)."""
    if not shape:
        return 0
    return PRESENT | sum(bit for bit, size in zip((BATCH, HEADS, QUERIES, KEYS), shape)
                         if size > 1)


def placeholder(dtype):
    return jnp.zeros((1,), dtype)


def no_operands():
    """The feature operands of a call with no masks or score modifiers, by plan name."""
    return dict(zip(Operands.NAMES, (placeholder(dtype) for dtype in (
        jnp.float32, jnp.bool_, jnp.int32, jnp.int32, jnp.int32, jnp.int32, jnp.int32))))


def as_4d(name, array, problem_shape):
    """`array` with leading size-1 dims up to 4-D, checked broadcastable to problem_shape."""
    if not isinstance(array, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got "
                        f"{type(array).__name__}")
    if array.ndim > 4:
        raise ValueError(f"{name}.ndim={array.ndim}; expected at most 4 dims broadcastable to "
                         f"[batch, num_heads, q_len, kv_len] = {list(problem_shape)}")
    array = jnp.reshape(array, (1,) * (4 - array.ndim) + array.shape)
    for size, want, dim in zip(array.shape, problem_shape, ("batch", "num_heads", "q_len",
                                                             "kv_len")):
        if size not in (1, want):
            raise ValueError(f"{name}.shape={tuple(array.shape)} does not broadcast to "
                             f"[batch, num_heads, q_len, kv_len] = {list(problem_shape)}: "
                             f"its {dim} dim is {size}, expected 1 or {want}")
    return array


def check_mask_dtype(mask):
    if mask is not None and mask.dtype != jnp.bool_:
        raise TypeError(f"mask.dtype={mask.dtype}; expected bool (True: the key is visible). "
                        "Pass an additive mask as bias")


def window(local_window_size):
    """local_window_size checked, as (left, right); (-1, -1) for None."""
    if local_window_size is None:
        return (-1, -1)
    if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size,
                                                                           bool):
        local_window_size = (local_window_size, local_window_size)
    if (not isinstance(local_window_size, (tuple, list)) or len(local_window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool)
                       for w in local_window_size)):
        raise TypeError(f"local_window_size={local_window_size!r} must be an int or a pair of "
                        "ints (left, right)")
    left, right = (int(w) for w in local_window_size)
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size={(left, right)} must not be negative")
    return (left, right)


def _soft_cap(logits_soft_cap):
    if logits_soft_cap is None:
        return 0.0
    if not isinstance(logits_soft_cap, numbers.Real) or isinstance(logits_soft_cap, bool):
        raise TypeError(f"logits_soft_cap must be a positive float or None, got "
                        f"{type(logits_soft_cap).__name__}")
    if not logits_soft_cap > 0 or not np.isfinite(logits_soft_cap):
        raise ValueError(f"{logits_soft_cap=} must be a positive finite float")
    return float(logits_soft_cap)


def _int_array(name, array, shape):
    if array is None:
        return None
    if not isinstance(array, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got "
                        f"{type(array).__name__}")
    if array.dtype != jnp.int32:
        raise TypeError(f"{name}.dtype={array.dtype}; expected int32")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name}.shape={tuple(array.shape)}; expected {tuple(shape)}")
    return array


@dataclasses.dataclass(frozen=True)
class Arguments:
    """The array arguments of a call, checked, with the batch dims folded into one: bias
    and mask 4-D ([B, N, T, S], size 1 where broadcast), the rest as jax.nn and
    features.py name them; None where not given."""
    bias: jax.Array = None
    mask: jax.Array = None
    query_seq_lengths: jax.Array = None
    key_value_seq_lengths: jax.Array = None
    query_segment_ids: jax.Array = None
    key_value_segment_ids: jax.Array = None
    dropout_rng: jax.Array = None  # a jax.random key, where dropout is on


def prepare(batch_shape, seq_q, seq_k, num_heads, bias, mask, query_seq_lengths,
            key_value_seq_lengths, local_window_size, logits_soft_cap, query_segment_ids,
            key_value_segment_ids, dropout_rate=0.0, dropout_rng=None, broadcast_dropout=False):
    """(Features, Arguments) for a call whose query has leading batch dims `batch_shape`
    (folded into one), after checking every argument; the spans are left to
    kernel_operands."""
    batch = int(np.prod(batch_shape))
    problem_shape = (batch, num_heads, seq_q, seq_k)
    fold = lambda x: None if x is None else jnp.reshape(x, (batch,) + x.shape[len(batch_shape):])
    arguments = Arguments(
        bias=_dense_operand("bias", bias, batch_shape, problem_shape),
        mask=_dense_operand("mask", mask, batch_shape, problem_shape),
        query_seq_lengths=fold(_int_array("query_seq_lengths", query_seq_lengths, batch_shape)),
        key_value_seq_lengths=fold(_int_array("key_value_seq_lengths", key_value_seq_lengths,
                                              batch_shape)),
        query_segment_ids=fold(_int_array("query_segment_ids", query_segment_ids,
                                          (*batch_shape, seq_q))),
        key_value_segment_ids=fold(_int_array("key_value_segment_ids", key_value_segment_ids,
                                              (*batch_shape, seq_k))),
        dropout_rng=_checked_dropout(dropout_rate, dropout_rng))
    if (arguments.query_segment_ids is None) != (arguments.key_value_segment_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together")
    check_mask_dtype(arguments.mask)
    if arguments.bias is not None and arguments.bias.dtype not in KERNEL_BIAS_DTYPES:
        # jax.nn adds the bias to float32 logits; other dtypes round the same way there.
        arguments = dataclasses.replace(arguments, bias=arguments.bias.astype(jnp.float32))
    bias, mask = arguments.bias, arguments.mask
    features = Features(
        window=window(local_window_size), soft_cap=_soft_cap(logits_soft_cap),
        bias=() if bias is None else tuple(bias.shape),
        bias_dtype=np.dtype(bias.dtype if bias is not None else np.float32),
        mask=() if mask is None else tuple(mask.shape),
        segments=arguments.query_segment_ids is not None,
        dropout_rate=float(dropout_rate) if arguments.dropout_rng is not None else 0.0,
        dropout_broadcast=bool(broadcast_dropout))
    return features, arguments


def kernel_operands(features, arguments, problem_shape):
    """(Features with the spans' layout, Operands) for the kernels."""
    a = arguments
    spans = _spans(problem_shape, a.query_seq_lengths, a.key_value_seq_lengths,
                   a.query_segment_ids, a.key_value_segment_ids, a.mask)
    features = dataclasses.replace(features, spans=() if spans is None
                                   else tuple(spans[0].shape[:2]))
    given = dict(bias=a.bias, mask=a.mask, query_segments=a.query_segment_ids,
                 key_segments=a.key_value_segment_ids,
                 key_spans=None if spans is None else spans[0],
                 query_spans=None if spans is None else spans[1],
                 dropout_seeds=dropout_seeds(features.dropout_rate, a.dropout_rng,
                                            *problem_shape[:2], features.dropout_broadcast))
    return features, Operands(**{name: array for name, array in no_operands().items()
                                 if given[name] is None},
                              **{name: array for name, array in given.items()
                                 if array is not None})


def _checked_dropout(rate, rng):
    """`rng` where dropout is on (rate > 0), after checking both; None otherwise."""
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool):
        raise TypeError(f"dropout_rate must be a float in [0, 1), got {type(rate).__name__}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate={rate} must be in [0, 1)")
    if rate == 0.0:
        return None
    if rng is None:
        raise ValueError(f"dropout_rate={rate} needs a dropout_rng (a jax.random key)")
    return rng


def dropout_seeds(rate, rng, batch, num_heads, broadcast):
    """The kernels' Philox key and stream for each batch element and head, int32
    [batch, num_heads, 2]: the key drawn once from `rng` (a jax.random key), the stream
    b * num_heads + n, or 0 for all where the mask is broadcast. None without dropout
    (rate 0, or no rng). An array indexed by batch and head, not a formula of the kernel's
    own indices, so that a shard of the batch or heads (or an element of jax.vmap's map)
    reads its own elements' streams and draws what the whole call draws."""
    if not rate or rng is None:
        return None
    key = jax.lax.bitcast_convert_type(jax.random.bits(rng, (), jnp.uint32), jnp.int32)
    streams = (jnp.zeros((batch, num_heads), jnp.int32) if broadcast else
               jnp.arange(batch * num_heads, dtype=jnp.int32).reshape(batch, num_heads))
    return jnp.stack([jnp.broadcast_to(key, streams.shape), streams], axis=-1)


def dropout_threshold(rate):
    """16-bit draws below this are dropped: the rate in units of 2**-16, at least 1 for
    any rate above 0 (0: no dropout)."""
    return 0 if not rate else min(max(int(round(rate * 2.0**16)), 1), 2**16 - 1)


# Seven rounds, as FlashAttention draws its dropout (Philox-4x32-7); Random123's default
# is ten and its known answers cover seven. Each round costs about 4% of a bf16 training
# step at head dim 128 (measured 2026-12-07).
PHILOX_ROUND, PHILOX_KEY_STEP, PHILOX_ROUNDS = 0xD256D193, 0x9E3779B9, 7


def _umulhi(a, b):
    """High 32 bits of a * b for uint32 arrays, in 16-bit halves (no uint64 needed)."""
    a0, a1, b0, b1 = a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16
    low = a0 * b0
    middle = a1 * b0 + (low >> 16)
    middle2 = a0 * b1 + (middle & 0xFFFF)
    return a1 * b1 + (middle >> 16) + (middle2 >> 16)


def philox(c0, c1, key, rounds=PHILOX_ROUNDS):
    """Philox-2x32 (7 rounds unless told) for counter (c0, c1) and key, uint32 arrays: its
    two words (the jnp twin of kernels/masking._philox)."""
    u32 = lambda x: (jnp.asarray(x, jnp.uint32) if isinstance(x, int)
                     else jnp.asarray(x).astype(jnp.uint32))
    c0, c1, key = u32(c0), u32(c1), u32(key)
    for _ in range(rounds):
        c0, c1 = _umulhi(u32(PHILOX_ROUND), c0) ^ c1 ^ key, u32(PHILOX_ROUND) * c0
        key = key + u32(PHILOX_KEY_STEP)
    return c0, c1


def dropout_keep(seeds, rate, seq_q, seq_k):
    """Boolean [B, N, T, S]: whether dropout keeps each probability, for `seeds` from
    dropout_seeds. Queries i, i + 8 and keys j, j + 8 (i % 16 < 8, j % 16 < 8) share the
    Philox-2x32 block of counter (group(i) * 8 * ceil(S / 16) + group(j), stream) and
    key (stepped by the counter's high word where T * S passes 2**32), group(x) =
    x // 16 * 8 + x % 8; element (i, j) takes 16-bit half 2 * (i // 8 % 2) + j // 8 % 2
    (low half of word 0 first). The kernels draw the same (masking.dropout_multiplier)."""
    group = lambda x: x // 16 * 8 + x % 8
    key_groups = 8 * -(-seq_k // 16)
    queries = jnp.arange(seq_q, dtype=jnp.uint32)[:, None]
    keys = jnp.arange(seq_k, dtype=jnp.uint32)[None, :]
    low = group(queries) * jnp.uint32(key_groups)
    position = low + group(keys)
    high = _umulhi(group(queries), jnp.uint32(key_groups)) + (position < low).astype(jnp.uint32)
    seeds = jax.lax.bitcast_convert_type(seeds, jnp.uint32)[..., None, None, :]
    key = seeds[..., 0] + high * jnp.uint32(PHILOX_KEY_STEP)
    words = philox(position, seeds[..., 1], key)
    halves = [words[0] & 0xFFFF, words[0] >> 16, words[1] & 0xFFFF, words[1] >> 16]
    which = 2 * (queries // 8 % 2) + keys // 8 % 2
    draw = jnp.select([which == w for w in range(3)], halves[:3], halves[3])
    return draw >= jnp.uint32(dropout_threshold(rate))


def _dense_operand(name, array, batch_shape, problem_shape):
    """bias or mask as [B, N, T, S] with size-1 broadcast dims, the batch dims folded.

    Leading batch dims that are all 1 or all the query's fold without a copy; a mix
    (some broadcast, some not) is broadcast to the query's batch dims first."""
    if array is None:
        return None
    extra = len(batch_shape) - 1
    if not isinstance(array, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got "
                        f"{type(array).__name__}")
    if array.ndim > 4 + extra:
        raise ValueError(f"{name}.ndim={array.ndim}; expected at most {4 + extra} dims "
                         f"broadcastable to {[*batch_shape, *problem_shape[1:]]}")
    array = jnp.reshape(array, (1,) * (4 + extra - array.ndim) + array.shape)
    leading = array.shape[:len(batch_shape)]
    if extra and tuple(leading) not in ((1,) * len(batch_shape), tuple(batch_shape)):
        try:
            array = jnp.broadcast_to(array, (*batch_shape, *array.shape[len(batch_shape):]))
        except ValueError as err:
            raise ValueError(f"{name}.shape={tuple(array.shape)} does not broadcast to "
                             f"{[*batch_shape, *problem_shape[1:]]}") from err
    if extra:
        array = jnp.reshape(array, (-1,) + array.shape[len(batch_shape):])
    return as_4d(name, array, problem_shape)


def _spans(problem_shape, q_lengths, kv_lengths, q_segments, kv_segments, mask):
    """(key_spans, query_spans) or None where no runtime visibility is given."""
    if q_lengths is None and kv_lengths is None and q_segments is None and mask is None:
        return None
    # A mask closed over by a jitted function is a constant, and XLA would evaluate these
    # reductions at compile time: 13 s for a [1, 1, 2048, 2048] mask on a CPU, more than
    # 30 s in a training step on the GPU machine. The barrier keeps them for run time.
    q_lengths, kv_lengths, q_segments, kv_segments, mask = jax.lax.optimization_barrier(
        (q_lengths, kv_lengths, q_segments, kv_segments, mask))
    batch, num_heads, seq_q, seq_k = problem_shape
    span_batch = batch if (q_lengths is not None or kv_lengths is not None
                           or q_segments is not None or (mask is not None and mask.shape[0] > 1)
                           ) else 1
    span_heads = num_heads if mask is not None and mask.shape[1] > 1 else 1
    shape = (span_batch, span_heads)
    key_spans = _spans_along(shape, seq_q, seq_k, q_lengths, kv_lengths, q_segments,
                             kv_segments, mask)
    query_spans = _spans_along(shape, seq_k, seq_q, kv_lengths, q_lengths, kv_segments,
                               q_segments, None if mask is None else jnp.swapaxes(mask, 2, 3))
    return key_spans, query_spans


def _spans_along(shape, rows, cols, row_lengths, col_lengths, row_segments, col_segments,
                 mask):
    """[*shape, 3, rows] int32: per row, (first visible col, end, full_from), where every col
    in [full_from, end) is visible; an empty row has first = cols and end = 0, and a row
    whose visible cols are not one run has full_from = cols. `mask` is [B, N, rows, cols]
    with broadcast dims."""
    first = jnp.zeros((*shape, rows), jnp.int32)
    end = jnp.full((*shape, rows), cols, jnp.int32)
    exact = jnp.ones((*shape, rows), bool)
    positions = jnp.arange(rows, dtype=jnp.int32)
    if col_lengths is not None:
        end = jnp.minimum(end, col_lengths[:, None, None])
    if row_lengths is not None:
        end = jnp.where(positions < row_lengths[:, None, None], end, 0)
    if row_segments is not None:
        seg_first, seg_end, seg_exact = _segment_spans(row_segments, col_segments)
        first = jnp.maximum(first, seg_first[:, None])
        end = jnp.minimum(end, seg_end[:, None])
        exact &= seg_exact[:, None]
    if mask is not None:
        mask_first, mask_end, mask_exact = _mask_spans(mask, cols)
        first = jnp.maximum(first, mask_first)
        end = jnp.minimum(end, mask_end)
        exact &= mask_exact
    empty = first >= end
    full_from = jnp.where(exact & ~empty, first, cols)
    first, end = jnp.where(empty, cols, first), jnp.where(empty, 0, end)
    return jnp.stack([first, end, full_from], axis=-2).astype(jnp.int32)


def _segment_spans(row_segments, col_segments):
    """Per row, the run of cols with its segment id: (first, end, exact), [B, rows] each.

    Ids in runs (non-decreasing, as packed sequences are) give each row its run
    exactly, found by binary search. Where a batch's col ids are not non-decreasing the
    span is every col, not exact: still right, as the kernels compare the ids, but no
    block is skipped."""
    cols = col_segments.shape[1]
    ordered = jnp.all(col_segments[:, 1:] >= col_segments[:, :-1], axis=1)[:, None]
    search = jax.vmap(lambda ids, values, side: jnp.searchsorted(
        ids, values, side=side, method="scan_unrolled"), in_axes=(0, 0, None))
    first = search(col_segments, row_segments, "left").astype(jnp.int32)
    end = search(col_segments, row_segments, "right").astype(jnp.int32)
    return (jnp.where(ordered, first, 0), jnp.where(ordered, end, cols),
            jnp.broadcast_to(ordered, first.shape))


def _mask_spans(mask, cols):
    """Per row of a [B, N, rows, cols] mask (broadcast dims of size 1): the first visible col,
    the end, and whether the visible cols are one run."""
    mask = jnp.broadcast_to(mask, (*mask.shape[:3], cols))
    positions = jnp.arange(cols, dtype=jnp.int32)
    first = jnp.min(jnp.where(mask, positions, cols), axis=-1)
    end = jnp.max(jnp.where(mask, positions + 1, 0), axis=-1)
    count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    return first, end, count == end - first
