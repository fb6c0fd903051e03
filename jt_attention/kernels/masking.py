"""Visibility and score modification, in one place for every kernel (features.py defines them).

Three questions, asked by every kernel that reads scores:

1. Which blocks to visit. `key_blocks` gives a block of query rows the key blocks to
   walk, in three stretches: masked, unmasked (every query of the block sees every
   key there), masked. `query_blocks` does the same for a block of keys (the kernels
   that walk queries). Causal and the local window bound the stretches statically;
   the per-row spans (features.py: lengths, segment ids, the mask) at run time.
   Blocks no query of the block sees are never visited. The kernels that take one
   score tile per program (tile_slots of them per row block) get theirs from
   `program_tile`.
2. Which elements are visible, in a masked block: `visible`, the one element
   predicate, over index tensors shaped [M, 1] and [1, N] in either order, so the
   kernels that work on transposed [keys, queries] tiles call it as the others do.
   Its first part, `row_reach` (band and spans, per query), also tells the kernels
   that read probabilities another launch wrote which entries exist: a launch that
   walks key_blocks() writes at least every entry a row reaches, whatever its blocks.
   `exact_rows` marks the queries whose visible keys are one run (their spans are
   exact), for which the flash forward reads no mask.
3. The logits: `logits` adds the bias and applies the soft-cap, returning base-2
   scores (log2(e) folded in, as the kernels use exp2) and the soft-cap's derivative
   for the backward; `store_bias_grad` writes or accumulates the bias gradient.
4. Dropout: `dropout_multiplier` draws, for any tile that starts at multiples of 16,
   the factor keep / (1 - rate) of each element from its head's Philox key and stream
   and its position (features.dropout_keep is the jnp twin), so the forward and both
   backward kernels draw the same mask whatever their blocks.

Band: query i sees keys i - WINDOW_LEFT .. i + WINDOW_RIGHT, and none past i if
IS_CAUSAL; -1 leaves a side unbounded. Operand layouts (BIAS_LAYOUT, MASK_LAYOUT,
SPANS) are features.layout codes: PRESENT and the dims an operand has; 0 for none.
"""

import triton
import triton.language as tl

from jt_attention.kernels.tiles import INTERPRETED, grid_coords

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# features.BATCH, HEADS, QUERIES, KEYS
_BATCH: tl.constexpr = tl.constexpr(1)
_HEADS: tl.constexpr = tl.constexpr(2)
_QUERIES: tl.constexpr = tl.constexpr(4)
_KEYS: tl.constexpr = tl.constexpr(8)
# Philox-2x32 constants (features.PHILOX_*)
_ROUND: tl.constexpr = tl.constexpr(0xD256D193)
_KEY_STEP: tl.constexpr = tl.constexpr(0x9E3779B9)
_ROUNDS: tl.constexpr = tl.constexpr(7)
# Bias-gradient modes (plan.bias_grad_mode)
STORE: tl.constexpr = tl.constexpr(1)       # one visit per element: dbias = dS
ACCUMULATE: tl.constexpr = tl.constexpr(2)  # broadcast dims: fp32 atomic sums


@triton.jit
def _dense_strides(LAYOUT: tl.constexpr, NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr,
                   SEQ_K: tl.constexpr):
    """(batch, head, query, key) strides of a contiguous operand with `LAYOUT`'s dims."""
    KEY: tl.constexpr = 1 if _KEYS & LAYOUT else 0
    QUERY: tl.constexpr = (SEQ_K if _KEYS & LAYOUT else 1) if _QUERIES & LAYOUT else 0
    HEAD: tl.constexpr = ((SEQ_Q if _QUERIES & LAYOUT else 1) * (SEQ_K if _KEYS & LAYOUT else 1)
                          if _HEADS & LAYOUT else 0)
    BATCH: tl.constexpr = ((NUM_HEADS if _HEADS & LAYOUT else 1)
                           * (SEQ_Q if _QUERIES & LAYOUT else 1)
                           * (SEQ_K if _KEYS & LAYOUT else 1) if _BATCH & LAYOUT else 0)
    return BATCH, HEAD, QUERY, KEY


