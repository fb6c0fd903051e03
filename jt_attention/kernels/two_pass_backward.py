"""Attention backward for head dims above 256: the score gradients once, then three GEMMs.

A flash backward keeps dK and dV (2 x BLOCK_N x D fp32) in registers, which does not
fit for D = 1024, and recomputing the scores per D-chunk would multiply their FLOPs
(the forward's reasoning, two_pass_forward.py). So:

1. The score gradients: dP = dO.V^T as a GEMM over the head dim, then
   dS = P * (dP - delta), written once in the input dtype. Where the forward kept the
   softmax P, as it is no bigger than the output (plan.Problem.keeps_probs), it is
   read back: for rows of up to tuning.WHOLE_ROW_MAX_KEYS keys one program takes BLOCK_M
   whole rows and sums delta = rowsum(P * dP) itself (`_dscores_whole_rows_kernel`);
   longer rows are tiled (`_dscores_from_probs_kernel`) and read delta =
   rowsum(dO * O) from backward_preprocess. Else P is recomputed from S = Q.K^T in
   the same loop and written too (`_score_grads_kernel`). Tiles wholly above the
   causal diagonal are skipped by the tiled kernels (never written, never read).
   Summing rowsum(dO * O) inside the tiled kernels instead, from the dO chunks
   already loaded, was measured slower: the O loads do not pipeline
   (WORKSPACE_NOTES.md, backward v2).
2. `_probs_matmul_kernel`, three times: dV = P^T.dO, dK = scale * dS^T.Q and
   dQ = scale * dS.K, each tiled over (rows, D-chunks) and reducing over the
   sequence. dK and dV sum the query heads of a group in the reduction loop.

Costs 2 x Sq x Sk elements of HBM per batch·head, like the forward's P.
"""

import triton
import triton.language as tl

from jt_attention.kernels.backward_preprocess import load_row_stats, load_rows
from jt_attention.kernels.tiles import grid_coords, load_tile, row_step, store_tile, tile_ptrs


@triton.jit
def _visible(probs, rows, cols, SEQ_K: tl.constexpr, IS_CAUSAL: tl.constexpr,
             RAGGED_KEYS: tl.constexpr):
    """probs zeroed past SEQ_K and, if causal, above the diagonal (a select: the entries
    dropped may be NaN, from memory the forward never wrote)."""
    if RAGGED_KEYS or IS_CAUSAL:
        visible = cols[None, :] < SEQ_K
        if IS_CAUSAL:  # top-left aligned: key j reaches query i iff j <= i
            visible = visible & (cols[None, :] <= rows[:, None])
        probs = tl.where(visible, probs, 0.0)
    return probs


@triton.jit
def _store_scores_tile(ptr, offsets, values, rows, cols, SEQ_Q: tl.constexpr,
                       SEQ_K: tl.constexpr, RAGGED_ROWS: tl.constexpr,
                       RAGGED_KEYS: tl.constexpr):
    store_tile(ptr + offsets, values.to(ptr.dtype.element_ty), rows, cols, SEQ_Q, SEQ_K,
               RAGGED_ROWS, RAGGED_KEYS)


