"""Attention backward for head dims above 256: the score gradients once, then three GEMMs.

A flash backward keeps dK and dV (2 x BLOCK_N x D fp32) in registers, which does not
fit for D = 1024, and recomputing the scores per D-chunk would multiply their FLOPs
(the forward's reasoning, two_pass_forward.py). So:

1. The score gradients: dP = dO.V^T as a GEMM over the head dim, then
   dS = P * (dP - delta), written once in the input dtype. Where the forward kept the
   softmax P, as it is no bigger than the output (plan.Problem.keeps_probs), it is
   read back: for rows of up to tuning.WHOLE_ROW_MAX_KEYS keys (16-bit inputs,
   plan.Problem.whole_rows) one program takes BLOCK_M whole rows and sums
   delta = rowsum(P * dP) itself (`_dscores_whole_rows_kernel`); other rows are tiled
   (`_dscores_from_probs_kernel`) and read delta = rowsum(dO * O) from
   backward_preprocess. Else P is recomputed from S = Q.K^T in
   the same loop and written too (`_score_grads_kernel`). Tiles wholly above the
   causal diagonal are skipped by the tiled kernels (never written, never read).
   Summing rowsum(dO * O) inside the tiled kernels instead, from the dO chunks
   already loaded, was measured slower: the O loads do not pipeline
   (WORKSPACE_NOTES.md, backward v2).
2. `probs_matmul._probs_matmul_kernel`, three times: dV = P^T.dO, dK = scale * dS^T.Q
   and dQ = scale * dS.K.

Costs 2 x Sq x Sk elements of HBM per batch·head, like the forward's P, for one chunk
of the batch·heads at a time (plan.Problem.head_chunks); dQ, dK and dV are updated in
place chunk by chunk. The score-gradient kernels also write the bias gradient
(masking.store_bias_grad), and, with a soft-cap, dS is taken with respect to the
logits before the cap (the forward then keeps no P: the cap's derivative needs them).
Tiles are visited as in the forward (masking.key_blocks), and entries past a row's
reach (masking.row_reach) are read through a select.
"""

import triton
import triton.language as tl

from jt_attention.kernels import masking
from jt_attention.kernels.backward_preprocess import load_row_stats, load_rows
from jt_attention.kernels.tiles import (grid_coords, load_tile, rows_dot_cols, store_tile,
                                        tile_ptrs)


@triton.jit
def _within_reach(values, rows, cols, lo, hi):
    """values zeroed past each row's reach (a select: the entries dropped may be NaN, from
    memory the forward never wrote)."""
    return tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), values, 0.0)


@triton.jit
def _store_scores_tile(ptr, offsets, values, rows, cols, SEQ_Q: tl.constexpr,
                       SEQ_K: tl.constexpr, RAGGED_ROWS: tl.constexpr,
                       RAGGED_KEYS: tl.constexpr):
    store_tile(ptr + offsets, values.to(ptr.dtype.element_ty), rows, cols, SEQ_Q, SEQ_K,
               RAGGED_ROWS, RAGGED_KEYS)


@triton.jit
def _store_score_grads(dscores_ptr, dbias_ptr, offsets, dscores, rows, cols, batch, head,
                       BIAS_GRAD: tl.constexpr, BIAS_LAYOUT: tl.constexpr,
                       NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr,
                       RAGGED_ROWS: tl.constexpr, RAGGED_KEYS: tl.constexpr):
    """dS of a tile, and its share of the bias gradient where one is taken."""
    _store_scores_tile(dscores_ptr, offsets, dscores, rows, cols, SEQ_Q, SEQ_K, RAGGED_ROWS,
                       RAGGED_KEYS)
    if BIAS_GRAD:
        masking.store_bias_grad(dbias_ptr, dscores, rows, cols, batch, head, BIAS_GRAD,
                                BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)