@triton.jit
def dense_base(ptr, batch, head, LAYOUT: tl.constexpr, NUM_HEADS: tl.constexpr,
               SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr):
    """`ptr` at (batch, head) of a bias- or mask-like operand (broadcast dims stay put)."""
    batch_stride, head_stride, _, _ = _dense_strides(LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    return ptr + batch * batch_stride + head * head_stride


@triton.jit
def _load_dense_tile(base, q, k, LAYOUT: tl.constexpr, NUM_HEADS: tl.constexpr,
                     SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, wanted=True):
    """[q, k] (index tensors [M, 1] and [1, N], either way round) of a dense operand at
    `base`; 0 (False) past the ends and where `wanted` (a mask, broadcast to the tile) is
    False: those values are never used, and their bytes are not read. The indices go into
    the address as they are, not clamped, so that the compiler sees runs of consecutive
    keys and loads them as vectors at constant offsets from one address per row:
    clamped, each element took a 64-bit address of its own, and the mask kernels spilled
    (WORKSPACE_NOTES.md, "Bias and mask loads")."""
    _, _, query_stride, key_stride = _dense_strides(LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    return tl.load(base + q * query_stride + k * key_stride,
                   mask=(q < SEQ_Q) & (k < SEQ_K) & wanted, other=0)


@triton.jit
def row_spans(spans_base, rows, NUM_ROWS: tl.constexpr, SPANS: tl.constexpr):
    """(first, end, full_from) of `rows` (a vector) from a [3, NUM_ROWS] span array; rows
    past the end take the last row's. Zeros without spans (and then never used)."""
    if SPANS:
        rows = tl.minimum(rows, NUM_ROWS - 1)
        first = tl.load(spans_base + rows)
        end = tl.load(spans_base + NUM_ROWS + rows)
        full_from = tl.load(spans_base + 2 * NUM_ROWS + rows)
    else:
        first = tl.zeros_like(rows)
        end = first
        full_from = first
    return first, end, full_from


@triton.jit
def segment_ids(ptr, batch, positions, LENGTH: tl.constexpr, SEGMENTS: tl.constexpr):
    """The segment ids at `positions` of a [batch, LENGTH] array (zeros without them)."""
    if SEGMENTS:
        ids = tl.load(ptr + batch * LENGTH + tl.minimum(positions, LENGTH - 1))
    else:
        ids = tl.zeros_like(positions)
    return ids


@triton.jit
def spans_base(ptr, batch, head, SPANS: tl.constexpr, NUM_HEADS: tl.constexpr,
               NUM_ROWS: tl.constexpr):
    """`ptr` at (batch, head) of a [RB, RH, 3, NUM_ROWS] span array."""
    base = ptr
    if _HEADS & SPANS:
        base += head * 3 * NUM_ROWS
    if _BATCH & SPANS:
        base += batch * (NUM_HEADS if _HEADS & SPANS else 1) * 3 * NUM_ROWS
    return base


@triton.jit
def band_bounds(first, last, BELOW: tl.constexpr, ABOVE: tl.constexpr, LIMIT: tl.constexpr):
    """(lo, hi, full_lo, full_hi) for indices first..last that each see [i - BELOW,
    i + ABOVE] within [0, LIMIT) (-1: unbounded): together they see [lo, hi), and each
    of them sees [full_lo, full_hi)."""
    lo = 0
    hi = LIMIT
    full_lo = 0
    full_hi = LIMIT
    if BELOW >= 0:
        lo = max(first - BELOW, 0)
        full_lo = last - BELOW
    if ABOVE >= 0:
        hi = min(last + ABOVE + 1, LIMIT)
        full_hi = min(first + ABOVE + 1, LIMIT)
    return lo, hi, full_lo, full_hi


@triton.constexpr_function
def tile_slots(seq_k, block_m, block_n, is_causal, window_left, window_right):
    """Programs per row block (the grid's fast axis) of the kernels that take one score
    tile each (two_pass_forward, two_pass_backward): the most key blocks a row block
    can see where the band bounds its keys, so that a window starts no programs for
    the blocks it hides; else all of them. Program `slot` takes the row block's visible
    block `slot` (key_blocks' start + slot * block_n), if there is one. The plan calls
    it too, on plain ints, for the grids."""
    blocks = (seq_k + block_n - 1) // block_n
    above = 0 if is_causal else window_right
    if window_left >= 0 and above >= 0:  # keys i - left .. i + above for rows i of the block
        blocks = min(blocks, (block_m - 1 + window_left + above) // block_n + 2)
    return blocks


@triton.jit
def span_bounds(lo, hi, full_lo, full_hi, first, end, full_from):
    """band_bounds narrowed by the spans (vectors) of the same indices."""
    return (max(lo, tl.min(first, 0)), min(hi, tl.max(end, 0)),
            max(full_lo, tl.max(full_from, 0)), min(full_hi, tl.min(end, 0)))


@triton.jit
def stretches(lo, hi, full_lo, full_hi, STEP: tl.constexpr, LEFT_EDGE: tl.constexpr):
    """(start, full_start, full_end, stop), multiples of STEP: visit [start, full_start)
    masked, [full_start, full_end) unmasked and [full_end, stop) masked, which covers
    [lo, hi); blocks in the unmasked stretch lie within [full_lo, full_hi). LEFT_EDGE
    False: nothing is hidden on the left (full_lo <= lo = 0), so the first stretch is
    statically empty."""
    start = lo // STEP * STEP
    stop = max((hi + STEP - 1) // STEP * STEP, start)
    full_start = start
    if LEFT_EDGE:
        full_start = min(max((full_lo + STEP - 1) // STEP * STEP, start), stop)
    full_end = min(max(full_hi // STEP * STEP, full_start), stop)
    return start, full_start, full_end, stop


@triton.jit
def stretch_bounds(STRETCH: tl.constexpr, start, full_start, full_end, stop):
    """[begin, end) of stretch STRETCH of stretches(): 0 and 2 masked, 1 unmasked. The
    kernels walk the three in one tl.static_range(3), each compiled with its flags."""
    if STRETCH == 0:
        bounds = start, full_start
    elif STRETCH == 1:
        bounds = full_start, full_end
    else:
        bounds = full_end, stop
    return bounds


@triton.jit
def _block_stretches(first, BLOCK: tl.constexpr, STEP: tl.constexpr, LIMIT: tl.constexpr,
                     BELOW: tl.constexpr, ABOVE: tl.constexpr, spans_ptr, SPANS: tl.constexpr,
                     NUM_ROWS: tl.constexpr):
    lo, hi, full_lo, full_hi = band_bounds(first, first + BLOCK - 1, BELOW, ABOVE, LIMIT)
    if SPANS:
        span_first, span_end, full_from = row_spans(spans_ptr, first + tl.arange(0, BLOCK),
                                                    NUM_ROWS, SPANS)
        lo, hi, full_lo, full_hi = span_bounds(lo, hi, full_lo, full_hi, span_first, span_end,
                                               full_from)
    return stretches(lo, hi, full_lo, full_hi, STEP, BELOW >= 0 or SPANS)


@triton.jit
def key_blocks(start_m, spans_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, IS_CAUSAL: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr):
    """stretches() of the BLOCK_N key blocks that queries [start_m, start_m + BLOCK_M)
    see; spans_ptr at the (batch, head)'s key spans."""
    return _block_stretches(start_m, BLOCK_M, BLOCK_N, SEQ_K, WINDOW_LEFT,
                            0 if IS_CAUSAL else WINDOW_RIGHT, spans_ptr, SPANS, SEQ_Q)


@triton.jit
def program_tile(spans_ptr, head_start, SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr,
                 NUM_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                 WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr,
                 WIDE_INDEXING: tl.constexpr):
    """This program's score tile, in the kernels that take one each (programs
    (tile_slots, cdiv(SEQ_Q, BLOCK_M), chunk heads from head_start on)): (chunk_head,
    batch, head, spans, start_m, block_n, seen, partial). The tile's rows start at
    start_m, its keys at block_n * BLOCK_N; spans: the (batch, head)'s key spans
    (spans_base); seen: some row of the block sees that key block (else the program
    has nothing to do); partial: the block lies in a masked stretch of key_blocks,
    where the element predicate decides."""
    ROW_BLOCKS: tl.constexpr = (SEQ_Q + BLOCK_M - 1) // BLOCK_M
    SLOTS: tl.constexpr = tile_slots(SEQ_K, BLOCK_M, BLOCK_N, IS_CAUSAL, WINDOW_LEFT,
                                     WINDOW_RIGHT)
    slot, row_block, chunk_head = grid_coords(SLOTS, ROW_BLOCKS, WIDE_INDEXING)
    start_m = row_block * BLOCK_M
    batch_head = head_start + chunk_head
    batch = batch_head // NUM_HEADS
    head = batch_head % NUM_HEADS
    spans = spans_base(spans_ptr, batch, head, SPANS, NUM_HEADS, SEQ_Q)
    start, full_start, full_end, stop = key_blocks(
        start_m, spans, BLOCK_M, BLOCK_N, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
        SPANS)
    # start_n >= start always holds; testing it all the same keeps the plain score
    # tile kernel at 170 registers, not 218 (sm_90, Triton 3.6).
    block_n = start // BLOCK_N + slot
    start_n = block_n * BLOCK_N
    seen = (start_n >= start) & (start_n < stop)
    partial = (start_n < full_start) | (start_n >= full_end)
    return chunk_head, batch, head, spans, start_m, block_n, seen, partial


@triton.jit
def query_blocks(start_n, spans_ptr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr):
    """stretches() of the BLOCK_M query blocks that see keys [start_n, start_n + BLOCK_N);
    spans_ptr at the (batch, head)'s query spans."""
    return _block_stretches(start_n, BLOCK_N, BLOCK_M, SEQ_Q, 0 if IS_CAUSAL else WINDOW_RIGHT,
                            WINDOW_LEFT, spans_ptr, SPANS, SEQ_K)


@triton.jit
def row_reach(queries, spans_base, SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr,
              IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
              SPANS: tl.constexpr):
    """(lo, hi) per query (a vector of positions): the keys [lo, hi) that the band and
    the spans leave it, within [0, SEQ_K). A superset of what it sees; with no segment
    ids and no mask, exactly that. spans_base: the (batch, head)'s key spans (a scalar,
    or a vector like `queries`)."""
    first, end, _ = row_spans(spans_base, queries, SEQ_Q, SPANS)
    lo = first
    hi = tl.minimum(end, SEQ_K) if SPANS else tl.zeros_like(queries) + SEQ_K
    if WINDOW_LEFT >= 0:
        lo = tl.maximum(lo, queries - WINDOW_LEFT)
    if IS_CAUSAL:
        hi = tl.minimum(hi, queries + 1)
    elif WINDOW_RIGHT >= 0:
        hi = tl.minimum(hi, queries + WINDOW_RIGHT + 1)
    return lo, hi


@triton.jit
def exact_rows(queries, spans_base, SEQ_Q: tl.constexpr, SPANS: tl.constexpr):
    """Per query (a vector of positions): whether the keys it sees are exactly its span
    [first, end) within the band (full_from == first: its lengths, segment ids and mask
    leave one run of keys). visible() then reads no mask for it: a causal or padding
    mask passed as an array costs no mask traffic at all."""
    if SPANS:
        first, _, full_from = row_spans(spans_base, queries, SEQ_Q, SPANS)
        exact = full_from == first
    else:
        exact = no_exact_rows(queries)  # no spans, so no mask either: never consulted
    return exact


@triton.jit
def no_exact_rows(queries):
    """exact_rows' stand-in where visible() reads the mask for every row: the backward and
    two-pass kernels, where skipping it was not measured faster (WORKSPACE_NOTES.md,
    "Dense masks: rows with one run of keys")."""
    return tl.zeros(queries.shape, tl.int1)


@triton.jit
def keys_to_read(cols, start, stop, SEQ_K: tl.constexpr):
    """The keys to load for `cols` where a kernel computes whole rows: those outside
    [start, stop) (key_blocks of its rows) read the nearest inside instead, so keys that
    no row sees are never loaded (their scores are masked, and stay finite)."""
    return tl.minimum(tl.maximum(tl.minimum(cols, stop - 1), start), SEQ_K - 1)


@triton.jit
def reach_stretches(lo, hi, full_lo, STEP: tl.constexpr):
    """stretches() for rows given by their row_reach (lo, hi) and the start of the keys
    each sees all of, full_lo (max(lo, the spans' full_from))."""
    return stretches(tl.min(lo, 0), tl.max(hi, 0), tl.max(full_lo, 0), tl.min(hi, 0), STEP,
                     True)


@triton.jit
def visible(q, k, lo, hi, exact, q_segment, key_segments_base, mask_base,
            NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr,
            SEGMENTS: tl.constexpr, MASK_LAYOUT: tl.constexpr):
    """Whether query q sees key k, for index tensors [M, 1] and [1, N] (either way round).

    lo, hi (row_reach), exact (exact_rows) and q_segment belong to the queries and are
    shaped like q; key_segments_base and mask_base point at the (batch, head)'s key ids
    and mask."""
    keep = (k >= lo) & (k < hi)
    if SEGMENTS:
        # unclamped, as in _load_dense_tile: runs of keys load as vectors
        keep = keep & (q_segment == tl.load(key_segments_base + k, mask=k < SEQ_K, other=0))
    if MASK_LAYOUT:
        # the predicate is constant along each row, so the loads stay vectors
        keep = keep & (exact | _load_dense_tile(mask_base, q, k, MASK_LAYOUT, NUM_HEADS, SEQ_Q,
                                                SEQ_K, ~exact))
    return keep


@triton.jit
def tile_visible(rows, cols, spans_base, q_segments_ptr, k_segments_ptr, mask_ptr, batch, head,
                 IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                 WINDOW_RIGHT: tl.constexpr, SPANS: tl.constexpr, NUM_HEADS: tl.constexpr,
                 SEQ_Q: tl.constexpr, SEQ_K: tl.constexpr, SEGMENTS: tl.constexpr,
                 MASK_LAYOUT: tl.constexpr):
    """visible() for a [rows, cols] tile of (batch, head), its row reach and ids found
    here: for kernels that visit each tile once (the two-pass ones), where the flash
    kernels keep them per row across their key blocks."""
    lo, hi = row_reach(rows, spans_base, SEQ_Q, SEQ_K, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                       SPANS)
    return visible(rows[:, None], cols[None, :], lo[:, None], hi[:, None],
                   no_exact_rows(rows)[:, None],
                   segment_ids(q_segments_ptr, batch, rows, SEQ_Q, SEGMENTS)[:, None],
                   k_segments_ptr + batch * SEQ_K,
                   dense_base(mask_ptr, batch, head, MASK_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K),
                   NUM_HEADS, SEQ_Q, SEQ_K, SEGMENTS, MASK_LAYOUT)


@triton.jit
def _tanh(x, APPROX: tl.constexpr):
    """tanh of an fp32 tile. APPROX (16-bit inputs, compiled kernels): the special-function
    unit's tanh.approx.f32, one operation (relative error up to about 2**-11; the
    attention's errors against float64 measured equal to the exact form's, logits up to
    three times the cap). Otherwise from exp2, absolute error about 1e-7 (libdevice is
    not in Triton's interpreter, nor inline PTX): two special-function operations and a
    division, which bound the soft-capped flash kernels at head dim 128
    (WORKSPACE_NOTES.md, "Soft-cap with the approximate tanh")."""
    if APPROX and not INTERPRETED:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def logits(qk, bias_base, q, k, SCALE: tl.constexpr, SOFT_CAP: tl.constexpr,
           BIAS_LAYOUT: tl.constexpr, NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr,
           SEQ_K: tl.constexpr, APPROX_TANH: tl.constexpr):
    """(base-2 scores, d capped / d uncapped) of the fp32 dot products qk at [q, k]:
    log2(e) * cap * tanh((SCALE * qk + bias) / cap). The derivative is 1.0 without a
    soft-cap (and dead code in the forward). APPROX_TANH: see _tanh; a forward and its
    backward must pass the same."""
    if BIAS_LAYOUT == 0 and SOFT_CAP == 0:
        scores = qk * (SCALE * LOG2E)
        cap_grad = 1.0
    else:
        values = qk * SCALE
        if BIAS_LAYOUT:
            bias = _load_dense_tile(bias_base, q, k, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
            values += bias.to(tl.float32)
        cap_grad = 1.0
        if SOFT_CAP > 0:
            tanh = _tanh(values * (1.0 / SOFT_CAP), APPROX_TANH)
            values = SOFT_CAP * tanh
            cap_grad = 1.0 - tanh * tanh
        scores = values * LOG2E
    return scores, cap_grad


@triton.jit
def _philox(c0, c1, key):
    """Philox-2x32-7 for counter (c0, c1) and key: its two words, uint32
    (features.philox is the jnp twin)."""
    for _ in tl.static_range(_ROUNDS):
        previous_c0 = c0
        c0 = tl.math.umulhi(_ROUND, previous_c0) ^ c1 ^ key
        c1 = tl.mul(_ROUND, previous_c0, sanitize_overflow=False)
        key = tl.add(key, _KEY_STEP, sanitize_overflow=False)
    return c0, c1


@triton.jit
def _alternate_eights(a, b, AXIS: tl.constexpr):
    """a and b ([R, C]) merged along AXIS, whose length doubles: its blocks of 8 come
    from a and b in turn."""
    R: tl.constexpr = a.shape[0]
    C: tl.constexpr = a.shape[1]
    if AXIS == 1:
        both = tl.join(tl.reshape(a, (R, C // 8, 8)), tl.reshape(b, (R, C // 8, 8)))
        merged = tl.reshape(tl.permute(both, (0, 1, 3, 2)), (R, 2 * C))
    else:
        both = tl.join(tl.reshape(a, (R // 8, 8, C)), tl.reshape(b, (R // 8, 8, C)))
        merged = tl.reshape(tl.permute(both, (0, 3, 1, 2)), (2 * R, C))
    return merged


@triton.jit
def dropout_multiplier(seeds_ptr, batch_head, query_start, BLOCK_M: tl.constexpr, key_start,
                       BLOCK_N: tl.constexpr, KEYS_FIRST: tl.constexpr, SEQ_Q: tl.constexpr,
                       SEQ_K: tl.constexpr, THRESHOLD: tl.constexpr, SCALE: tl.constexpr):
    """keep / (1 - rate) for queries [query_start, + BLOCK_M) and keys [key_start, +
    BLOCK_N) (both starts multiples of 16) of head batch_head (b * NUM_HEADS + n): a
    [queries, keys] tile, or [keys, queries] if KEYS_FIRST. The head's Philox key and
    stream are entry batch_head of seeds_ptr (features.dropout_seeds). Queries q, q + 8
    and keys k, k + 8 (q % 16 < 8, k % 16 < 8) share one Philox-2x32 block, whose 16-bit
    half 2 * (q half) + (k half) each takes: the four elements a thread holds in the
    matrix-multiply layouts of either orientation, so the draw needs no shared memory
    (features.dropout_keep is the jnp twin; WORKSPACE_NOTES.md, "Dropout: one Philox
    block per four elements" and "Dropout: Philox-2x32")."""
    KEY_GROUPS: tl.constexpr = 8 * ((SEQ_K + 15) // 16)
    query_groups = (tl.arange(0, BLOCK_M // 2) + query_start // 2).to(tl.uint32)
    key_groups = (tl.arange(0, BLOCK_N // 2) + key_start // 2).to(tl.uint32)
    if KEYS_FIRST:  # the tile's orientation from the start: a transpose would cost a copy
        query_groups = query_groups[None, :]
        key_groups = key_groups[:, None]
    else:
        query_groups = query_groups[:, None]
        key_groups = key_groups[None, :]
    low = tl.mul(query_groups, KEY_GROUPS, sanitize_overflow=False)
    position = tl.add(low, key_groups, sanitize_overflow=False)
    key = tl.load(seeds_ptr + 2 * batch_head).to(tl.uint32, bitcast=True)
    stream = tl.load(seeds_ptr + 2 * batch_head + 1).to(tl.uint32, bitcast=True)
    if (SEQ_Q + 15) // 16 * 8 * KEY_GROUPS >= 2**32:  # the position's high word steps the key
        high = tl.math.umulhi(query_groups, KEY_GROUPS) + (position < low).to(tl.uint32)
        key = tl.add(key, tl.mul(high, _KEY_STEP, sanitize_overflow=False),
                     sanitize_overflow=False)
    words = _philox(position, stream, key)
    # four 16-bit draws: a word's high half is >= THRESHOLD iff the word is >= THRESHOLD << 16
    kept0 = tl.where((words[0] << 16) >= THRESHOLD << 16, SCALE, 0.0)
    kept1 = tl.where(words[0] >= THRESHOLD << 16, SCALE, 0.0)
    kept2 = tl.where((words[1] << 16) >= THRESHOLD << 16, SCALE, 0.0)
    kept3 = tl.where(words[1] >= THRESHOLD << 16, SCALE, 0.0)
    KEY_AXIS: tl.constexpr = 0 if KEYS_FIRST else 1
    low_queries = _alternate_eights(kept0, kept1, KEY_AXIS)
    high_queries = _alternate_eights(kept2, kept3, KEY_AXIS)
    return _alternate_eights(low_queries, high_queries, 1 - KEY_AXIS)


@triton.jit
def backward_lse(lse):
    """Base-2 logsumexp for the backward: a row that saw no key (lse -inf) gets +inf, so
    that its probabilities exp2(s - lse) are 0, not inf."""
    return tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E


@triton.jit
def store_bias_grad(dbias_ptr, dlogits, rows, cols, batch, head, MODE: tl.constexpr,
                    BIAS_LAYOUT: tl.constexpr, NUM_HEADS: tl.constexpr, SEQ_Q: tl.constexpr,
                    SEQ_K: tl.constexpr):
    """The bias gradient of one [rows, cols] tile of dlogits (1-D rows and cols), zero
    where masked. STORE writes it in the bias's dtype (the bias has every dim, and each
    element is visited once); ACCUMULATE adds it to an fp32 buffer of the bias's shape,
    summed first over the tile's broadcast rows or columns."""
    base = dense_base(dbias_ptr, batch, head, BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    _, _, query_stride, key_stride = _dense_strides(BIAS_LAYOUT, NUM_HEADS, SEQ_Q, SEQ_K)
    in_rows = rows < SEQ_Q
    in_cols = cols < SEQ_K
    if MODE == STORE:
        tl.store(base + rows[:, None] * query_stride + cols[None, :] * key_stride,
                 dlogits.to(dbias_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])
    elif MODE == ACCUMULATE:
        # rows and columns past the ends may hold values (clamped reads): not summed
        dlogits = tl.where(in_rows[:, None] & in_cols[None, :], dlogits, 0.0)
        if (_QUERIES & BIAS_LAYOUT) and (_KEYS & BIAS_LAYOUT):
            tl.atomic_add(base + rows[:, None] * query_stride + cols[None, :] * key_stride,
                          dlogits, mask=in_rows[:, None] & in_cols[None, :], sem="relaxed")
        elif _KEYS & BIAS_LAYOUT:
            tl.atomic_add(base + cols * key_stride, tl.sum(dlogits, 0), mask=in_cols,
                          sem="relaxed")
        elif _QUERIES & BIAS_LAYOUT:
            tl.atomic_add(base + rows * query_stride, tl.sum(dlogits, 1), mask=in_rows,
                          sem="relaxed")
        else:
            tl.atomic_add(base, tl.sum(tl.sum(dlogits, 1), 0), sem="relaxed")

