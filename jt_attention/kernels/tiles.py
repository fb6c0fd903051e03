"""Grid coordinates, tile pointers and masked tile loads and stores shared by the kernels.

A bound is checked only where a constexpr says a tile can cross it, so interior
tiles of evenly divided shapes keep unpredicated 16-byte accesses.

Problems with batch x heads past 65535 or buffers past 2**31 elements (4 GB in
fp16) run on a one-dimensional grid with 64-bit offsets (`grid_coords`,
`row_step`); all others keep 32-bit index math, which the compiler schedules best.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def _triton_before(major, minor):
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) < (major, minor)


# Triton before 3.9 lets a wgmma whose A operand sits in registers run on past its loop
# step, and the next step may overwrite those registers while it still reads them
# (triton-lang/triton issue 9433, fixed by pull request 9514; compiled for sm_90a, 3.6,
# 3.7.1 and 3.8.0 show it and 3.9.0 does not: WORKSPACE_NOTES.md, "A GPU-only wrong
# result"). Loops whose dot takes a tile changed in registers pass its result through
# `drained` there.
REGISTER_A_RACES = tl.constexpr(_triton_before(3, 9))


@triton.jit
def drained(acc):
    """acc, the result of a dot, through a PTX mov where REGISTER_A_RACES (ptxas folds
    the mov away). A use of the result inside the loop makes Triton wait for the dot
    before the step ends (wgmma.wait_group 0) rather than leave it in flight, while the
    loop's loads stay pipelined: the next step cannot overwrite the dot's operands."""
    if REGISTER_A_RACES and not INTERPRETED:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [acc], dtype=acc.dtype,
                                         is_pure=True, pack=1)
    else:
        return acc


@triton.jit
def grid_coords(FAST: tl.constexpr, MIDDLE: tl.constexpr, WIDE_INDEXING: tl.constexpr):
    """(fast, middle, slow) coordinates of this program; `slow` is the batch·head.

    The kernels document theirs as "programs (fast, middle, slow)"; a (fast, slow)
    kernel passes MIDDLE = 1.

    Ordinary problems launch a (FAST, MIDDLE, slow) grid and index in 32 bits. Under
    WIDE_INDEXING (plan.Problem.wide_indexing) the grid is (FAST * MIDDLE * slow,),
    as x reaches 2**31 - 1 where y and z stop at 65535, and `slow` is int64, so the
    base offsets it scales are exact past 2**31 elements. Programs that share `slow`
    run next to each other either way."""
    if WIDE_INDEXING:
        pid = tl.program_id(0)
        fast = pid % FAST
        middle = (pid // FAST) % MIDDLE
        slow = (pid // (FAST * MIDDLE)).to(tl.int64)
    else:
        fast = tl.program_id(0)
        middle = tl.program_id(1)
        slow = tl.program_id(2)
    return fast, middle, slow


@triton.jit
def block_coords(BLOCKS: tl.constexpr, HEADS: tl.constexpr, BATCH: tl.constexpr,
                 BATCH_INNER: tl.constexpr, WIDE_INDEXING: tl.constexpr):
    """(block, batch·head) of a program launched as grid_coords(BLOCKS, 1, BATCH * HEADS),
    or, BATCH_INNER (plan.Problem.batch_inner), as grid_coords(BLOCKS * BATCH, 1, HEADS):
    the batch varies fastest there, so the programs that read the same blocks of a bias
    or mask that the batch shares run together, and all but the first read them from L2."""
    if BATCH_INNER:
        fast, _, head = grid_coords(BLOCKS * BATCH, 1, WIDE_INDEXING)
        block = fast // BATCH
        batch_head = (fast % BATCH) * HEADS + head
    else:
        block, _, batch_head = grid_coords(BLOCKS, 1, WIDE_INDEXING)
    return block, batch_head


@triton.jit
def longest_first_coords(BLOCKS: tl.constexpr, WIDE_INDEXING: tl.constexpr):
    """(row block, batch·head) of this program in a causal grid launched like
    grid_coords(BLOCKS, 1, WIDE_INDEXING), where later row blocks see more keys.

    The GPU starts programs in launch order. In plain order the longest programs of
    the last heads start last and run on while other SMs idle. Here the launch order
    takes the batch·heads in groups of 8 and hands out a group's row blocks longest
    first, so the shortest fill the last wave; a group's keys and values stay in L2
    together. Causal flash forward on the H100: -2.6% at B16 H16 S2048 D128, -4% at
    S8192 (WORKSPACE_NOTES.md, "v12: causal grid"; the backward kernels did not gain);
    a causal mask passed as an array: -5% (bf16 B8 H16 S2048 D128)."""
    GROUP: tl.constexpr = 8
    if WIDE_INDEXING:
        pid = tl.program_id(0)
        num_heads = tl.num_programs(0) // BLOCKS
    else:
        pid = tl.program_id(2) * BLOCKS + tl.program_id(0)
        num_heads = tl.num_programs(2)
    group_start = pid // (GROUP * BLOCKS) * GROUP
    group_heads = tl.minimum(num_heads - group_start, GROUP)
    index = pid - group_start * BLOCKS
    row_block = BLOCKS - 1 - index // group_heads
    batch_head = group_start + index % group_heads
    if WIDE_INDEXING:
        batch_head = batch_head.to(tl.int64)
    return row_block, batch_head


@triton.jit
def row_step(start, ROW_STRIDE: tl.constexpr, ROW_LIMIT: tl.constexpr):
    """start * ROW_STRIDE for row indices start < ROW_LIMIT (a scalar or a tensor).

    32-bit where that cannot overflow (decided from the constexprs at compile time),
    64-bit otherwise. Ordinary shapes so keep the first kernels' code: with 64-bit index
    math throughout, the causal flash kernels ran 6-24% slower on the H100."""
    if ROW_LIMIT * ROW_STRIDE < 2**31:
        offset = start * ROW_STRIDE
    else:
        offset = tl.cast(start, tl.int64) * ROW_STRIDE
    return offset


@triton.jit
def tile_ptrs(base, rows, cols, ROW_STRIDE: tl.constexpr, ROW_LIMIT: tl.constexpr):
    """base + rows[:, None] * ROW_STRIDE + cols[None, :], for rows < ROW_LIMIT.

    Row offsets are 64-bit only where 32 bits could overflow (see row_step). Kept in
    the first kernels' form, a column of row offsets broadcast over `cols`: variants that
    built the tile from a row start plus an arange compiled the causal flash kernels
    to other register allocations (197 -> 141-166 registers under Triton 3.6) and
    ran 8-25% slower (WORKSPACE_NOTES.md, "Large inputs")."""
    return base + row_step(rows[:, None], ROW_STRIDE, ROW_LIMIT) + cols[None, :]


@triton.jit
def tile_mask(rows, cols, ROW_LIMIT: tl.constexpr, COL_LIMIT: tl.constexpr,
              CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """[rows, cols] in bounds; called only when at least one bound is checked."""
    if CHECK_ROWS and CHECK_COLS:
        mask = (rows[:, None] < ROW_LIMIT) & (cols[None, :] < COL_LIMIT)
    elif CHECK_ROWS:
        mask = (rows[:, None] < ROW_LIMIT) & (cols[None, :] >= 0)
    else:
        mask = (rows[:, None] >= 0) & (cols[None, :] < COL_LIMIT)
    return mask


@triton.jit
def load_tile(ptrs, rows, cols, ROW_LIMIT: tl.constexpr, COL_LIMIT: tl.constexpr,
              CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Loads ptrs[rows, cols], with zeros outside [0, ROW_LIMIT) x [0, COL_LIMIT)."""
    if CHECK_ROWS or CHECK_COLS:
        mask = tile_mask(rows, cols, ROW_LIMIT, COL_LIMIT, CHECK_ROWS, CHECK_COLS)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(ptrs, value, rows, cols, ROW_LIMIT: tl.constexpr, COL_LIMIT: tl.constexpr,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_ROWS or CHECK_COLS:
        mask = tile_mask(rows, cols, ROW_LIMIT, COL_LIMIT, CHECK_ROWS, CHECK_COLS)
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def rows_source(pointers, base, ROW_STRIDE: tl.constexpr, ROW_LIMIT: tl.constexpr,
                COL_LIMIT: tl.constexpr, TMA: tl.constexpr):
    """What load_from and store_to address: under TMA (Hopper's tensor memory
    accelerator) a tensor descriptor of the [ROW_LIMIT, COL_LIMIT] matrix at `base`
    (row stride ROW_STRIDE, columns contiguous) in boxes of the pointer tile's shape,
    which the copy engine zero-fills and clips at the matrix's edges; else `pointers`,
    the caller's pointer tile, in the form each kernel has always built it (the
    compiler is sensitive to that form: see tile_ptrs). Without TMA no descriptor is
    built; with it the unused pointer tile compiles away."""
    if TMA:
        source = tl.make_tensor_descriptor(base, shape=[ROW_LIMIT, COL_LIMIT],
                                           strides=[ROW_STRIDE, 1],
                                           block_shape=[pointers.shape[0], pointers.shape[1]])
    else:
        source = pointers
    return source


@triton.jit
def tile_source(base, rows, cols, ROW_STRIDE: tl.constexpr, ROW_LIMIT: tl.constexpr,
                COL_LIMIT: tl.constexpr, TMA: tl.constexpr):
    """rows_source of the tile_ptrs(base, rows, cols) tile."""
    return rows_source(tile_ptrs(base, rows, cols, ROW_STRIDE, ROW_LIMIT), base, ROW_STRIDE,
                       ROW_LIMIT, COL_LIMIT, TMA)


@triton.jit
def load_from(source, start, rows, cols, ROW_STRIDE: tl.constexpr, ROW_LIMIT: tl.constexpr,
              COL_LIMIT: tl.constexpr, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr,
              TMA: tl.constexpr):
    """The tile of rows start + [0, BLOCK_ROWS) of a rows_source, zeros outside the
    matrix; rows and cols: the tile's indices (for the pointer path's bounds)."""
    if TMA:
        tile = source.load([start, 0])
    else:
        tile = load_tile(source + row_step(start, ROW_STRIDE, ROW_LIMIT), rows, cols,
                         ROW_LIMIT, COL_LIMIT, CHECK_ROWS, CHECK_COLS)
    return tile


@triton.jit
def store_to(source, start, value, rows, cols, ROW_STRIDE: tl.constexpr,
               ROW_LIMIT: tl.constexpr, COL_LIMIT: tl.constexpr, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr, TMA: tl.constexpr):
    """Stores `value` at rows start + [0, BLOCK_ROWS) of a rows_source, within the matrix."""
    if TMA:
        source.store([start, 0], value)
    else:
        store_tile(source + row_step(start, ROW_STRIDE, ROW_LIMIT), value, rows, cols,
                   ROW_LIMIT, COL_LIMIT, CHECK_ROWS, CHECK_COLS)


@triton.jit
def rows_dot_cols(a_base, b_base, a_rows, b_rows, A_ROWS: tl.constexpr, B_ROWS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, STRIDE_AS: tl.constexpr, STRIDE_BS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """A[a_rows] . B[b_rows]^T in fp32 (S = Q.K^T, dP = dO.V^T), the head dim streamed in
    BLOCK_K chunks.

    The callers pass rows to read that lie within A and B (a row past the end reads
    the last valid one: clamped pointers), so entries they never use stay finite. Only
    the head dim, the reduced axis, is masked: two-axis masks on a pipelined load
    computed wrong results on the H100 under Triton 3.6 (WORKSPACE_NOTES.md, "Backward").
    A_ROWS and B_ROWS bound the row indices (for tile_ptrs' 32/64-bit choice)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = tile_ptrs(a_base, a_rows, offs_k, STRIDE_AS, A_ROWS)
    b_ptrs = tile_ptrs(b_base, b_rows, offs_k, STRIDE_BS, B_ROWS)
    RAGGED_DIM: tl.constexpr = HEAD_DIM % BLOCK_K != 0
    acc = tl.zeros([a_rows.shape[0], b_rows.shape[0]], tl.float32)
    for start_k in range(0, HEAD_DIM, BLOCK_K):
        dims = start_k + offs_k
        a = load_tile(a_ptrs + start_k, a_rows, dims, 0, HEAD_DIM, False, RAGGED_DIM)
        b = load_tile(b_ptrs + start_k, b_rows, dims, 0, HEAD_DIM, False, RAGGED_DIM)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


# Whether these functions run in Triton's interpreter (TRITON_INTERPRET=1 when triton
# decorated them), which has no inline PTX.
INTERPRETED: tl.constexpr = tl.constexpr(isinstance(grid_coords, InterpretedFunction))
