"""Attention forward for head dims above 256, in two launches.

A FlashAttention output block (BLOCK_M x D fp32) does not fit the register file
for D = 1024, and recomputing Q.K^T once per D-chunk of the output would multiply
its FLOPs. Instead:

1. `_score_tiles_kernel`, one program per (BLOCK_M x TILE_N) score tile a row block
   can see (masking.tile_slots): a GEMM over the head dim, then the tile's row max
   m_t, its probabilities exp(s - m_t) in the input dtype (values in [0, 1], so fp16
   cannot overflow), and its row sums l_t.
2. `_weighted_values_kernel`, one program per (BLOCK_M rows, BLOCK_D output columns):
   merges the tile statistics into the row max m and sum l, then accumulates
   sum_t (exp(m_t - m) * P_t) . V_t and divides by l. Rescaling is one multiply per
   element: no exp per element, and no division until the end. Run for a backward
   pass that keeps P (plan.Problem.keeps_probs), `_weighted_values_keeping_probs_kernel`
   has one more program per row block, which writes the softmax exp(m_t - m) * P_t / l.

The D-chunks of one row block are adjacent in the grid, so their re-reads of P come
from L2. Scores are in base 2, as in the flash kernel.

Rows of up to tuning.WHOLE_ROW_MAX_KEYS keys (16-bit inputs: plan.Problem.whole_rows)
take another pair of launches, as one program holds a row block's whole score rows:
`_row_softmax_kernel` writes the softmax P itself, normalized, and the logsumexp;
then O = P.V is a plain GEMM (probs_matmul). No tile statistics, no rescaling, and a
backward pass reads P as is.

Both pairs run over a chunk of the batch·heads at a time (plan.Problem.head_chunks):
P and the tile statistics are the chunk's, and out and lse, the whole problem's, are
updated in place, so the score-sized scratch stays within a fixed budget.

Masking (masking.py): launch 1 visits the score tiles of masking.key_blocks and
writes every entry there (0 where hidden), which covers each row's row_reach; the
readers of P and of the tile statistics take only entries within a row's reach (a
select: the others may never have been written).
"""

import triton
import triton.language as tl

from jt_attention.kernels import masking
from jt_attention.kernels.tiles import (drained, grid_coords, load_tile, row_step, rows_dot_cols,
                                        store_tile, tile_ptrs)


