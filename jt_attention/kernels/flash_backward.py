"""Flash-attention backward for head dims up to 256 (FlashAttention-2, section 3.2).

The probabilities are recomputed per block from Q, K and the forward's row
logsumexp, so no Sq x Sk array reaches HBM. Two kernels, neither with atomics on
Q, K or V:

- `_flash_key_grads_kernel`: one program per (BLOCK_N keys, batch·kv head) keeps
  dK and dV for its keys in registers and streams the query blocks of every query
  head in its group (grouped-query attention sums there, not in a second pass).
- `_flash_query_grads_kernel`: one program per (BLOCK_M queries, batch·head) keeps
  dQ and streams the key blocks, like the forward. It runs first and also writes
  delta = rowsum(dO * O) - dlse for its rows (it holds those dO rows anyway), which
  saves the separate preprocess launch (0.1 ms at B=16 H=16 S=2048 D=128), and the
  bias gradient, as it visits each score element of a head once.

That recomputes Q.K^T and dO.V^T in both (7 matmuls where 5 are needed) and buys
a deterministic dQ, dK and dV. Base-2 scores, as in the forward; the blocks walked
and the element predicate come from masking.py, as there. With a soft-cap, the
score gradient dS (with respect to the capped logits) is multiplied by the cap's
derivative before it reaches dQ, dK and the bias.
"""

import triton
import triton.language as tl

from jt_attention.kernels import masking
from jt_attention.kernels.backward_preprocess import load_row_stats, load_rows
from jt_attention.kernels.tiles import (block_coords, load_from, rows_source, store_to,
                                        tile_ptrs, tile_source)


@triton.jit
def _key_grads_step(dk, dv, k, v, q_rows, dout_rows, lse_ptr, delta_ptr, start_m, offs_m,
                    start_n, keys, offs_d, spans, q_segments_base, key_segments_base, mask_base,
                    bias_base, seeds_ptr, batch_head,
                    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
                    SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, BIAS_LAYOUT: tl.constexpr,
                    MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr, SPANS: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                    WINDOW_RIGHT: tl.constexpr, NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr,
                    SEQ_K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    STRIDE_QS: tl.constexpr, STRIDE_DOS: tl.constexpr, MASKED: tl.constexpr,
                    RAGGED_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    TMA: tl.constexpr):
    """dV += P^T . dO and dK += dS^T . Q for queries [start_m, start_m + BLOCK_M).

    Works on transposed tiles ([keys, queries]) so no tile needs a transpose of a
    product. MASKED applies masking.visible (with the queries' key spans `spans`);
    RAGGED_ROWS bounds the query loads (SEQ_Q is not a multiple of BLOCK_M)."""
    rows = start_m + offs_m
    q = load_from(q_rows, start_m, rows, offs_d, STRIDE_QS, SEQ_Q, HEAD_DIM, RAGGED_ROWS,
                  BLOCK_D != HEAD_DIM, TMA)
    dout = load_from(dout_rows, start_m, rows, offs_d, STRIDE_DOS, SEQ_Q, HEAD_DIM, RAGGED_ROWS,
                     BLOCK_D != HEAD_DIM, TMA)
    lse, delta = load_row_stats(lse_ptr, delta_ptr, rows, SEQ_Q, RAGGED_ROWS)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    scores_t, cap_grad_t = masking.logits(qk_t, bias_base, rows[None, :], keys[:, None], SCALE,
                                          SOFT_CAP, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K,
                                          q.dtype.primitive_bitwidth == 16)
    probs_t = tl.math.exp2(scores_t - lse[None, :])
    if MASKED:
        lo, hi = masking.row_reach(rows, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                   WINDOW_RIGHT, SPANS)
        q_segment = masking.segment_ids(q_segments_base, 0, rows, SEQ_Q, SEGMENTS)
        keep = masking.visible(rows[None, :], keys[:, None], lo[None, :], hi[None, :],
                               masking.no_exact_rows(rows)[None, :], q_segment[None, :],
                               key_segments_base, mask_base, NUM_HEADS, SEQ_Q, SEQ_K, SEGMENTS,
                               MASK_LAYOUT)
        probs_t = tl.where(keep, probs_t, 0.0)
    dprobs_t = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)
    if DROPOUT_THRESHOLD:  # dV takes the kept probabilities, dS the kept dP
        dropped_t = masking.dropout_multiplier(
            seeds_ptr, batch_head, start_m, offs_m.shape[0], start_n, keys.shape[0], True,
            SEQ_Q, SEQ_K, DROPOUT_THRESHOLD, DROPOUT_SCALE)
        dv = tl.dot((probs_t * dropped_t).to(dout.dtype), dout, dv,
                    input_precision=DOT_PRECISION)
        dprobs_t = dprobs_t * dropped_t
    else:
        dv = tl.dot(probs_t.to(dout.dtype), dout, dv, input_precision=DOT_PRECISION)
    dscores_t = probs_t * (dprobs_t - delta[None, :]) * cap_grad_t
    return tl.dot(dscores_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION), dv


