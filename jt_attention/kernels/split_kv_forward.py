"""Split-KV forward for decoding shapes: few query rows, long key/value sequences.

With q_len 1 to 16 the flash kernel has one program per (batch, head), too few to
fill the GPU (32 programs for batch 1, 32 heads, on 132 SMs). Here the keys are cut
into SPLIT_LEN slices, one program per (slice, row block, batch·kv head), each running
the flash kernel's online softmax over its slice; a combine kernel then merges the
slices' partial outputs by their logsumexps (FlashDecoding). Partials are fp32.

The rows of a program are (query head of the KV group, query) pairs, so the query
heads that share a KV head read each K/V tile once, not once per head (GQA decoding).
"""

import triton
import triton.language as tl

from jt_attention.kernels import masking
from jt_attention.kernels.flash_forward import _attend_stretches
from jt_attention.kernels.tiles import grid_coords, load_tile, store_tile, tile_ptrs


@triton.jit
def _split_kv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, q_segments_ptr, k_segments_ptr, key_spans_ptr,
    dropout_seeds_ptr, partial_out_ptr, partial_lse_ptr,
    SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    STRIDE_QB: tl.constexpr, STRIDE_QS: tl.constexpr, STRIDE_QH: tl.constexpr,
    STRIDE_KB: tl.constexpr, STRIDE_KS: tl.constexpr, STRIDE_KH: tl.constexpr,
    STRIDE_VB: tl.constexpr, STRIDE_VS: tl.constexpr, STRIDE_VH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFT_CAP: tl.constexpr,
    BIAS_LAYOUT: tl.constexpr, MASK_LAYOUT: tl.constexpr, SEGMENTS: tl.constexpr,
    SPANS: tl.constexpr,
    DROPOUT_THRESHOLD: tl.constexpr, DROPOUT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SPLIT_LEN: tl.constexpr, NUM_SPLITS: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """programs (NUM_SPLITS, cdiv(KV_GROUP * SEQ_Q, BLOCK_M), batch * NUM_KV_HEADS).

    partial_out: [batch * NUM_HEADS, NUM_SPLITS, SEQ_Q, BLOCK_D] fp32, normalised per slice.
    partial_lse: [batch * NUM_HEADS, NUM_SPLITS, SEQ_Q] fp32, natural log; -inf for a
    row that sees no key of the slice. SPLIT_LEN is a multiple of BLOCK_N.
    """
    NUM_KV_HEADS: tl.constexpr = NUM_HEADS // KV_GROUP
    ROWS: tl.constexpr = KV_GROUP * SEQ_Q
    ROW_BLOCKS: tl.constexpr = (ROWS + BLOCK_M - 1) // BLOCK_M
    split, row_block, batch_kv_head = grid_coords(NUM_SPLITS, ROW_BLOCKS, WIDE_INDEXING)
    batch = batch_kv_head // NUM_KV_HEADS
    kv_head = batch_kv_head % NUM_KV_HEADS
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    group_member = rows // SEQ_Q
    head = kv_head * KV_GROUP + group_member
    query = rows % SEQ_Q

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (q_ptr + batch * STRIDE_QB + kv_head * KV_GROUP * STRIDE_QH  # 64-bit scalar
              + (group_member[:, None] * STRIDE_QH + query[:, None] * STRIDE_QS + offs_d[None, :]))
    k_ptrs = tile_ptrs(k_ptr + batch * STRIDE_KB + kv_head * STRIDE_KH, offs_n, offs_d,
                       STRIDE_KS, SEQ_K)
    v_ptrs = tile_ptrs(v_ptr + batch * STRIDE_VB + kv_head * STRIDE_VH, offs_n, offs_d,
                       STRIDE_VS, SEQ_K)
    RAGGED_ROWS: tl.constexpr = ROWS % BLOCK_M != 0
    q = load_tile(q_ptrs, rows, offs_d, ROWS, HEAD_DIM, RAGGED_ROWS, BLOCK_D != HEAD_DIM)

    # Features per row: rows past the group read the last row's (never stored).
    feature_head = kv_head * KV_GROUP + tl.minimum(rows, ROWS - 1) // SEQ_Q
    bias_base = masking.dense_base(bias_ptr, batch, feature_head, BIAS_LAYOUT, NUM_HEADS, SEQ_Q,
                                   SEQ_K)
    mask_base = masking.dense_base(mask_ptr, batch, feature_head, MASK_LAYOUT, NUM_HEADS, SEQ_Q,
                                   SEQ_K)
    spans = masking.spans_base(key_spans_ptr, batch, feature_head, SPANS, NUM_HEADS, SEQ_Q)
    lo, hi = masking.row_reach(query, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                               WINDOW_RIGHT, SPANS)
    full_lo = tl.maximum(masking.row_spans(spans, query, SEQ_Q, SPANS)[2], lo)
    exact = masking.exact_rows(query, spans, SEQ_Q, SPANS)
    q_segment = masking.segment_ids(q_segments_ptr, batch, query, SEQ_Q, SEGMENTS)
    # This slice's keys that the rows see.
    slice_start = split * SPLIT_LEN
    slice_end = slice_start + SPLIT_LEN
    start, full_start, full_end, stop = masking.reach_stretches(
        tl.maximum(lo, slice_start), tl.minimum(hi, slice_end), tl.maximum(full_lo, slice_start),
        BLOCK_N)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tl.static_assert(DROPOUT_THRESHOLD == 0, "dropout never takes split-KV (plan.kv_slices)")
    acc, row_sum, row_max = _attend_stretches(
        acc, row_sum, row_max, q, k_ptrs, v_ptrs, start, full_start, full_end, stop, 0, query,
        offs_n, offs_d, lo, hi, exact, q_segment, k_segments_ptr + batch * SEQ_K,
        mask_base[:, None], bias_base[:, None], dropout_seeds_ptr,
        (batch * NUM_HEADS + feature_head)[:, None], DROPOUT_THRESHOLD, DROPOUT_SCALE,
        SCALE, SOFT_CAP, BIAS_LAYOUT, MASK_LAYOUT,
        SEGMENTS, SPANS, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, NUM_HEADS, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_D, STRIDE_KS, STRIDE_VS, BLOCK_N, DOT_PRECISION, False)  # no TMA

    seen = row_sum > 0
    acc = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, (row_max + tl.math.log2(row_sum)) * masking.LN2, float("-inf"))
    partial = ((batch * NUM_HEADS + head) * NUM_SPLITS + split) * SEQ_Q + query
    store_tile(partial_out_ptr + partial[:, None] * BLOCK_D + offs_d[None, :], acc, rows, offs_d,
               ROWS, BLOCK_D, RAGGED_ROWS, False)
    tl.store(partial_lse_ptr + partial, lse, mask=rows < ROWS)


