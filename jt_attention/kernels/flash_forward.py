"""Fused flash-attention forward for head dims up to 256.

One program owns BLOCK_M query rows of one (batch, head) and streams the keys and
values in BLOCK_N blocks with an online softmax (FlashAttention-2), so the Sq x Sk
score matrix never reaches HBM. Shapes, strides and the scale are constexprs: the
compiler then knows every alignment, which jax-triton's plain integer arguments
would hide (GUIDE.md 3a).

Scores are kept in base 2 (`exp2`, logits pre-multiplied by log2(e)); the row
logsumexp is written back in natural-log units, matching `jax.nn`.
"""

import triton
import triton.language as tl

from jt_attention.kernels.tiles import (grid_coords, load_tile, longest_first_coords, row_step,
                                        store_tile, tile_ptrs)


@triton.jit
def _attend_block(acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                  SEQ_K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  STRIDE_KS: tl.constexpr, STRIDE_VS: tl.constexpr,
                  QK_SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  MASKED: tl.constexpr, RAGGED_KEYS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N).

    MASKED applies the causal and key-length masks to the scores; RAGGED_KEYS also
    bounds the K/V loads (the block crosses SEQ_K)."""
    cols = start_n + offs_n
    k = load_tile(k_ptrs + row_step(start_n, STRIDE_KS, SEQ_K), cols, offs_d, SEQ_K, HEAD_DIM,
                  RAGGED_KEYS, BLOCK_D != HEAD_DIM)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
    if MASKED:
        visible = cols[None, :] < SEQ_K
        if IS_CAUSAL:  # top-left aligned, as in jax.nn: key j is visible to query i iff j <= i
            visible = visible & (cols[None, :] <= offs_m[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    # A row that has seen no key yet (possible in a split-KV slice) keeps max -inf;
    # exponents are then taken from 0 so that they stay exp2(-inf) = 0, never NaN.
    exp_base = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.math.exp2(scores - exp_base[:, None])
    rescale = tl.math.exp2(row_max - exp_base)
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    v = load_tile(v_ptrs + row_step(start_n, STRIDE_VS, SEQ_K), cols, offs_d, SEQ_K, HEAD_DIM,
                  RAGGED_KEYS, BLOCK_D != HEAD_DIM)
    acc = acc * rescale[:, None]
    acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, row_sum, new_max


@triton.jit
def _flash_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """programs (cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS); lse is [batch, NUM_HEADS, SEQ_Q] fp32."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    if IS_CAUSAL:  # later row blocks see more keys
        row_block, batch_head = longest_first_coords(ROW_BLOCKS, WIDE_INDEXING)
    else:
        row_block, _, batch_head = grid_coords(ROW_BLOCKS, 1, WIDE_INDEXING)
    start_m = row_block * BLOCK_M
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    kv_head = head // KV_GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = tile_ptrs(q_ptr + batch * STRIDE_QB + head * STRIDE_QH, offs_m, offs_d,
                       STRIDE_QS, SEQ_Q)
    k_ptrs = tile_ptrs(k_ptr + batch * STRIDE_KB + kv_head * STRIDE_KH, offs_n, offs_d,
                       STRIDE_KS, SEQ_K)
    v_ptrs = tile_ptrs(v_ptr + batch * STRIDE_VB + kv_head * STRIDE_VH, offs_n, offs_d,
                       STRIDE_VS, SEQ_K)
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    q = load_tile(q_ptrs, offs_m, offs_d, SEQ_Q, HEAD_DIM, RAGGED_ROWS, BLOCK_D != HEAD_DIM)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634  # log2(e)

    # Blocks that need no mask run first; the causal diagonal and the ragged tail
    # of the keys run after, with masks. BLOCK_M is a multiple of BLOCK_N.
    unmasked_end = (SEQ_K // BLOCK_N) * BLOCK_N
    end = SEQ_K
    if IS_CAUSAL:
        unmasked_end = min(unmasked_end, start_m)
        end = min(SEQ_K, start_m + BLOCK_M)
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, row_sum, row_max = _attend_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
            SEQ_K, HEAD_DIM, BLOCK_D, STRIDE_KS, STRIDE_VS, QK_SCALE, IS_CAUSAL,
            False, False, DOT_PRECISION)
    for start_n in range(unmasked_end, end, BLOCK_N):
        acc, row_sum, row_max = _attend_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
            SEQ_K, HEAD_DIM, BLOCK_D, STRIDE_KS, STRIDE_VS, QK_SCALE, IS_CAUSAL,
            True, SEQ_K % BLOCK_N != 0, DOT_PRECISION)

    acc = acc / row_sum[:, None]
    out_ptrs = tile_ptrs(out_ptr + batch * STRIDE_OB + head * STRIDE_OH, offs_m, offs_d,
                         STRIDE_OS, SEQ_Q)
    store_tile(out_ptrs, acc.to(out_ptr.dtype.element_ty), offs_m, offs_d, SEQ_Q, HEAD_DIM,
               RAGGED_ROWS, BLOCK_D != HEAD_DIM)
    lse = (row_max + tl.math.log2(row_sum)) * 0.6931471805599453  # ln(2): back to natural log
    tl.store(lse_ptr + batch_head * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)
