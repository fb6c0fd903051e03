"""Fused flash-attention forward for head dims up to 256.

One program owns BLOCK_M query rows of one (batch, head) and streams the keys and
values in BLOCK_N blocks with an online softmax (FlashAttention-2), so the Sq x Sk
score matrix never reaches HBM. Shapes, strides and the scale are constexprs: the
compiler then knows every alignment, which jax-triton's plain integer arguments
would hide (jax-triton specializes no integer argument).

The key blocks come from masking.key_blocks: blocks no row of the program sees are
never loaded, and only the masked stretches evaluate the element predicate.
Scores are kept in base 2 (`exp2`, logits pre-multiplied by log2(e)); the row
logsumexp is written back in natural-log units, matching `jax.nn`. A row that sees
no key gets 0 and a logsumexp of -inf.
"""

import triton
import triton.language as tl

from jt_attention.kernels import masking
from jt_attention.kernels.tiles import (block_coords, load_from, longest_first_coords,
                                        store_to, tile_source)


@triton.jit
def _attend_block(acc, row_sum, row_max, q, k_rows, v_rows, start_n, start_m, queries, offs_n,
                  offs_d, lo, hi, exact, q_segment, key_segments_base, mask_base, bias_base,
                  seeds_ptr, batch_head,
                  DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
                  SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, BIAS_LAYOUT: tl.constexpr,
                  MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr, SPANS: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                  WINDOW_RIGHT: tl.constexpr, NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr,
                  SEQ_K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  STRIDE_KS: tl.constexpr, STRIDE_VS: tl.constexpr,
                  MASKED: tl.constexpr, RAGGED_KEYS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N).

    queries: the rows' query positions. MASKED applies masking.visible to the scores;
    RAGGED_KEYS also bounds the K/V loads (the block may cross SEQ_K). With dropout the
    row sums take every probability and P.V the kept ones, scaled (batch_head: the
    rows' batch·head, for the dropout stream)."""
    cols = start_n + offs_n
    k = load_from(k_rows, start_n, cols, offs_d, STRIDE_KS, SEQ_K, HEAD_DIM, RAGGED_KEYS,
                  BLOCK_D != HEAD_DIM, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    scores, _ = masking.logits(qk, bias_base, queries[:, None], cols[None, :], SCALE, SOFT_CAP,
                               BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K,
                               q.dtype.primitive_bitwidth == 16)
    if MASKED:
        keep = masking.visible(queries[:, None], cols[None, :], lo[:, None], hi[:, None],
                               exact[:, None], q_segment[:, None], key_segments_base,
                               mask_base, NUM_HEADS, SEQ_Q, SEQ_K, SEGMENTS, MASK_LAYOUT)
        scores = tl.where(keep, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    # A row that has seen no key yet keeps max -inf; exponents are then taken from 0 so
    # that they stay exp2(-inf) = 0, never NaN.
    exp_base = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.math.exp2(scores - exp_base[:, None])
    rescale = tl.math.exp2(row_max - exp_base)
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    if DROPOUT_THRESHOLD:
        probs = probs * masking.dropout_multiplier(
            seeds_ptr, batch_head, start_m, queries.shape[0], start_n, offs_n.shape[0], False,
            SEQ_Q, SEQ_K, DROPOUT_THRESHOLD, DROPOUT_SCALE)
    v = load_from(v_rows, start_n, cols, offs_d, STRIDE_VS, SEQ_K, HEAD_DIM, RAGGED_KEYS,
                  BLOCK_D != HEAD_DIM, TMA)
    acc = acc * rescale[:, None]
    acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, row_sum, new_max


@triton.jit
def _attend_stretches(acc, row_sum, row_max, q, k_rows, v_rows, start, full_start, full_end,
                      stop, start_m, queries, offs_n, offs_d, lo, hi, exact, q_segment,
                      key_segments_base, mask_base, bias_base, seeds_ptr, batch_head,
                      DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
                      SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, BIAS_LAYOUT: tl.constexpr,
                      MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr, SPANS: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                      WINDOW_RIGHT: tl.constexpr, NUM_HEADS: tl.constexpr,
                      SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_VS: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      TMA: tl.constexpr):
    """_attend_block over masking.stretches(): masked, unmasked, masked."""
    RAGGED_KEYS: tl.constexpr = SEQ_K % BLOCK_N != 0
    for stretch in tl.static_range(3):  # the middle stretch is unmasked
        begin, end = masking.stretch_bounds(stretch, start, full_start, full_end, stop)
        for start_n in range(begin, end, BLOCK_N):
            acc, row_sum, row_max = _attend_block(
                acc, row_sum, row_max, q, k_rows, v_rows, start_n, start_m, queries, offs_n, offs_d,
                lo, hi, exact, q_segment, key_segments_base, mask_base, bias_base, seeds_ptr,
                batch_head,
                DROPOUT_THRESHOLD, DROPOUT_SCALE, SCALE,
                SOFT_CAP, BIAS_LAYOUT, MASK_LAYOUT, SEGMENTS, SPANS, IS_CAUSAL, WINDOW_LEFT,
                WINDOW_RIGHT, NUM_HEADS, SEQ_Q, SEQ_K, HEAD_DIM, BLOCK_D, STRIDE_KS, STRIDE_VS,
                stretch != 1, RAGGED_KEYS and stretch != 1, DOT_PRECISION, TMA)
    return acc, row_sum, row_max


@triton.jit
def _flash_forward_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, q_segments_ptr, k_segments_ptr, key_spans_ptr,
    dropout_seeds_ptr, out_ptr, lse_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr,
    SPANS: tl.constexpr, BATCH: tl.constexpr, BATCH_INNER: tl.constexpr,
    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """programs (cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS), or tiles.block_coords' batch-inner
    grid; lse is [batch, NUM_HEADS, SEQ_Q] fp32. The feature operands (bias to key_spans)
    are plan.SCORE_INPUTS."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    # Causal: later row blocks see more keys, so they go first. Where spans decide
    # (a mask, lengths, segment ids) the same order is a guess that costs nothing when
    # rows are alike and takes 5% off a causal mask passed as an array.
    if IS_CAUSAL or (SPANS and not BATCH_INNER):
        row_block, batch_head = longest_first_coords(ROW_BLOCKS, WIDE_INDEXING)
    else:
        row_block, batch_head = block_coords(ROW_BLOCKS, NUM_HEADS, BATCH, BATCH_INNER,
                                             WIDE_INDEXING)
        if SPANS:  # the batch-inner grid keeps its order; the row blocks go last first
            row_block = ROW_BLOCKS - 1 - row_block
    start_m = row_block * BLOCK_M
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    kv_head = head // KV_GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # The pointers of q and out hold the rows' tile (offs_m), so their start is 0.
    q_base = q_ptr + batch * STRIDE_QB + head * STRIDE_QH
    q_rows = tile_source(q_base, offs_m, offs_d, STRIDE_QS, SEQ_Q, HEAD_DIM, TMA)
    k_base = k_ptr + batch * STRIDE_KB + kv_head * STRIDE_KH
    k_rows = tile_source(k_base, offs_n, offs_d, STRIDE_KS, SEQ_K, HEAD_DIM, TMA)
    v_base = v_ptr + batch * STRIDE_VB + kv_head * STRIDE_VH
    v_rows = tile_source(v_base, offs_n, offs_d, STRIDE_VS, SEQ_K, HEAD_DIM, TMA)
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    q = load_from(q_rows, start_m * TMA, offs_m, offs_d, STRIDE_QS, SEQ_Q, HEAD_DIM,
                  RAGGED_ROWS, BLOCK_D != HEAD_DIM, TMA)

    bias_base = masking.dense_base(bias_ptr, batch, head, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    mask_base = masking.dense_base(mask_ptr, batch, head, MASK_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    spans = masking.spans_base(key_spans_ptr, batch, head, SPANS, NUM_HEADS, SEQ_Q)
    lo, hi = masking.row_reach(offs_m, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                               WINDOW_RIGHT, SPANS)
    exact = masking.exact_rows(offs_m, spans, SEQ_Q, SPANS)
    q_segment = masking.segment_ids(q_segments_ptr, batch, offs_m, SEQ_Q, SEGMENTS)
    start, full_start, full_end, stop = masking.key_blocks(
        start_m, spans, BLOCK_M, BLOCK_N, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
        SPANS)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, row_sum, row_max = _attend_stretches(
        acc, row_sum, row_max, q, k_rows, v_rows, start, full_start, full_end, stop, start_m,
        offs_m, offs_n, offs_d, lo, hi, exact, q_segment, k_segments_ptr + batch * SEQ_K,
        mask_base, bias_base, dropout_seeds_ptr, batch_head, DROPOUT_THRESHOLD, DROPOUT_SCALE,
        SCALE, SOFT_CAP, BIAS_LAYOUT, MASK_LAYOUT, SEGMENTS,
        SPANS, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, NUM_HEADS, SEQ_Q, SEQ_K, HEAD_DIM, BLOCK_D,
        STRIDE_KS, STRIDE_VS, BLOCK_N, DOT_PRECISION, TMA)

    seen = row_sum > 0  # else the row saw no key: 0 out, lse -inf
    acc = acc / tl.where(seen, row_sum, 1.0)[:, None]
    out_base = out_ptr + batch * STRIDE_OB + head * STRIDE_OH
    out_rows = tile_source(out_base, offs_m, offs_d, STRIDE_OS, SEQ_Q, HEAD_DIM, TMA)
    store_to(out_rows, start_m * TMA, acc.to(out_ptr.dtype.element_ty), offs_m, offs_d,
               STRIDE_OS, SEQ_Q, HEAD_DIM, RAGGED_ROWS, BLOCK_D != HEAD_DIM, TMA)
    lse = tl.where(seen, (row_max + tl.math.log2(row_sum)) * masking.LN2, float("-inf"))
    tl.store(lse_ptr + batch_head * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)
