"""out = scale * A'.B, where A is a [Sq, Sk] probability matrix (P or dS, input dtype) and
A' is A or its transpose: the GEMMs of the two-pass kernels.

Forward, rows of up to tuning.WHOLE_ROW_MAX_KEYS keys: O = P.V. Backward, head dims
above 256: dV = P^T.dO, dK = scale * dS^T.Q, dQ = scale * dS.K. Each is tiled over
(rows, D-chunks) and reduces over the sequence; dK and dV sum the query heads of a
group in the reduction loop. The reduction walks masking.key_blocks (or query_blocks):
A was written there and may be unwritten memory elsewhere, so the blocks outside are
never read and the masked ones drop the entries past each query's reach
(masking.row_reach) with a select.
"""

import triton
import triton.language as tl

from jt_attention.kernels import masking
from jt_attention.kernels.tiles import (drained, grid_coords, load_tile, row_step, store_tile,
                                        tile_ptrs)


@triton.jit
def _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d, spans,
                       REDUCED: tl.constexpr, PROBS_STRIDE: tl.constexpr,
                       STRIDE_BS: tl.constexpr, TRANSPOSE_A: tl.constexpr,
                       MASKED: tl.constexpr, RAGGED_REDUCED: tl.constexpr,
                       SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                       SPANS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += A'[rows, start_c:+BLOCK_C] . B[start_c:+BLOCK_C, d-chunk].

    Only the reduced axis is masked (zeros past REDUCED); the pointers already clamp
    the output rows and columns (see _probs_matmul_kernel).
    MASKED: some query of the block does not reach all of its keys. Those entries
    may lie in tiles that were never written (unwritten memory), so they are dropped
    with a select after the load, never multiplied (see two_pass_forward, v1 notes);
    spans: the (batch, head)'s key spans."""
    cols = start_c + offs_c
    if TRANSPOSE_A:  # A is [queries, keys] in memory; the rows here are keys
        a = tl.trans(load_tile(a_ptrs + row_step(start_c, PROBS_STRIDE, REDUCED), cols, rows,
                               REDUCED, 0, RAGGED_REDUCED, False))
        if MASKED:
            lo, hi = masking.row_reach(cols, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                          WINDOW_RIGHT, SPANS)
            a = tl.where((rows[:, None] >= lo[None, :]) & (rows[:, None] < hi[None, :]), a, 0.0)
    else:  # the rows are queries, the reduction runs over keys
        a = load_tile(a_ptrs + start_c, rows, cols, 0, REDUCED, False, RAGGED_REDUCED)
        if MASKED:
            lo, hi = masking.row_reach(rows, spans, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                          WINDOW_RIGHT, SPANS)
            a = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), a, 0.0)
    b = load_tile(b_ptrs + row_step(start_c, STRIDE_BS, REDUCED), cols, offs_d, REDUCED, 0,
                  RAGGED_REDUCED, False)
    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if MASKED:  # A was selected in registers (tiles.drained)
        acc = drained(acc)
    return acc