@triton.jit
def _score_grads_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, bias_ptr, mask_ptr, q_segments_ptr,
    k_segments_ptr, key_spans_ptr, dropout_seeds_ptr, head_start, dbias_earlier_ptr, probs_ptr,
    dscores_ptr, dbias_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr,
    SPANS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """programs (masking.tile_slots, cdiv(SEQ_Q, BLOCK_M), chunk heads), for the chunk
    of batch·heads from head_start on (plan.Problem.head_chunks). With dropout, probs
    holds the kept probabilities, scaled (for dV), and dS takes the kept dP.

    probs, dscores: [chunk heads, SEQ_Q, PROBS_STRIDE] in the input dtype.
    lse: [batch * NUM_HEADS, SEQ_Q]; delta: [chunk heads, SEQ_Q] (fp32).
    dbias (the bias's shape; dbias_earlier: what earlier chunks wrote to it, never
    read) is written where BIAS_GRAD."""
    chunk_head, batch, head, spans, start_m, block_n, seen, partial = masking.program_tile(
        key_spans_ptr, head_start, SEQ_Q, SEQ_K, NUM_HEADS, BLOCK_M, BLOCK_N, IS_CAUSAL,
        WINDOW_LEFT, WINDOW_RIGHT, SPANS, WIDE_INDEXING)
    batch_head = head_start + chunk_head
    kv_head = head // KV_GROUP
    start_n = block_n * BLOCK_N
    if seen:
        rows = start_m + tl.arange(0, BLOCK_M)
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        q_ptrs = tile_ptrs(q_ptr + batch * STRIDE_QB + head * STRIDE_QH, rows,
                           offs_k, STRIDE_QS, SEQ_Q)
        dout_ptrs = tile_ptrs(dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH, rows, offs_k,
                              STRIDE_DOS, SEQ_Q)
        k_ptrs = tile_ptrs(k_ptr + batch * STRIDE_KB + kv_head * STRIDE_KH, cols,
                           offs_k, STRIDE_KS, SEQ_K)
        v_ptrs = tile_ptrs(v_ptr + batch * STRIDE_VB + kv_head * STRIDE_VH, cols,
                           offs_k, STRIDE_VS, SEQ_K)
        RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
        RAGGED_KEYS: tl.constexpr = SEQ_K % BLOCK_N != 0
        RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_K != 0
        qk = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dprobs = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_k in range(0, HEAD_DIM, BLOCK_K):
            dims = start_k + offs_k
            q = load_tile(q_ptrs + start_k, rows, dims, SEQ_Q, HEAD_DIM, RAGGED_ROWS, RAGGED_DIM)
            k = load_tile(k_ptrs + start_k, cols, dims, SEQ_K, HEAD_DIM, RAGGED_KEYS, RAGGED_DIM)
            qk = tl.dot(q, tl.trans(k), qk, input_precision=DOT_PRECISION)
            dout = load_tile(dout_ptrs + start_k, rows, dims, SEQ_Q, HEAD_DIM, RAGGED_ROWS,
                             RAGGED_DIM)
            v = load_tile(v_ptrs + start_k, cols, dims, SEQ_K, HEAD_DIM, RAGGED_KEYS, RAGGED_DIM)
            dprobs = tl.dot(dout, tl.trans(v), dprobs, input_precision=DOT_PRECISION)

        lse, delta = load_row_stats(lse_ptr + batch_head * SEQ_Q, delta_ptr + chunk_head * SEQ_Q,
                                    rows, SEQ_Q, RAGGED_ROWS)
        bias_base = masking.dense_base(bias_ptr, batch, head, BIAS_LAYOUT, NUM_HEADS, SEQ_Q,
                                       SEQ_K)
        # exact tanh: the matmuls at these head dims hide its special-function work
        scores, cap_grad = masking.logits(qk, bias_base, rows[:, None], cols[None, :], SCALE,
                                          SOFT_CAP, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K, False)
        probs = tl.math.exp2(scores - lse[:, None])
        if partial:
            keep = masking.tile_visible(
                rows, cols, spans, q_segments_ptr, k_segments_ptr, mask_ptr, batch, head,
                IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, SPANS, NUM_HEADS, SEQ_Q, SEQ_K, SEGMENTS,
                MASK_LAYOUT)
            probs = tl.where(keep, probs, 0.0)
        if DROPOUT_THRESHOLD:
            dropped = masking.dropout_multiplier(
                dropout_seeds_ptr, batch_head, start_m, BLOCK_M, start_n, BLOCK_N, False, SEQ_Q,
                SEQ_K, DROPOUT_THRESHOLD, DROPOUT_SCALE)
            dlogits = probs * (dprobs * dropped - delta[:, None]) * cap_grad
            probs = probs * dropped
        else:
            dlogits = probs * (dprobs - delta[:, None]) * cap_grad
        offsets = tile_ptrs(chunk_head * SEQ_Q * PROBS_STRIDE, rows, cols, PROBS_STRIDE, SEQ_Q)
        _store_scores_tile(probs_ptr, offsets, probs, rows, cols, SEQ_Q, SEQ_K, RAGGED_ROWS,
                           RAGGED_KEYS)
        _store_score_grads(dscores_ptr, dbias_ptr, offsets, dlogits, rows, cols, batch, head,
                           BIAS_GRAD, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K, RAGGED_ROWS,
                           RAGGED_KEYS)