@triton.jit
def _flash_key_grads_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, bias_ptr, mask_ptr, q_segments_ptr,
    k_segments_ptr, key_spans_ptr, query_spans_ptr, dropout_seeds_ptr, dk_ptr, dv_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr,
    SPANS: tl.constexpr, BATCH: tl.constexpr, BATCH_INNER: tl.constexpr,
    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """programs (cdiv(SEQ_K, BLOCK_N), batch * NUM_KV_HEADS), or tiles.block_coords'
    batch-inner grid; dk and dv are shaped like k."""
    NUM_KV_HEADS: tl.constexpr = NUM_HEADS // KV_GROUP
    KEY_BLOCKS: tl.constexpr = (SEQ_K + BLOCK_N - 1) // BLOCK_N
    key_block, batch_kv_head = block_coords(KEY_BLOCKS, NUM_KV_HEADS, BATCH, BATCH_INNER,
                                            WIDE_INDEXING)
    start_n = key_block * BLOCK_N
    batch = batch_kv_head // NUM_KV_HEADS
    kv_head = batch_kv_head % NUM_KV_HEADS
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    RAGGED_KEYS: tl.constexpr = SEQ_K % BLOCK_N != 0
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    # dK and dV are laid out like K and V. The scalar bases go first, then the tile; the
    # pointers hold the keys' tile, so their start is 0.
    k_base = batch * STRIDE_KB + kv_head * STRIDE_KH
    v_base = batch * STRIDE_VB + kv_head * STRIDE_VH
    kv_offsets = tile_ptrs(0, keys, offs_d, STRIDE_KS, SEQ_K)
    k = load_from(rows_source(k_ptr + k_base + kv_offsets, k_ptr + k_base, STRIDE_KS, SEQ_K,
                              HEAD_DIM, TMA),
                  start_n * TMA, keys, offs_d, STRIDE_KS, SEQ_K, HEAD_DIM, RAGGED_KEYS,
                  BLOCK_D != HEAD_DIM, TMA)
    v = load_from(rows_source(v_ptr + v_base + kv_offsets, v_ptr + v_base, STRIDE_VS, SEQ_K,
                              HEAD_DIM, TMA),
                  start_n * TMA, keys, offs_d, STRIDE_VS, SEQ_K, HEAD_DIM, RAGGED_KEYS,
                  BLOCK_D != HEAD_DIM, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_segments_base = q_segments_ptr + batch * SEQ_Q
    key_segments_base = k_segments_ptr + batch * SEQ_K

    # Never pipelined: where the query loops below shrink to one step each (too few
    # query blocks, bounds known at compile time), the compiler pipelined this loop
    # instead, holding both steps' Q and dO tiles num_stages deep (WORKSPACE_NOTES.md,
    # "Key grads: the group loop pipelined").
    for group_member in tl.range(KV_GROUP, num_stages=1):
        head = kv_head * KV_GROUP + group_member
        q_base = q_ptr + batch * STRIDE_QB + head * STRIDE_QH
        q_rows = tile_source(q_base, offs_m, offs_d, STRIDE_QS, SEQ_Q, HEAD_DIM, TMA)
        dout_base = dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH
        dout_rows = tile_source(dout_base, offs_m, offs_d, STRIDE_DOS, SEQ_Q, HEAD_DIM, TMA)
        row_offset = (batch * NUM_HEADS + head) * SEQ_Q
        bias_base = masking.dense_base(bias_ptr, batch, head, BIAS_LAYOUT, NUM_HEADS, SEQ_Q,
                                       SEQ_K)
        mask_base = masking.dense_base(mask_ptr, batch, head, MASK_LAYOUT, NUM_HEADS, SEQ_Q,
                                       SEQ_K)
        spans = masking.spans_base(key_spans_ptr, batch, head, SPANS, NUM_HEADS, SEQ_Q)
        start, full_start, full_end, stop = masking.query_blocks(
            start_n, masking.spans_base(query_spans_ptr, batch, head, SPANS, NUM_HEADS, SEQ_K),
            BLOCK_N, BLOCK_M, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, SPANS)
        for stretch in tl.static_range(3):  # the middle stretch is unmasked
            begin, end = masking.stretch_bounds(stretch, start, full_start, full_end, stop)
            for start_m in range(begin, end, BLOCK_M):
                dk, dv = _key_grads_step(
                    dk, dv, k, v, q_rows, dout_rows, lse_ptr + row_offset, delta_ptr + row_offset,
                    start_m, offs_m, start_n, keys, offs_d, spans, q_segments_base,
                    key_segments_base, mask_base, bias_base, dropout_seeds_ptr,
                    batch * NUM_HEADS + head, DROPOUT_THRESHOLD, DROPOUT_SCALE, SCALE,
                    SOFT_CAP, BIAS_LAYOUT, MASK_LAYOUT, SEGMENTS, SPANS,
                    IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, NUM_HEADS, SEQ_Q, SEQ_K, HEAD_DIM,
                    BLOCK_D, STRIDE_QS, STRIDE_DOS, stretch != 1, RAGGED_ROWS, DOT_PRECISION, TMA)

    dk *= SCALE
    store_to(rows_source(dk_ptr + k_base + kv_offsets, dk_ptr + k_base, STRIDE_KS, SEQ_K,
                         HEAD_DIM, TMA),
             start_n * TMA, dk.to(dk_ptr.dtype.element_ty), keys, offs_d, STRIDE_KS, SEQ_K,
             HEAD_DIM, RAGGED_KEYS, BLOCK_D != HEAD_DIM, TMA)
    store_to(rows_source(dv_ptr + v_base + kv_offsets, dv_ptr + v_base, STRIDE_VS, SEQ_K,
                         HEAD_DIM, TMA),
             start_n * TMA, dv.to(dv_ptr.dtype.element_ty), keys, offs_d, STRIDE_VS, SEQ_K,
             HEAD_DIM, RAGGED_KEYS, BLOCK_D != HEAD_DIM, TMA)


@triton.jit
def _query_grads_step(dq, q, dout, lse, delta, k_rows, v_rows, dbias_ptr, start_n, start_m,
                      rows, offs_n, offs_d, batch, head, lo, hi, q_segment, key_segments_base,
                      mask_base, bias_base, seeds_ptr,
                      DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
                      SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, BIAS_LAYOUT: tl.constexpr,
                      BIAS_GRAD: tl.constexpr, MASK_LAYOUT: tl.constexpr,
                      SEGMENTS: tl.constexpr, SPANS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                      NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      STRIDE_KS: tl.constexpr, STRIDE_VS: tl.constexpr, MASKED: tl.constexpr,
                      RAGGED_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      TMA: tl.constexpr):
    """dQ += dS . K (unscaled) for keys [start_n, start_n + BLOCK_N), and the tile's bias
    gradient (BIAS_GRAD: a masking.store_bias_grad mode, 0 for none)."""
    cols = start_n + offs_n
    k = load_from(k_rows, start_n, cols, offs_d, STRIDE_KS, SEQ_K, HEAD_DIM, RAGGED_KEYS,
                  BLOCK_D != HEAD_DIM, TMA)
    v = load_from(v_rows, start_n, cols, offs_d, STRIDE_VS, SEQ_K, HEAD_DIM, RAGGED_KEYS,
                  BLOCK_D != HEAD_DIM, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    scores, cap_grad = masking.logits(qk, bias_base, rows[:, None], cols[None, :], SCALE,
                                      SOFT_CAP, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K,
                                      q.dtype.primitive_bitwidth == 16)
    probs = tl.math.exp2(scores - lse[:, None])
    if MASKED:
        keep = masking.visible(rows[:, None], cols[None, :], lo[:, None], hi[:, None],
                               masking.no_exact_rows(rows)[:, None], q_segment[:, None],
                               key_segments_base, mask_base, NUM_HEADS, SEQ_Q, SEQ_K, SEGMENTS,
                               MASK_LAYOUT)
        probs = tl.where(keep, probs, 0.0)
    dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT_THRESHOLD:  # the kept dP
        dprobs = dprobs * masking.dropout_multiplier(
            seeds_ptr, batch * NUM_HEADS + head, start_m, rows.shape[0], start_n,
            offs_n.shape[0], False, SEQ_Q, SEQ_K, DROPOUT_THRESHOLD, DROPOUT_SCALE)
    dlogits = probs * (dprobs - delta[:, None]) * cap_grad
    if BIAS_GRAD:
        masking.store_bias_grad(dbias_ptr, dlogits, rows, cols, batch, head, BIAS_GRAD,
                                BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    return tl.dot(dlogits.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _flash_query_grads_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, dlse_ptr, bias_ptr, mask_ptr,
    q_segments_ptr, k_segments_ptr, key_spans_ptr, dropout_seeds_ptr, dq_ptr, delta_ptr,
    dbias_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr,
    SPANS: tl.constexpr, BIAS_GRAD: tl.constexpr, BATCH: tl.constexpr,
    BATCH_INNER: tl.constexpr,
    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """programs (cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS), or tiles.block_coords'
    batch-inner grid; dq is shaped like q; delta (written for the key-grads kernel) and
    dlse are [batch * NUM_HEADS, SEQ_Q] fp32; dbias is the bias's shape
    (plan.bias_grad_buffer), written where BIAS_GRAD."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    row_block, batch_head = block_coords(ROW_BLOCKS, NUM_HEADS, BATCH, BATCH_INNER,
                                         WIDE_INDEXING)
    start_m = row_block * BLOCK_M
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    kv_head = head // KV_GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    # The pointers of q, dO, O and dQ hold the rows' tile, so their start is 0.
    q_base = batch * STRIDE_QB + head * STRIDE_QH  # dQ is laid out like q
    q_offsets = tile_ptrs(q_base, rows, offs_d, STRIDE_QS, SEQ_Q)
    q = load_from(rows_source(q_ptr + q_offsets, q_ptr + q_base, STRIDE_QS, SEQ_Q, HEAD_DIM,
                              TMA),
                  start_m * TMA, rows, offs_d, STRIDE_QS, SEQ_Q, HEAD_DIM, RAGGED_ROWS,
                  BLOCK_D != HEAD_DIM, TMA)
    dout_base = dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH
    dout = load_from(tile_source(dout_base, rows, offs_d, STRIDE_DOS, SEQ_Q, HEAD_DIM, TMA),
                     start_m * TMA, rows, offs_d, STRIDE_DOS, SEQ_Q, HEAD_DIM, RAGGED_ROWS,
                     BLOCK_D != HEAD_DIM, TMA)
    out_base = out_ptr + batch * STRIDE_OB + head * STRIDE_OH
    out = load_from(tile_source(out_base, rows, offs_d, STRIDE_OS, SEQ_Q, HEAD_DIM, TMA),
                    start_m * TMA, rows, offs_d, STRIDE_OS, SEQ_Q, HEAD_DIM, RAGGED_ROWS,
                    BLOCK_D != HEAD_DIM, TMA)
    row_offset = batch_head * SEQ_Q
    delta = (tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
             - load_rows(dlse_ptr + row_offset, rows, SEQ_Q, RAGGED_ROWS, 0.0))
    tl.store(delta_ptr + row_offset + rows, delta, mask=rows < SEQ_Q)
    lse = masking.backward_lse(load_rows(lse_ptr + row_offset, rows, SEQ_Q, RAGGED_ROWS,
                                         float("inf")))
    k_base = k_ptr + batch * STRIDE_KB + kv_head * STRIDE_KH
    k_rows = tile_source(k_base, offs_n, offs_d, STRIDE_KS, SEQ_K, HEAD_DIM, TMA)
    v_base = v_ptr + batch * STRIDE_VB + kv_head * STRIDE_VH
    v_rows = tile_source(v_base, offs_n, offs_d, STRIDE_VS, SEQ_K, HEAD_DIM, TMA)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    bias_base = masking.dense_base(bias_ptr, batch, head, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    mask_base = masking.dense_base(mask_ptr, batch, head, MASK_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    spans = masking.spans_base(key_spans_ptr, batch, head, SPANS, NUM_HEADS, SEQ_Q)
    lo, hi = masking.row_reach(rows, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                               WINDOW_RIGHT, SPANS)
    q_segment = masking.segment_ids(q_segments_ptr, batch, rows, SEQ_Q, SEGMENTS)
    key_segments_base = k_segments_ptr + batch * SEQ_K
    start, full_start, full_end, stop = masking.key_blocks(
        start_m, spans, BLOCK_M, BLOCK_N, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
        SPANS)
    RAGGED_KEYS: tl.constexpr = SEQ_K % BLOCK_N != 0
    for stretch in tl.static_range(3):  # the middle stretch is unmasked
        begin, end = masking.stretch_bounds(stretch, start, full_start, full_end, stop)
        for start_n in range(begin, end, BLOCK_N):
            dq = _query_grads_step(
                dq, q, dout, lse, delta, k_rows, v_rows, dbias_ptr, start_n, start_m, rows, offs_n,
                offs_d, batch, head, lo, hi, q_segment, key_segments_base, mask_base, bias_base,
                dropout_seeds_ptr, DROPOUT_THRESHOLD, DROPOUT_SCALE, SCALE, SOFT_CAP,
                BIAS_LAYOUT, BIAS_GRAD, MASK_LAYOUT, SEGMENTS,
                SPANS, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, NUM_HEADS, SEQ_Q, SEQ_K, HEAD_DIM,
                BLOCK_D, STRIDE_KS, STRIDE_VS, stretch != 1, RAGGED_KEYS and stretch != 1,
                DOT_PRECISION, TMA)

    dq *= SCALE
    store_to(rows_source(dq_ptr + q_offsets, dq_ptr + q_base, STRIDE_QS, SEQ_Q, HEAD_DIM, TMA),
             start_m * TMA, dq.to(dq_ptr.dtype.element_ty), rows, offs_d, STRIDE_QS, SEQ_Q,
             HEAD_DIM, RAGGED_ROWS, BLOCK_D != HEAD_DIM, TMA)