@triton.jit
def _probs_matmul_kernel(
    a_ptr, b_ptr, key_spans_ptr, query_spans_ptr, head_start, out_earlier_ptr, out_ptr,
    OUT_SCALE: tl.constexpr, TRANSPOSE_A: tl.constexpr, IS_CAUSAL: tl.constexpr,
    CHUNK_OUT_HEADS: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_BB: tl.constexpr, STRIDE_BS: tl.constexpr, STRIDE_BH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """out = OUT_SCALE * A' . B per batch·head, A' = A^T if TRANSPOSE_A else A, for the
    chunk of batch·heads from head_start on (a query head; plan.Problem.head_chunks):
    A is the chunk's, B and out the whole problem's. out_earlier is never read: it
    holds what earlier chunks wrote to out, which this launch updates in place.

    A (P or dS) is [chunk heads, SEQ_Q, PROBS_STRIDE].
    TRANSPOSE_A (dV = P^T.dO, dK = dS^T.Q): rows are keys, the reduction runs over
      the queries of every head of a KV group; B is query-shaped, out key-shaped;
      tiles (cdiv(HEAD_DIM, BLOCK_D), cdiv(SEQ_K, BLOCK_R), CHUNK_OUT_HEADS KV heads).
    Otherwise (O = P.V, dQ = dS.K): rows are queries, the reduction runs over keys;
      B is V or K; tiles (cdiv(HEAD_DIM, BLOCK_D), cdiv(SEQ_Q, BLOCK_R),
      CHUNK_OUT_HEADS query heads).
    PERSISTENT (a tuned choice; where the plan passes NUM_SMS = 0, the problem has no
      persistent grid and every config runs one program per tile): a grid of
      min(tiles, NUM_SMS) programs walks the tiles in one flattened loop, so the loads
      of a tile start under the previous tile's store, which is exposed otherwise
      (the seed workload's tiles have only 8 reduction steps).
    """
    OUT_ROWS: tl.constexpr = SEQ_K if TRANSPOSE_A else SEQ_Q
    D_BLOCKS: tl.constexpr = (HEAD_DIM + BLOCK_D - 1) // BLOCK_D
    ROW_BLOCKS: tl.constexpr = (OUT_ROWS + BLOCK_R - 1) // BLOCK_R
    if not PERSISTENT or NUM_SMS == 0:
        d_block, row_block, chunk_out_head = grid_coords(D_BLOCKS, ROW_BLOCKS, WIDE_INDEXING)
        _probs_matmul_tile(a_ptr, b_ptr, key_spans_ptr, query_spans_ptr, out_ptr, head_start,
                           d_block, row_block, chunk_out_head, OUT_SCALE, TRANSPOSE_A, IS_CAUSAL,
                           SEQ_Q, SEQ_K, NUM_HEADS, KV_GROUP, HEAD_DIM, PROBS_STRIDE, STRIDE_BB,
                           STRIDE_BS, STRIDE_BH, STRIDE_OB, STRIDE_OS, STRIDE_OH, WINDOW_LEFT,
                           WINDOW_RIGHT, SPANS, DOT_PRECISION, BLOCK_R, BLOCK_C, BLOCK_D)
    else:
        NUM_TILES: tl.constexpr = D_BLOCKS * ROW_BLOCKS * CHUNK_OUT_HEADS
        for tile in tl.range(tl.program_id(0), NUM_TILES, NUM_SMS, flatten=True):
            chunk_out_head = tile // (D_BLOCKS * ROW_BLOCKS)
            if WIDE_INDEXING:  # as grid_coords: base offsets past 2**31 elements
                chunk_out_head = chunk_out_head.to(tl.int64)
            _probs_matmul_tile(a_ptr, b_ptr, key_spans_ptr, query_spans_ptr, out_ptr, head_start,
                               tile % D_BLOCKS, (tile // D_BLOCKS) % ROW_BLOCKS, chunk_out_head,
                               OUT_SCALE, TRANSPOSE_A, IS_CAUSAL, SEQ_Q, SEQ_K, NUM_HEADS,
                               KV_GROUP, HEAD_DIM, PROBS_STRIDE, STRIDE_BB, STRIDE_BS, STRIDE_BH,
                               STRIDE_OB, STRIDE_OS, STRIDE_OH, WINDOW_LEFT, WINDOW_RIGHT, SPANS,
                               DOT_PRECISION, BLOCK_R, BLOCK_C, BLOCK_D)


@triton.jit
def _probs_matmul_tile(
    a_ptr, b_ptr, key_spans_ptr, query_spans_ptr, out_ptr, head_start, d_block, row_block,
    chunk_out_head,
    OUT_SCALE: tl.constexpr, TRANSPOSE_A: tl.constexpr, IS_CAUSAL: tl.constexpr,
    SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, NUM_HEADS: tl.constexpr,
    KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PROBS_STRIDE: tl.constexpr,
    STRIDE_BB: tl.constexpr, STRIDE_BS: tl.constexpr, STRIDE_BH: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_R rows, BLOCK_D columns) tile of out (see _probs_matmul_kernel)."""
    OUT_ROWS: tl.constexpr = SEQ_K if TRANSPOSE_A else SEQ_Q
    REDUCED: tl.constexpr = SEQ_Q if TRANSPOSE_A else SEQ_K
    HEADS_SUMMED: tl.constexpr = KV_GROUP if TRANSPOSE_A else 1
    B_HEAD_GROUP: tl.constexpr = 1 if TRANSPOSE_A else KV_GROUP  # B is dO or Q, else K
    OUT_HEADS: tl.constexpr = NUM_HEADS // HEADS_SUMMED
    start_d = d_block * BLOCK_D
    start_r = row_block * BLOCK_R
    batch_out_head = head_start // HEADS_SUMMED + chunk_out_head  # chunks hold whole KV groups
    batch = batch_out_head // OUT_HEADS
    out_head = batch_out_head % OUT_HEADS
    rows = start_r + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = start_d + tl.arange(0, BLOCK_D)
    RAGGED_ROWS: tl.constexpr = OUT_ROWS % BLOCK_R != 0
    RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_D != 0
    RAGGED_REDUCED: tl.constexpr = REDUCED % BLOCK_C != 0

    # Rows and columns past the output's edge read other memory of the same buffer
    # instead of being masked: they land in accumulator rows and columns that are never
    # stored (a row of A'.B depends on that row of A' alone), and every load keeps at
    # most a one-axis mask (with two-axis masks, the 4-stage D256 config computed wrong
    # dK and dV on the H100, Triton 3.6: WORKSPACE_NOTES.md). Along a contiguous axis
    # the index wraps (modulo a multiple of 8) rather than clamps, which keeps 16-byte
    # loads: clamped, those loads went scalar and spilled 0.6-2.3 KB per thread at
    # head dims like 520 (ptxas, sm_90a).
    read_rows = tl.minimum(rows, OUT_ROWS - 1) if RAGGED_ROWS else rows
    if TRANSPOSE_A and RAGGED_ROWS:  # keys are the contiguous axis of P and dS rows
        read_rows = rows % PROBS_STRIDE
    read_d = offs_d % HEAD_DIM if RAGGED_DIM else offs_d
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for group_member in range(HEADS_SUMMED):
        a_head = out_head * HEADS_SUMMED + group_member
        b_head = a_head // B_HEAD_GROUP
        a_base = a_ptr + (chunk_out_head * HEADS_SUMMED + group_member) * SEQ_Q * PROBS_STRIDE
        key_spans = masking.spans_base(key_spans_ptr, batch, a_head, SPANS, NUM_HEADS, SEQ_Q)
        if TRANSPOSE_A:  # keys [start_r, +BLOCK_R) reach the queries of query_blocks
            a_ptrs = tile_ptrs(a_base, offs_c, read_rows, PROBS_STRIDE, REDUCED)
            start, full_start, full_end, stop = masking.query_blocks(
                start_r, masking.spans_base(query_spans_ptr, batch, a_head, SPANS, NUM_HEADS,
                                            SEQ_K),
                BLOCK_R, BLOCK_C, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, SPANS)
        else:  # queries [start_r, +BLOCK_R) see the keys of key_blocks
            a_ptrs = tile_ptrs(a_base, read_rows, offs_c, PROBS_STRIDE, OUT_ROWS)
            start, full_start, full_end, stop = masking.key_blocks(
                start_r, key_spans, BLOCK_R, BLOCK_C, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                WINDOW_RIGHT, SPANS)
        if HEADS_SUMMED > 1:
            # The same value, which the compiler cannot fold: with constexpr bounds a
            # one-block loop (64 < q_len <= 128) is inlined, and Triton 3.6 then pipelines
            # the group loop around both steps, with 2-3x the config's shared memory
            # (393 KB for the 4-stage D256 config on sm_90: no config could launch).
            full_end = min(full_end, start_r + REDUCED)
        b_ptrs = tile_ptrs(b_ptr + batch * STRIDE_BB + b_head * STRIDE_BH, offs_c, read_d,
                           STRIDE_BS, REDUCED)
        for start_c in range(start, full_start, BLOCK_C):
            acc = _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d,
                                     key_spans, REDUCED, PROBS_STRIDE, STRIDE_BS, TRANSPOSE_A,
                                     True, RAGGED_REDUCED, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                     WINDOW_RIGHT, SPANS, DOT_PRECISION)
        for start_c in range(full_start, full_end, BLOCK_C):
            acc = _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d,
                                     key_spans, REDUCED, PROBS_STRIDE, STRIDE_BS, TRANSPOSE_A,
                                     False, False, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                     WINDOW_RIGHT, SPANS, DOT_PRECISION)
        for start_c in range(full_end, stop, BLOCK_C):
            acc = _probs_matmul_step(acc, a_ptrs, b_ptrs, start_c, rows, offs_c, offs_d,
                                     key_spans, REDUCED, PROBS_STRIDE, STRIDE_BS, TRANSPOSE_A,
                                     True, RAGGED_REDUCED, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT,
                                     WINDOW_RIGHT, SPANS, DOT_PRECISION)

    acc *= OUT_SCALE
    out_ptrs = tile_ptrs(out_ptr + batch * STRIDE_OB + out_head * STRIDE_OH, rows,
                         offs_d, STRIDE_OS, OUT_ROWS)
    store_tile(out_ptrs, acc.to(out_ptr.dtype.element_ty), rows, offs_d, OUT_ROWS, HEAD_DIM,
               RAGGED_ROWS, RAGGED_DIM)