@triton.jit
def _score_tiles_kernel(
    q_ptr, k_ptr, bias_ptr, mask_ptr, q_segments_ptr, k_segments_ptr, key_spans_ptr,
    dropout_seeds_ptr, head_start, probs_ptr, tile_max_ptr, tile_sum_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr,
    SPANS: tl.constexpr,
    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_N: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """programs (masking.tile_slots, cdiv(SEQ_Q, BLOCK_M), chunk heads), for the chunk of
    batch·heads from head_start on (plan.Problem.head_chunks).

    probs: [chunk heads, SEQ_Q, NUM_TILES * TILE_N], input dtype; with dropout, the kept
    ones, scaled (the tile sums take them all).
    tile_max, tile_sum: [chunk heads, NUM_TILES, SEQ_Q] fp32, base 2.
    """
    NUM_TILES: tl.constexpr = (SEQ_K + TILE_N - 1) // TILE_N
    # Tiles no row of the block sees are never written, nor read by the second launch.
    chunk_head, batch, head, spans, start_m, tile_n, seen, partial = masking.program_tile(
        key_spans_ptr, head_start, SEQ_Q, SEQ_K, NUM_HEADS, BLOCK_M, TILE_N, IS_CAUSAL,
        WINDOW_LEFT, WINDOW_RIGHT, SPANS, WIDE_INDEXING)
    start_n = tile_n * TILE_N
    if seen:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, TILE_N)
        offs_k = tl.arange(0, BLOCK_K)
        q_ptrs = tile_ptrs(q_ptr + batch * STRIDE_QB + head * STRIDE_QH, offs_m, offs_k,
                           STRIDE_QS, SEQ_Q)
        k_ptrs = tile_ptrs(k_ptr + batch * STRIDE_KB + (head // KV_GROUP) * STRIDE_KH, offs_n,
                           offs_k, STRIDE_KS, SEQ_K)
        RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
        RAGGED_KEYS: tl.constexpr = SEQ_K % TILE_N != 0
        RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_K != 0
        qk = tl.zeros([BLOCK_M, TILE_N], tl.float32)
        for start_k in range(0, HEAD_DIM, BLOCK_K):
            q = load_tile(q_ptrs + start_k, offs_m, start_k + offs_k, SEQ_Q, HEAD_DIM,
                          RAGGED_ROWS, RAGGED_DIM)
            k = load_tile(k_ptrs + start_k, offs_n, start_k + offs_k, SEQ_K, HEAD_DIM,
                          RAGGED_KEYS, RAGGED_DIM)
            qk = tl.dot(q, tl.trans(k), qk, input_precision=DOT_PRECISION)
        scores = _masked_scores(qk, offs_m, offs_n, batch, head, bias_ptr, mask_ptr,
                                q_segments_ptr, k_segments_ptr, spans, partial, SCALE,
                                IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, SOFT_CAP, BIAS_LAYOUT,
                                MASK_LAYOUT, SEGMENTS, SPANS, NUM_HEADS, SEQ_Q, SEQ_K)
        tile_max = tl.max(scores, 1)
        # A row can be wholly masked in this tile; keep its stats NaN-free.
        probs = tl.math.exp2(scores - tl.where(tile_max == float("-inf"), 0.0, tile_max)[:, None])
        stats_offset = (chunk_head * NUM_TILES + tile_n) * SEQ_Q + offs_m
        tl.store(tile_max_ptr + stats_offset, tile_max, mask=offs_m < SEQ_Q)
        tl.store(tile_sum_ptr + stats_offset, tl.sum(probs, 1), mask=offs_m < SEQ_Q)
        if DROPOUT_THRESHOLD:
            probs = probs * masking.dropout_multiplier(
                dropout_seeds_ptr, head_start + chunk_head, start_m, BLOCK_M, start_n, TILE_N,
                False, SEQ_Q, SEQ_K, DROPOUT_THRESHOLD, DROPOUT_SCALE)
        PADDED_K: tl.constexpr = NUM_TILES * TILE_N
        probs_ptrs = tile_ptrs(probs_ptr + chunk_head * SEQ_Q * PADDED_K, offs_m,
                               offs_n, PADDED_K, SEQ_Q)
        store_tile(probs_ptrs, probs.to(probs_ptr.dtype.element_ty), offs_m, offs_n,
                   SEQ_Q, PADDED_K, RAGGED_ROWS, False)


@triton.jit
def _masked_scores(qk, rows, cols, batch, head, bias_ptr, mask_ptr, q_segments_ptr,
                   k_segments_ptr, spans, masked,
                   SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                   WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
                   BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr,
                   SEGMENTS: tl.constexpr, SPANS: tl.constexpr, NUM_HEADS: tl.constexpr,
                   SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr):
    """Base-2 scores of a [rows, cols] tile of dot products, -inf where hidden; `masked`
    (a scalar, possibly known at compile time) says whether the predicate must run."""
    bias_base = masking.dense_base(bias_ptr, batch, head, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    # exact tanh: the matmuls at these head dims hide its special-function work
    scores, _ = masking.logits(qk, bias_base, rows[:, None], cols[None, :], SCALE, SOFT_CAP,
                               BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K, False)
    if masked:
        keep = masking.tile_visible(
            rows, cols, spans, q_segments_ptr, k_segments_ptr, mask_ptr, batch, head,
            IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, SPANS, NUM_HEADS, SEQ_Q, SEQ_K, SEGMENTS,
            MASK_LAYOUT)
        scores = tl.where(keep, scores, float("-inf"))
    return scores


@triton.jit
def _tile_stats(tile_max_ptrs, tile_sum_ptrs, tile, offs_m, lo, hi, SEQ_Q: tl.constexpr,
                TILE_N: tl.constexpr):
    """Row max and row sum of one score tile; (-inf, 0) for rows that do not reach it
    (the first launch may not have written their stats)."""
    mask = (offs_m < SEQ_Q) & (lo < (tile + 1) * TILE_N) & (tile * TILE_N < hi)
    tile_max = tl.load(tile_max_ptrs + tile * SEQ_Q, mask=mask, other=float("-inf"))
    tile_sum = tl.load(tile_sum_ptrs + tile * SEQ_Q, mask=mask, other=0.0)
    return tile_max, tile_sum


@triton.jit
def _accumulate_values(acc, probs_ptrs, v_ptrs, tile_max_ptrs, tile_sum_ptrs, row_max, start_n,
                       offs_m, offs_n, offs_d, lo, hi,
                       SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                       STRIDE_VS: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr,
                       RAGGED_ROWS: tl.constexpr, RAGGED_KEYS: tl.constexpr,
                       RAGGED_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += (exp(m_t - m) * P[:, start_n:+BLOCK_N]) . V[start_n:+BLOCK_N, d-chunk].

    MASKED: a block some row does not wholly reach. The entries past a row's reach
    may lie in tiles the first launch skipped (unwritten memory), so they are dropped
    with a select after an ordinary load. (A 2-D masked load here, feeding the dot,
    raced on the H100 with Triton 3.6 at BLOCK_D=256: WORKSPACE_NOTES.md, v1.)
    RAGGED_KEYS: the block may cross SEQ_K.
    P is scaled in registers before the dot, whose result is drained (tiles.drained).
    """
    cols = start_n + offs_n
    tile_max, _ = _tile_stats(tile_max_ptrs, tile_sum_ptrs, start_n // TILE_N, offs_m, lo, hi,
                              SEQ_Q, TILE_N)
    probs = load_tile(probs_ptrs + start_n, offs_m, cols, SEQ_Q, SEQ_K, RAGGED_ROWS, False)
    weight = tl.math.exp2(tile_max - row_max)[:, None]
    if probs.dtype.is_fp16():  # packed fp16 multiplies: 2-9% faster than via fp32 on the H100
        probs = probs * weight.to(tl.float16)
    else:  # bf16 keeps one rounding (8-bit mantissa); the interpreter also has no bf16 math
        probs = probs.to(tl.float32) * weight
    if MASKED:
        probs = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), probs,
                         0.0)
    v = load_tile(v_ptrs + row_step(start_n, STRIDE_VS, SEQ_K), cols, offs_d, SEQ_K, HEAD_DIM,
                  RAGGED_KEYS, RAGGED_DIM)
    return drained(tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION))


@triton.jit
def _write_kept_probs(probs_ptrs, kept_ptrs, tile_max_ptrs, tile_sum_ptrs, row_max, inv_row_sum,
                      offs_m, offs_n, lo, hi, start, stop, SEQ_Q: tl.constexpr,
                      SEQ_K: tl.constexpr, TILE_N: tl.constexpr, RAGGED_ROWS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Softmax P = exp(m_t - m) * P_t / l of the row block over keys [start, stop), rounded
    once to the input dtype; zero past each row's reach."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        tile_max, _ = _tile_stats(tile_max_ptrs, tile_sum_ptrs, start_n // TILE_N, offs_m, lo,
                                  hi, SEQ_Q, TILE_N)
        probs = load_tile(probs_ptrs + start_n, offs_m, cols, SEQ_Q, SEQ_K, RAGGED_ROWS, False)
        kept = probs.to(tl.float32) * (tl.math.exp2(tile_max - row_max) * inv_row_sum)[:, None]
        # the entries past the reach may be unwritten memory: a select
        kept = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), kept,
                        0.0)
        store_tile(kept_ptrs + start_n, kept.to(probs.dtype), offs_m, cols, SEQ_Q, SEQ_K,
                   RAGGED_ROWS, SEQ_K % BLOCK_N != 0)


@triton.jit
def _weighted_values_kernel(
    probs_ptr, tile_max_ptr, tile_sum_ptr, v_ptr, key_spans_ptr, head_start, out_earlier_ptr,
    lse_earlier_ptr, out_ptr, lse_ptr,
    IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_N: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """programs (cdiv(HEAD_DIM, BLOCK_D), cdiv(SEQ_Q, BLOCK_M), chunk heads), for the
    chunk of batch·heads from head_start on (plan.Problem.head_chunks): the tile
    buffers are the chunk's, out and lse the whole problem's. out_earlier and
    lse_earlier are never read: they hold what earlier chunks wrote to out and lse,
    which this launch updates in place (plan.Launch.in_place).

    BLOCK_N divides TILE_N and BLOCK_M is a multiple of BLOCK_N.
    """
    _weighted_values(probs_ptr, tile_max_ptr, tile_sum_ptr, v_ptr, key_spans_ptr, head_start,
                     out_ptr, lse_ptr, out_ptr,
                     IS_CAUSAL, SEQ_Q, SEQ_K, NUM_HEADS, KV_GROUP, HEAD_DIM, STRIDE_VB,
                     STRIDE_VS, STRIDE_VH, STRIDE_OB, STRIDE_OS, STRIDE_OH, WINDOW_LEFT,
                     WINDOW_RIGHT, SPANS, DOT_PRECISION, TILE_N, 0, False, WIDE_INDEXING,
                     BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _weighted_values_keeping_probs_kernel(
    probs_ptr, tile_max_ptr, tile_sum_ptr, v_ptr, key_spans_ptr, out_ptr, lse_ptr,
    kept_probs_ptr,
    IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_N: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """`_weighted_values_kernel` that also writes the softmax P for the backward.

    programs (cdiv(HEAD_DIM, BLOCK_D) + 1, cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS):
    the last program of each row block writes P instead of output columns (a
    separate program: storing P from the GEMM programs' loop cost 0.2-0.5 ms of 1.4
    on the seed workload, H100, or twice the shared memory).
    kept_probs: [batch * NUM_HEADS, SEQ_Q, PROBS_STRIDE] in the input dtype, every
    column the row block's key blocks cover (zero past each row's reach).
    Problems that keep P run as one chunk (plan.Problem.head_chunks)."""
    _weighted_values(probs_ptr, tile_max_ptr, tile_sum_ptr, v_ptr, key_spans_ptr, 0, out_ptr,
                     lse_ptr, kept_probs_ptr, IS_CAUSAL, SEQ_Q, SEQ_K, NUM_HEADS, KV_GROUP,
                     HEAD_DIM, STRIDE_VB, STRIDE_VS, STRIDE_VH, STRIDE_OB, STRIDE_OS, STRIDE_OH,
                     WINDOW_LEFT, WINDOW_RIGHT, SPANS, DOT_PRECISION, TILE_N, PROBS_STRIDE,
                     True, WIDE_INDEXING, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _weighted_values(
    probs_ptr, tile_max_ptr, tile_sum_ptr, v_ptr, key_spans_ptr, head_start, out_ptr, lse_ptr,
    kept_probs_ptr,
    IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_N: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    KEEP_PROBS: tl.constexpr, WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The body of both values kernels (two entry points, as their buffers differ);
    KEEP_PROBS adds the program that writes P."""
    NUM_TILES: tl.constexpr = (SEQ_K + TILE_N - 1) // TILE_N
    PADDED_K: tl.constexpr = NUM_TILES * TILE_N
    D_BLOCKS: tl.constexpr = (HEAD_DIM + BLOCK_D - 1) // BLOCK_D
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    PROGRAMS_PER_ROW_BLOCK: tl.constexpr = D_BLOCKS + 1 if KEEP_PROBS else D_BLOCKS
    d_block, row_block, chunk_head = grid_coords(PROGRAMS_PER_ROW_BLOCK, ROW_BLOCKS,
                                                 WIDE_INDEXING)
    start_d = d_block * BLOCK_D
    start_m = row_block * BLOCK_M
    batch_head = head_start + chunk_head
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = start_d + tl.arange(0, BLOCK_D)
    spans = masking.spans_base(key_spans_ptr, batch, head, SPANS, NUM_HEADS, SEQ_Q)
    lo, hi = masking.row_reach(offs_m, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                  WINDOW_RIGHT, SPANS)

    # Merge the per-tile statistics: m = max_t m_t, l = sum_t l_t * exp(m_t - m).
    tile_max_ptrs = tile_max_ptr + chunk_head * NUM_TILES * SEQ_Q + offs_m
    tile_sum_ptrs = tile_sum_ptr + chunk_head * NUM_TILES * SEQ_Q + offs_m
    tiles = masking.key_blocks(start_m, spans, BLOCK_M, TILE_N, SEQ_Q, SEQ_K, IS_CAUSAL,
                               WINDOW_LEFT, WINDOW_RIGHT, SPANS)
    first_tile, tiles_end = tiles[0], tiles[3]
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for tile in range(first_tile // TILE_N, tiles_end // TILE_N):
        tile_max, _ = _tile_stats(tile_max_ptrs, tile_sum_ptrs, tile, offs_m, lo, hi, SEQ_Q,
                                  TILE_N)
        row_max = tl.maximum(row_max, tile_max)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # rows that see no key
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for tile in range(first_tile // TILE_N, tiles_end // TILE_N):
        tile_max, tile_sum = _tile_stats(tile_max_ptrs, tile_sum_ptrs, tile, offs_m, lo, hi,
                                         SEQ_Q, TILE_N)
        row_sum += tile_sum * tl.math.exp2(tile_max - row_max)
    seen = row_sum > 0  # else 0 out and lse -inf
    inv_row_sum = 1.0 / tl.where(seen, row_sum, 1.0)

    probs_ptrs = tile_ptrs(probs_ptr + chunk_head * SEQ_Q * PADDED_K, offs_m, offs_n,
                           PADDED_K, SEQ_Q)
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    start, full_start, full_end, stop = masking.key_blocks(
        start_m, spans, BLOCK_M, BLOCK_N, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
        SPANS)
    writes_probs = False
    if KEEP_PROBS:
        writes_probs = d_block == D_BLOCKS
    if writes_probs:
        kept_ptrs = tile_ptrs(kept_probs_ptr + chunk_head * SEQ_Q * PROBS_STRIDE, offs_m, offs_n,
                              PROBS_STRIDE, SEQ_Q)
        _write_kept_probs(probs_ptrs, kept_ptrs, tile_max_ptrs, tile_sum_ptrs, row_max,
                          inv_row_sum, offs_m, offs_n, lo, hi, start, stop, SEQ_Q, SEQ_K, TILE_N,
                          RAGGED_ROWS, BLOCK_N)
    else:
        v_ptrs = tile_ptrs(v_ptr + batch * STRIDE_VB + (head // KV_GROUP) * STRIDE_VH, offs_n,
                           offs_d, STRIDE_VS, SEQ_K)
        RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_D != 0
        RAGGED_KEYS: tl.constexpr = SEQ_K % BLOCK_N != 0
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(start, full_start, BLOCK_N):
            acc = _accumulate_values(acc, probs_ptrs, v_ptrs, tile_max_ptrs, tile_sum_ptrs,
                                     row_max, start_n, offs_m, offs_n, offs_d, lo, hi, SEQ_Q,
                                     SEQ_K, HEAD_DIM, STRIDE_VS, TILE_N, True, RAGGED_ROWS,
                                     RAGGED_KEYS, RAGGED_DIM, DOT_PRECISION)
        for start_n in range(full_start, full_end, BLOCK_N):
            acc = _accumulate_values(acc, probs_ptrs, v_ptrs, tile_max_ptrs, tile_sum_ptrs,
                                     row_max, start_n, offs_m, offs_n, offs_d, lo, hi, SEQ_Q,
                                     SEQ_K, HEAD_DIM, STRIDE_VS, TILE_N, False, RAGGED_ROWS,
                                     False, RAGGED_DIM, DOT_PRECISION)
        for start_n in range(full_end, stop, BLOCK_N):
            acc = _accumulate_values(acc, probs_ptrs, v_ptrs, tile_max_ptrs, tile_sum_ptrs,
                                     row_max, start_n, offs_m, offs_n, offs_d, lo, hi, SEQ_Q,
                                     SEQ_K, HEAD_DIM, STRIDE_VS, TILE_N, True, RAGGED_ROWS,
                                     RAGGED_KEYS, RAGGED_DIM, DOT_PRECISION)

        acc = acc * inv_row_sum[:, None]
        out_ptrs = tile_ptrs(out_ptr + batch * STRIDE_OB + head * STRIDE_OH, offs_m, offs_d,
                             STRIDE_OS, SEQ_Q)
        store_tile(out_ptrs, acc.to(out_ptr.dtype.element_ty), offs_m, offs_d, SEQ_Q, HEAD_DIM,
                   RAGGED_ROWS, RAGGED_DIM)
        if d_block == 0:
            lse = tl.where(seen, (row_max + tl.math.log2(row_sum)) * masking.LN2, float("-inf"))
            tl.store(lse_ptr + batch_head * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)


@triton.jit
def _row_softmax_kernel(
    q_ptr, k_ptr, bias_ptr, mask_ptr, q_segments_ptr, k_segments_ptr, key_spans_ptr,
    dropout_seeds_ptr, head_start, lse_earlier_ptr, probs_ptr, lse_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr,
    SPANS: tl.constexpr,
    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    ROW_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """softmax(scale * Q.K^T) for BLOCK_M query rows and all their keys at once
    (ROW_KEYS: SEQ_K rounded up to a power of two, at most tuning.WHOLE_ROW_MAX_KEYS),
    written normalized in the input dtype, zeros where hidden; and the row
    logsumexp. A 64 x 512 fp32 tile takes the registers of the tiled launch's
    128 x 256 one. With dropout P is written dropped and scaled, for O = P.V (the
    backward then keeps no P: plan.Problem.keeps_probs).

    programs (cdiv(SEQ_Q, BLOCK_M), 1, chunk heads), for the chunk of batch·heads from
    head_start on (plan.Problem.head_chunks; lse_earlier as in _weighted_values_kernel).
    probs: [chunk heads, SEQ_Q, PROBS_STRIDE]; lse: [batch * NUM_HEADS, SEQ_Q] fp32."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    row_block, _, chunk_head = grid_coords(ROW_BLOCKS, 1, WIDE_INDEXING)
    batch_head = head_start + chunk_head
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
    qk = rows_dot_cols(q_ptr + batch * STRIDE_QB + head * STRIDE_QH,
                       k_ptr + batch * STRIDE_KB + (head // KV_GROUP) * STRIDE_KH,
                       tl.minimum(rows, SEQ_Q - 1) if RAGGED_ROWS else rows,
                       masking.keys_to_read(cols, start, stop, SEQ_K),
                       SEQ_Q, SEQ_K, HEAD_DIM, STRIDE_QS, STRIDE_KS, DOT_PRECISION, BLOCK_K)
    MASKED: tl.constexpr = (RAGGED_KEYS or IS_CAUSAL or WINDOW_LEFT >= 0 or WINDOW_RIGHT >= 0
                            or SPANS or SEGMENTS or MASK_LAYOUT)
    scores = _masked_scores(qk, rows, cols, batch, head, bias_ptr, mask_ptr, q_segments_ptr,
                            k_segments_ptr, spans, MASKED, SCALE, IS_CAUSAL, WINDOW_LEFT,
                            WINDOW_RIGHT, SOFT_CAP, BIAS_LAYOUT, MASK_LAYOUT, SEGMENTS, SPANS,
                            NUM_HEADS, SEQ_Q, SEQ_K)
    row_max = tl.max(scores, 1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # rows that see no key
    probs = tl.math.exp2(scores - row_max[:, None])
    row_sum = tl.sum(probs, 1)
    seen = row_sum > 0
    probs = probs * (1.0 / tl.where(seen, row_sum, 1.0))[:, None]
    if DROPOUT_THRESHOLD:
        probs = probs * masking.dropout_multiplier(
            dropout_seeds_ptr, batch_head, row_block * BLOCK_M, BLOCK_M, 0, ROW_KEYS, False,
            SEQ_Q, SEQ_K, DROPOUT_THRESHOLD, DROPOUT_SCALE)
    probs_ptrs = tile_ptrs(probs_ptr + chunk_head * SEQ_Q * PROBS_STRIDE, rows, cols,
                           PROBS_STRIDE, SEQ_Q)
    store_tile(probs_ptrs, probs.to(probs_ptr.dtype.element_ty), rows, cols, SEQ_Q, SEQ_K,
               RAGGED_ROWS, RAGGED_KEYS)
    lse = tl.where(seen, (row_max + tl.math.log2(row_sum)) * masking.LN2, float("-inf"))
    tl.store(lse_ptr + batch_head * SEQ_Q + rows, lse, mask=rows < SEQ_Q)