@triton.jit
def _split_kv_combine_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr,
    SEQ_Q: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) out_s with lse = log sum_s exp(lse_s);
    programs (cdiv(SEQ_Q, BLOCK_M), batch * NUM_HEADS). A row that saw no key in any
    slice gets 0 and lse -inf."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    row_block, _, batch_head = grid_coords(ROW_BLOCKS, 1, WIDE_INDEXING)
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_rows = offs_m < SEQ_Q
    lse_ptrs = partial_lse_ptr + batch_head * NUM_SPLITS * SEQ_Q + offs_m
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(NUM_SPLITS):
        row_max = tl.maximum(row_max, tl.load(lse_ptrs + split * SEQ_Q, mask=in_rows,
                                              other=float("-inf")))
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    out_ptrs = tile_ptrs(partial_out_ptr + batch_head * NUM_SPLITS * SEQ_Q * BLOCK_D, offs_m,
                         offs_d, BLOCK_D, SEQ_Q)
    for split in range(NUM_SPLITS):
        weight = tl.exp(tl.load(lse_ptrs + split * SEQ_Q, mask=in_rows, other=float("-inf"))
                        - row_max)
        row_sum += weight
        partial = load_tile(out_ptrs + split * SEQ_Q * BLOCK_D, offs_m, offs_d, SEQ_Q, BLOCK_D,
                            SEQ_Q % BLOCK_M != 0, False)
        acc += weight[:, None] * partial
    seen = row_sum > 0
    acc = acc / tl.where(seen, row_sum, 1.0)[:, None]
    store_tile(tile_ptrs(out_ptr + batch * STRIDE_OB + head * STRIDE_OH, offs_m, offs_d,
                         STRIDE_OS, SEQ_Q), acc.to(out_ptr.dtype.element_ty), offs_m, offs_d, SEQ_Q,
               HEAD_DIM, SEQ_Q % BLOCK_M != 0, BLOCK_D != HEAD_DIM)
    tl.store(lse_ptr + batch_head * SEQ_Q + offs_m,
             tl.where(seen, row_max + tl.log(row_sum), float("-inf")), mask=in_rows)
