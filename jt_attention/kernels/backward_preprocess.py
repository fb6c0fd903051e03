"""Shared by both backward paths: the row term delta and the forward's row statistics.

With P = softmax(S) and dP = dO . V^T, the score gradient is dS = P * (dP - delta),
where delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i, minus the cotangent of the row
logsumexp when the caller differentiates it too (d lse_i / d S_ij = P_ij).
"""

import triton
import triton.language as tl

from jt_attention.kernels import masking
from jt_attention.kernels.tiles import grid_coords, load_tile, tile_ptrs


@triton.jit
def _output_grad_dot_kernel(
    out_ptr, dout_ptr, dlse_ptr, head_start, delta_ptr,
    SEQ_Q: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    STRIDE_OB: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OH: tl.constexpr,
    STRIDE_DOB: tl.constexpr, STRIDE_DOS: tl.constexpr, STRIDE_DOH: tl.constexpr,
    WIDE_INDEXING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, fp32; programs (cdiv(SEQ_Q, BLOCK_M), chunk heads),
    for the chunk of batch·heads from head_start on (plan.Problem.head_chunks).

    dlse is [batch * NUM_HEADS, SEQ_Q] fp32, delta [chunk heads, SEQ_Q] fp32."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    row_block, _, chunk_head = grid_coords(ROW_BLOCKS, 1, WIDE_INDEXING)
    batch_head = head_start + chunk_head
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out_ptrs = tile_ptrs(out_ptr + batch * STRIDE_OB + head * STRIDE_OH, offs_m, offs_d,
                         STRIDE_OS, SEQ_Q)
    dout_ptrs = tile_ptrs(dout_ptr + batch * STRIDE_DOB + head * STRIDE_DOH, offs_m,
                          offs_d, STRIDE_DOS, SEQ_Q)
    RAGGED_ROWS: tl.constexpr = SEQ_Q % BLOCK_M != 0
    RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_D != 0
    delta = tl.zeros([BLOCK_M], tl.float32)
    for start_d in range(0, HEAD_DIM, BLOCK_D):
        out = load_tile(out_ptrs + start_d, offs_m, start_d + offs_d, SEQ_Q, HEAD_DIM,
                        RAGGED_ROWS, RAGGED_DIM)
        dout = load_tile(dout_ptrs + start_d, offs_m, start_d + offs_d, SEQ_Q, HEAD_DIM,
                         RAGGED_ROWS, RAGGED_DIM)
        delta += tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    in_rows = offs_m < SEQ_Q
    dlse = tl.load(dlse_ptr + batch_head * SEQ_Q + offs_m, mask=in_rows, other=0.0)
    tl.store(delta_ptr + chunk_head * SEQ_Q + offs_m, delta - dlse, mask=in_rows)


@triton.jit
def load_rows(ptr, rows, SEQ_Q: tl.constexpr, RAGGED_ROWS: tl.constexpr, PAD: tl.constexpr):
    """ptr[rows] for one batch·head's per-row fp32 vector; PAD past SEQ_Q."""
    if RAGGED_ROWS:
        values = tl.load(ptr + rows, mask=rows < SEQ_Q, other=PAD)
    else:
        values = tl.load(ptr + rows)
    return values


@triton.jit
def load_row_stats(lse_ptr, delta_ptr, rows, SEQ_Q: tl.constexpr, RAGGED_ROWS: tl.constexpr):
    """(lse in base 2, delta) of `rows` of one batch·head.

    Rows past SEQ_Q, and rows that saw no key, get lse = +inf (masking.backward_lse),
    so their probabilities exp2(s - lse) are exactly 0."""
    lse = load_rows(lse_ptr, rows, SEQ_Q, RAGGED_ROWS, float("inf"))
    delta = load_rows(delta_ptr, rows, SEQ_Q, RAGGED_ROWS, 0.0)
    return masking.backward_lse(lse), delta
