"""Masked tile loads and stores shared by the kernels.

A bound is checked only where a constexpr says a tile can cross it, so interior
tiles of evenly divided shapes keep unpredicated 16-byte accesses.
"""

import triton
import triton.language as tl


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