@triton.jit
def _score_grads_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, probs_ptr, dscores_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """programs (cdiv(SEQ_K, BLOCK_N), cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS).

    probs, dscores: [batch * NUM_HEADS, SEQ_Q, PROBS_STRIDE] in the input dtype."""
    KEY_BLOCKS: tl.constexpr = (SEQ_K + BLOCK_N - 1) // BLOCK_N
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    key_block, row_block, batch_head = grid_coords(KEY_BLOCKS, ROW_BLOCKS, WIDE_INDEXING)
    start_m = row_block * BLOCK_M
    start_n = key_block * BLOCK_N
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    kv_head = head // KV_GROUP

    visible_end = start_m + BLOCK_M if IS_CAUSAL else SEQ_K
    if start_n < visible_end:
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
        scores = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dprobs = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_k in range(0, HEAD_DIM, BLOCK_K):
            dims = start_k + offs_k
            q = load_tile(q_ptrs + start_k, rows, dims, SEQ_Q, HEAD_DIM, RAGGED_ROWS, RAGGED_DIM)
            k = load_tile(k_ptrs + start_k, cols, dims, SEQ_K, HEAD_DIM, RAGGED_KEYS, RAGGED_DIM)
            scores = tl.dot(q, tl.trans(k), scores, input_precision=DOT_PRECISION)
            dout = load_tile(dout_ptrs + start_k, rows, dims, SEQ_Q, HEAD_DIM, RAGGED_ROWS,
                             RAGGED_DIM)
            v = load_tile(v_ptrs + start_k, cols, dims, SEQ_K, HEAD_DIM, RAGGED_KEYS, RAGGED_DIM)
            dprobs = tl.dot(dout, tl.trans(v), dprobs, input_precision=DOT_PRECISION)

        lse, delta = load_row_stats(lse_ptr + batch_head * SEQ_Q, delta_ptr + batch_head * SEQ_Q,
                                    rows, SEQ_Q, RAGGED_ROWS)
        probs = tl.math.exp2(scores * (SCALE * 1.4426950408889634) - lse[:, None])
        probs = _visible(probs, rows, cols, SEQ_K, IS_CAUSAL, RAGGED_KEYS)
        offsets = tile_ptrs(batch_head * SEQ_Q * PROBS_STRIDE, rows, cols, PROBS_STRIDE, SEQ_Q)
        _store_scores_tile(probs_ptr, offsets, probs, rows, cols, SEQ_Q, SEQ_K, RAGGED_ROWS,
                           RAGGED_KEYS)
        _store_scores_tile(dscores_ptr, offsets, probs * (dprobs - delta[:, None]), rows, cols,
                           SEQ_Q, SEQ_K, RAGGED_ROWS, RAGGED_KEYS)