@triton.jit
def _dscores_from_probs_kernel(
    v_ptr, dout_ptr, probs_ptr, delta_ptr, key_spans_ptr, dbias_earlier_ptr, dscores_ptr,
    dbias_ptr,
    IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dS = P * (dO.V^T - delta) from the softmax P the forward kept
    (two_pass_forward._weighted_values_keeping_probs_kernel), for rows longer than
    tuning.WHOLE_ROW_MAX_KEYS or fp32 inputs (else _dscores_whole_rows_kernel).

    programs (masking.tile_slots, cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS).
    probs, dscores: [batch * NUM_HEADS, SEQ_Q, PROBS_STRIDE] in the input dtype."""
    batch_head, batch, head, spans, start_m, block_n, seen, partial = masking.program_tile(
        key_spans_ptr, 0, SEQ_Q, SEQ_K, NUM_HEADS, BLOCK_M, BLOCK_N, IS_CAUSAL, WINDOW_LEFT,
        WINDOW_RIGHT, SPANS, WIDE_INDEXING)
    start_n = block_n * BLOCK_N
    if seen:
        rows = start_m + tl.arange(0, BLOCK_M)
        cols = start_n + tl.arange(0, BLOCK_N)
        RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
        RAGGED_KEYS: tl.constexpr = SEQ_K % BLOCK_N != 0
        dprobs = rows_dot_cols(dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH,
                               v_ptr + batch * STRIDE_VB + (head // KV_GROUP) * STRIDE_VH,
                               tl.minimum(rows, SEQ_Q - 1) if RAGGED_ROWS else rows,
                               tl.minimum(cols, SEQ_K - 1) if RAGGED_KEYS else cols, SEQ_Q,
                               SEQ_K, HEAD_DIM, STRIDE_DOS, STRIDE_VS, DOT_PRECISION, BLOCK_K)
        delta = load_rows(delta_ptr + batch_head * SEQ_Q, rows, SEQ_Q, RAGGED_ROWS, 0.0)
        offsets = tile_ptrs(batch_head * SEQ_Q * PROBS_STRIDE, rows, cols, PROBS_STRIDE, SEQ_Q)
        probs = load_tile(probs_ptr + offsets, rows, cols, SEQ_Q, SEQ_K, RAGGED_ROWS,
                          RAGGED_KEYS).to(tl.float32)
        if partial:
            lo, hi = masking.row_reach(rows, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                          WINDOW_RIGHT, SPANS)
            probs = _within_reach(probs, rows, cols, lo, hi)
        dscores = probs * (dprobs - delta[:, None])
        _store_score_grads(dscores_ptr, dbias_ptr, offsets, dscores, rows, cols, batch, head,
                           BIAS_GRAD, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K, RAGGED_ROWS,
                           RAGGED_KEYS)


@triton.jit
def _dscores_whole_rows_kernel(
    v_ptr, dout_ptr, probs_ptr, dlse_ptr, key_spans_ptr, dbias_earlier_ptr, dscores_ptr,
    dbias_ptr,
    IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    ROW_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """_dscores_from_probs_kernel for BLOCK_M query rows and all their keys at once
    (ROW_KEYS: SEQ_K rounded up to a power of two, at most tuning.WHOLE_ROW_MAX_KEYS),
    so that delta = rowsum(P * dP) - dlse comes from the tile itself: no launch reads
    O and dO for it (-0.55 ms of 2.03 on the seed workload, H100: WORKSPACE_NOTES.md).
    The whole-row forward wrote every entry of P (zeros where hidden), so no select;
    V is read only for the keys the rows reach (masking.keys_to_read).

    programs (cdiv(SEQ_Q, BLOCK_M), 1, batch * NUM_HEADS).
    probs, dscores: [batch * NUM_HEADS, SEQ_Q, PROBS_STRIDE] in the input dtype;
    dlse: [batch * NUM_HEADS, SEQ_Q] fp32."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    row_block, _, batch_head = grid_coords(ROW_BLOCKS, 1, WIDE_INDEXING)
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, ROW_KEYS)
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    RAGGED_KEYS: tl.constexpr = SEQ_K != ROW_KEYS
    spans = masking.spans_base(key_spans_ptr, batch, head, SPANS, NUM_HEADS, SEQ_Q)
    keys = masking.key_blocks(row_block * BLOCK_M, spans, BLOCK_M, 1, SEQ_Q, SEQ_K, IS_CAUSAL,
                              WINDOW_LEFT, WINDOW_RIGHT, SPANS)
    start, stop = keys[0], keys[3]
    # Rows past SEQ_Q read the last row (their sums and dS are never stored), so the
    # loads of P mask the keys only.
    read_rows = tl.minimum(rows, SEQ_Q - 1) if RAGGED_ROWS else rows
    dprobs = rows_dot_cols(dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH,
                           v_ptr + batch * STRIDE_VB + (head // KV_GROUP) * STRIDE_VH,
                           read_rows, masking.keys_to_read(cols, start, stop, SEQ_K), SEQ_Q,
                           SEQ_K, HEAD_DIM, STRIDE_DOS, STRIDE_VS, DOT_PRECISION, BLOCK_K)
    offsets = tile_ptrs(batch_head * SEQ_Q * PROBS_STRIDE, read_rows, cols, PROBS_STRIDE, SEQ_Q)
    probs = load_tile(probs_ptr + offsets, rows, cols, SEQ_Q, SEQ_K, False,
                      RAGGED_KEYS).to(tl.float32)
    dlse = load_rows(dlse_ptr + batch_head * SEQ_Q, rows, SEQ_Q, RAGGED_ROWS, 0.0)
    delta = tl.sum(probs * dprobs, 1) - dlse
    # P is read again (from L2) rather than kept: held in fp32 next to dP through the
    # row sum, it spilled (255 registers, 124 bytes; ptxas for sm_90a, Triton 3.6).
    # The barrier keeps the compiler from merging the two reads.
    tl.debug_barrier()
    probs = load_tile(probs_ptr + offsets, rows, cols, SEQ_Q, SEQ_K, False,
                      RAGGED_KEYS).to(tl.float32)
    dscores = probs * (dprobs - delta[:, None])
    _store_score_grads(dscores_ptr, dbias_ptr, offsets, dscores, rows, cols, batch, head,
                       BIAS_GRAD, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K, RAGGED_ROWS,
                       RAGGED_KEYS)