@triton.jit
def _dprobs_tiles(dout_base, v_base, rows, cols, SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr,
                  HEAD_DIM: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_VS: tl.constexpr,
                  RAGGED_ROWS: tl.constexpr, RAGGED_KEYS: tl.constexpr, TILES: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """dP = dO.V^T, fp32, on [rows, cols] and, if TILES == 2, also on the next
    len(cols) keys (a second tile, returned apart); the head dim is streamed in
    BLOCK_K chunks, each dO chunk loaded once for both tiles.

    Rows past SEQ_Q and keys past SEQ_K read the last valid row or key (clamped
    pointers, as in _probs_matmul_kernel): their dP entries are finite and meet only
    zero probabilities or masked stores. Only the head dim, the reduced axis, is masked."""
    offs_k = tl.arange(0, BLOCK_K)
    read_rows = tl.minimum(rows, SEQ_Q - 1) if RAGGED_ROWS else rows
    dout_ptrs = tile_ptrs(dout_base, read_rows, offs_k, STRIDE_DOS, SEQ_Q)
    v_ptrs = tile_ptrs(v_base, tl.minimum(cols, SEQ_K - 1) if RAGGED_KEYS else cols, offs_k,
                       STRIDE_VS, SEQ_K)
    next_cols = cols + cols.shape[0]
    next_v_ptrs = tile_ptrs(v_base, tl.minimum(next_cols, SEQ_K - 1) if RAGGED_KEYS
                            else next_cols, offs_k, STRIDE_VS, SEQ_K)
    RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_K != 0
    dprobs = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    next_dprobs = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    for start_k in range(0, HEAD_DIM, BLOCK_K):
        dims = start_k + offs_k
        dout = load_tile(dout_ptrs + start_k, rows, dims, SEQ_Q, HEAD_DIM, False, RAGGED_DIM)
        v = load_tile(v_ptrs + start_k, cols, dims, SEQ_K, HEAD_DIM, False, RAGGED_DIM)
        dprobs = tl.dot(dout, tl.trans(v), dprobs, input_precision=DOT_PRECISION)
        if TILES == 2:
            v = load_tile(next_v_ptrs + start_k, next_cols, dims, SEQ_K, HEAD_DIM, False,
                          RAGGED_DIM)
            next_dprobs = tl.dot(dout, tl.trans(v), next_dprobs, input_precision=DOT_PRECISION)
    return dprobs, next_dprobs


@triton.jit
def _load_kept_probs(ptrs, rows, cols, SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, RAGGED_ROWS: tl.constexpr,
                     RAGGED_KEYS: tl.constexpr):
    """The forward's softmax on [rows, cols] in fp32; zeros past the edges and above the
    causal diagonal."""
    probs = load_tile(ptrs, rows, cols, SEQ_Q, SEQ_K, RAGGED_ROWS, RAGGED_KEYS).to(tl.float32)
    return _visible(probs, rows, cols, SEQ_K, IS_CAUSAL, False)


@triton.jit
def _dscores_from_probs_kernel(
    v_ptr, dout_ptr, probs_ptr, delta_ptr, dscores_ptr,
    IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dS = P * (dO.V^T - delta) from the softmax P the forward kept
    (two_pass_forward._weighted_values_keeping_probs_kernel), for rows longer than
    tuning.WHOLE_ROW_MAX_KEYS (else _dscores_whole_rows_kernel).

    programs (cdiv(SEQ_K, BLOCK_N), cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS).
    probs, dscores: [batch * NUM_HEADS, SEQ_Q, PROBS_STRIDE] in the input dtype."""
    KEY_BLOCKS: tl.constexpr = (SEQ_K + BLOCK_N - 1) // BLOCK_N
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    key_block, row_block, batch_head = grid_coords(KEY_BLOCKS, ROW_BLOCKS, WIDE_INDEXING)
    start_m = row_block * BLOCK_M
    start_n = key_block * BLOCK_N
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS

    visible_end = start_m + BLOCK_M if IS_CAUSAL else SEQ_K
    if start_n < visible_end:
        rows = start_m + tl.arange(0, BLOCK_M)
        cols = start_n + tl.arange(0, BLOCK_N)
        RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
        RAGGED_KEYS: tl.constexpr = SEQ_K % BLOCK_N != 0
        dprobs, _ = _dprobs_tiles(dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH,
                                  v_ptr + batch * STRIDE_VB + (head // KV_GROUP) * STRIDE_VH,
                                  rows, cols, SEQ_Q, SEQ_K, HEAD_DIM, STRIDE_DOS, STRIDE_VS,
                                  RAGGED_ROWS, RAGGED_KEYS, 1, DOT_PRECISION, BLOCK_K)
        delta = load_rows(delta_ptr + batch_head * SEQ_Q, rows, SEQ_Q, RAGGED_ROWS, 0.0)
        offsets = tile_ptrs(batch_head * SEQ_Q * PROBS_STRIDE, rows, cols, PROBS_STRIDE, SEQ_Q)
        probs = _load_kept_probs(probs_ptr + offsets, rows, cols, SEQ_Q, SEQ_K, IS_CAUSAL,
                                 RAGGED_ROWS, RAGGED_KEYS)
        _store_scores_tile(dscores_ptr, offsets, probs * (dprobs - delta[:, None]), rows, cols,
                           SEQ_Q, SEQ_K, RAGGED_ROWS, RAGGED_KEYS)


@triton.jit
def _dscores_half_row(dscores_ptr, probs_ptr, offsets, dprobs, delta, rows, cols,
                      SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      RAGGED_ROWS: tl.constexpr, RAGGED_KEYS: tl.constexpr):
    probs = _load_kept_probs(probs_ptr + offsets, rows, cols, SEQ_Q, SEQ_K, IS_CAUSAL, False,
                             RAGGED_KEYS)
    _store_scores_tile(dscores_ptr, offsets, probs * (dprobs - delta[:, None]), rows, cols,
                       SEQ_Q, SEQ_K, RAGGED_ROWS, RAGGED_KEYS)


@triton.jit
def _dscores_whole_rows_kernel(
    v_ptr, dout_ptr, probs_ptr, dlse_ptr, dscores_ptr,
    IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    ROW_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """_dscores_from_probs_kernel for BLOCK_M query rows and all their keys at once
    (ROW_KEYS: SEQ_K rounded up to a power of two, at most tuning.WHOLE_ROW_MAX_KEYS),
    so that delta = rowsum(P * dP) - dlse comes from the tile itself: no launch reads
    O and dO for it (-0.53 ms of 2.03 on the seed workload, H100: WORKSPACE_NOTES.md).

    The row is held as two tiles of ROW_KEYS / 2 keys: the masks and the causal select
    of the epilogue then work on half-rows (one 64 x 512 tile spilled up to 824 bytes
    on ragged causal shapes; ptxas for sm_90a, Triton 3.6).

    programs (cdiv(SEQ_Q, BLOCK_M), 1, batch * NUM_HEADS).
    probs, dscores: [batch * NUM_HEADS, SEQ_Q, PROBS_STRIDE] in the input dtype;
    dlse: [batch * NUM_HEADS, SEQ_Q] fp32."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    row_block, _, batch_head = grid_coords(ROW_BLOCKS, 1, WIDE_INDEXING)
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, ROW_KEYS // 2)
    next_cols = cols + ROW_KEYS // 2
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    RAGGED_KEYS: tl.constexpr = SEQ_K != ROW_KEYS
    dprobs, next_dprobs = _dprobs_tiles(
        dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH,
        v_ptr + batch * STRIDE_VB + (head // KV_GROUP) * STRIDE_VH, rows, cols, SEQ_Q, SEQ_K,
        HEAD_DIM, STRIDE_DOS, STRIDE_VS, RAGGED_ROWS, RAGGED_KEYS, 2, DOT_PRECISION, BLOCK_K)
    # Rows past SEQ_Q read the last row's P (their sums and dS are never stored), so
    # the loads of P mask the keys only (see _dprobs_tiles).
    read_rows = tl.minimum(rows, SEQ_Q - 1) if RAGGED_ROWS else rows
    offsets = tile_ptrs(batch_head * SEQ_Q * PROBS_STRIDE, read_rows, cols, PROBS_STRIDE, SEQ_Q)
    next_offsets = offsets + ROW_KEYS // 2
    probs = _load_kept_probs(probs_ptr + offsets, rows, cols, SEQ_Q, SEQ_K, IS_CAUSAL, False,
                             RAGGED_KEYS)
    delta = tl.sum(probs * dprobs, 1)
    probs = _load_kept_probs(probs_ptr + next_offsets, rows, next_cols, SEQ_Q, SEQ_K,
                             IS_CAUSAL, False, RAGGED_KEYS)
    delta += tl.sum(probs * next_dprobs, 1)
    delta -= load_rows(dlse_ptr + batch_head * SEQ_Q, rows, SEQ_Q, RAGGED_ROWS, 0.0)
    # P is read again (from L2) rather than kept: held in fp32 next to dP through the
    # row sums, it spilled (255 registers, 124 bytes at 64 x 512; ptxas for sm_90a,
    # Triton 3.6). The barrier keeps the compiler from merging the two reads.
    tl.debug_barrier()
    _dscores_half_row(dscores_ptr, probs_ptr, offsets, dprobs, delta, rows, cols, SEQ_Q,
                      SEQ_K, IS_CAUSAL, RAGGED_ROWS, RAGGED_KEYS)
    _dscores_half_row(dscores_ptr, probs_ptr, next_offsets, next_dprobs, delta, rows,
                      next_cols, SEQ_Q, SEQ_K, IS_CAUSAL, RAGGED_ROWS, RAGGED_KEYS)


@triton.jit
def _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d,
                       REDUCED: tl.constexpr, PROBS_STRIDE: tl.constexpr,
                       STRIDE_BS: tl.constexpr, TRANSPOSE_A: tl.constexpr,
                       DIAGONAL: tl.constexpr, RAGGED_REDUCED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """acc += A'[rows, start_c:+BLOCK_C] . B[start_c:+BLOCK_C, d-chunk].

    Only the reduced axis is masked (zeros past REDUCED); the pointers already clamp
    the output rows and columns (see _probs_matmul_kernel).
    DIAGONAL: the block crosses the causal diagonal. Its entries above it may lie in
    tiles the score-grads kernel skipped (unwritten memory), so they are dropped with
    a select after the load, never multiplied (see two_pass_forward, v1 notes)."""
    cols = start_c + offs_c
    if TRANSPOSE_A:  # A is [queries, keys] in memory; the rows here are keys
        a = tl.trans(load_tile(a_ptrs + row_step(start_c, PROBS_STRIDE, REDUCED), cols, rows,
                               REDUCED, 0, RAGGED_REDUCED, False))
        if DIAGONAL:
            a = tl.where(rows[:, None] <= cols[None, :], a, 0.0)
    else:  # the rows are queries, the reduction runs over keys
        a = load_tile(a_ptrs + start_c, rows, cols, 0, REDUCED, False, RAGGED_REDUCED)
        if DIAGONAL:
            a = tl.where(cols[None, :] <= rows[:, None], a, 0.0)
    b = load_tile(b_ptrs + row_step(start_c, STRIDE_BS, REDUCED), cols, offs_d, REDUCED, 0,
                  RAGGED_REDUCED, False)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _probs_matmul_kernel(
    a_ptr, b_ptr, out_ptr,
    OUT_SCALE: tl.constexpr, TRANSPOSE_A: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_BB: tl.constexpr, STRIDE_BS: tl.constexpr, STRIDE_BH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = OUT_SCALE * A' . B per batch·head, A' = A^T if TRANSPOSE_A else A.

    A (P or dS) is [batch * NUM_HEADS, SEQ_Q, PROBS_STRIDE].
    TRANSPOSE_A (dV = P^T.dO, dK = dS^T.Q): rows are keys, the reduction runs over
      the queries of every head of a KV group; B is query-shaped, out key-shaped;
      programs (cdiv(HEAD_DIM, BLOCK_D), cdiv(SEQ_K, BLOCK_R), batch * NUM_KV_HEADS).
    Otherwise (dQ = dS.K): rows are queries, the reduction runs over keys; B is K;
      programs (cdiv(HEAD_DIM, BLOCK_D), cdiv(SEQ_Q, BLOCK_R), batch * NUM_HEADS).
    """
    OUT_ROWS: tl.constexpr = SEQ_K if TRANSPOSE_A else SEQ_Q
    REDUCED: tl.constexpr = SEQ_Q if TRANSPOSE_A else SEQ_K
    HEADS_SUMMED: tl.constexpr = KV_GROUP if TRANSPOSE_A else 1
    B_HEAD_GROUP: tl.constexpr = 1 if TRANSPOSE_A else KV_GROUP  # B is dO or Q, else K
    OUT_HEADS: tl.constexpr = NUM_HEADS // HEADS_SUMMED
    D_BLOCKS: tl.constexpr = (HEAD_DIM + BLOCK_D - 1) // BLOCK_D
    ROW_BLOCKS: tl.constexpr = (OUT_ROWS + BLOCK_R - 1) // BLOCK_R
    d_block, row_block, batch_out_head = grid_coords(D_BLOCKS, ROW_BLOCKS, WIDE_INDEXING)
    start_d = d_block * BLOCK_D
    start_r = row_block * BLOCK_R
    batch = batch_out_head // OUT_HEADS
    out_head = batch_out_head % OUT_HEADS
    rows = start_r + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = start_d + tl.arange(0, BLOCK_D)
    RAGGED_ROWS: tl.constexpr = OUT_ROWS % BLOCK_R != 0
    RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_D != 0

    # Reduction blocks: those wholly visible run unmasked; the causal diagonal and
    # the ragged tail of the reduced sequence run with masks.
    first = 0
    unmasked_start = 0
    unmasked_end = (REDUCED // BLOCK_C) * BLOCK_C
    end = REDUCED
    if IS_CAUSAL:
        if TRANSPOSE_A:  # keys [start_r, +BLOCK_R) reach queries from start_r on
            first = (start_r // BLOCK_C) * BLOCK_C
            unmasked_start = min(end, (start_r + BLOCK_R + BLOCK_C - 1) // BLOCK_C * BLOCK_C)
        else:  # queries [start_r, +BLOCK_R) see keys up to start_r + BLOCK_R - 1
            unmasked_end = min(unmasked_end, (start_r // BLOCK_C) * BLOCK_C)
            end = min(end, start_r + BLOCK_R)
    unmasked_end = max(unmasked_end, unmasked_start)

    # Rows and columns past the output's edge read its last row or column instead of
    # being masked: they land in accumulator rows and columns that are never stored,
    # and every load keeps at most a one-axis mask (with two-axis masks, the 4-stage
    # D256 config computed wrong dK and dV on the H100, Triton 3.6: WORKSPACE_NOTES.md).
    read_rows = tl.minimum(rows, OUT_ROWS - 1) if RAGGED_ROWS else rows
    read_d = tl.minimum(offs_d, HEAD_DIM - 1) if RAGGED_DIM else offs_d
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for group_member in range(HEADS_SUMMED):
        a_head = out_head * HEADS_SUMMED + group_member
        b_head = a_head // B_HEAD_GROUP
        a_base = a_ptr + (batch * NUM_HEADS + a_head) * SEQ_Q * PROBS_STRIDE
        if TRANSPOSE_A:
            a_ptrs = tile_ptrs(a_base, offs_c, read_rows, PROBS_STRIDE, REDUCED)
        else:
            a_ptrs = tile_ptrs(a_base, read_rows, offs_c, PROBS_STRIDE, OUT_ROWS)
        b_ptrs = tile_ptrs(b_ptr + batch * STRIDE_BB + b_head * STRIDE_BH, offs_c, read_d,
                           STRIDE_BS, REDUCED)
        for start_c in range(first, unmasked_start, BLOCK_C):
            acc = _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d,
                                     REDUCED, PROBS_STRIDE, STRIDE_BS, TRANSPOSE_A,
                                     True, REDUCED % BLOCK_C != 0, DOT_PRECISION)
        for start_c in range(unmasked_start, unmasked_end, BLOCK_C):
            acc = _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d,
                                     REDUCED, PROBS_STRIDE, STRIDE_BS, TRANSPOSE_A,
                                     False, False, DOT_PRECISION)
        for start_c in range(unmasked_end, end, BLOCK_C):
            acc = _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d,
                                     REDUCED, PROBS_STRIDE, STRIDE_BS, TRANSPOSE_A,
                                     IS_CAUSAL and not TRANSPOSE_A, REDUCED % BLOCK_C != 0,
                                     DOT_PRECISION)

    acc *= OUT_SCALE
    out_ptrs = tile_ptrs(out_ptr + batch * STRIDE_OB + out_head * STRIDE_OH, rows,
                         offs_d, STRIDE_OS, OUT_ROWS)
    store_tile(out_ptrs, acc.to(out_ptr.dtype.element_ty), rows, offs_d, OUT_ROWS, HEAD_DIM,
               RAGGED_ROWS, RAGGED_DIM)
