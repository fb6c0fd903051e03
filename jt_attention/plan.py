"""What the forward pass launches for a given problem: kernels, buffers, constexprs, grids.

The plan is data, so the jax-triton launcher (`launch.py`), the CPU interpreter
(`interpret.py`) and the compile-only test all run exactly the same launches.
"""

import dataclasses
import functools
import math
from typing import Callable

import numpy as np
import triton

from jt_attention import tuning
from jt_attention.features import Features, Operands, layout
from jt_attention.kernels import (backward_preprocess, flash_backward, flash_forward,
                                  masking, probs_matmul, split_kv_forward, two_pass_backward,
                                  two_pass_forward)


GRID_YZ_LIMIT = 65535  # CUDA's largest grid dims y and z
INT32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call. Arrays are [B, S, H, D] (or [B, H, S, D])."""
    batch: int
    seq_q: int
    seq_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype
    scale: float
    is_causal: bool
    heads_major: bool = False  # True for the [B, H, S, D] layout
    features: Features = Features()
    # The flash kernels address q, k, v, dO and their outputs through TMA tensor
    # descriptors (tiles.rows_source). Set by the launcher where asked for and the device
    # and the stack offer it (launch.tma_supported), and the problem allows it
    # (tma_eligible).
    tma: bool = False

    @property
    def tma_eligible(self):
        """Whether the flash kernels could use TMA here: descriptors need 16-byte
        aligned rows (head dim x item size a multiple of 16, which also aligns every
        (batch, head) base) and 32-bit offsets."""
        return (self.uses_flash_kernel and self.head_dim * self.itemsize % 16 == 0
                and not self.wide_indexing)

    @property
    def itemsize(self):
        return np.dtype(self.dtype).itemsize

    @property
    def block_d(self):
        return max(16, triton.next_power_of_2(self.head_dim))

    @property
    def footprint(self):
        """What sets the kernels' shared memory besides their configs (tuning.Footprint)."""
        features = self.features
        score_bytes = ((np.dtype(features.bias_dtype).itemsize if features.bias else 0)
                       + (1 if features.mask else 0))
        masked = bool(self.is_causal or features.window != (-1, -1) or features.spans
                      or features.segments or features.mask)
        return tuning.Footprint(self.itemsize, self.block_d, score_bytes, masked, self.tma,
                                bool(features.dropout_rate))

    @property
    def batch_inner(self):
        """Whether the flash kernels run the batch innermost (tiles.block_coords): where
        the batch shares a bias or mask (rows of it are then read by several programs at
        once, from L2), except causal problems, whose forward grid hands out the longest
        row blocks first."""
        features = self.features
        shared = any(shape and shape[0] == 1 for shape in (features.bias, features.mask))
        return shared and self.batch > 1 and not self.is_causal

    @property
    def uses_flash_kernel(self):
        return self.block_d <= tuning.FLASH_MAX_BLOCK_D[self.itemsize]

    @property
    def dot_precision(self):
        # fp32 inputs keep fp32 accuracy (about 1e-6) through 3xTF32 instead of 1xTF32.
        return "tf32x3" if np.dtype(self.dtype) == np.float32 else "tf32"

    def strides(self, seq, heads):
        """(batch, seq, head) strides in elements; the head dim is contiguous."""
        d = self.head_dim
        if self.heads_major:
            return heads * seq * d, d, seq * d
        return seq * heads * d, heads * d, d

    @property
    def keeps_probs(self):
        """Whether the two-pass forward, run for a backward pass, also writes the
        softmax P for it to keep.

        Only where P is no bigger than the output (kv_len <= head_dim, as on the seed
        workload): the residuals then stay O(B·H·S·D), and the backward skips
        recomputing Q.K^T over the whole head dim (a fifth of its FLOPs; 1.0 ms of
        7.4 on the seed workload, H100) and writing P itself. With a soft-cap the
        backward needs the logits themselves (the cap's derivative), and with dropout
        the kept P and the dropped P.dO differ, so both recompute."""
        return (not self.uses_flash_kernel and self.seq_k <= self.head_dim
                and not self.features.soft_cap and not self.features.dropout_rate)

    @property
    def whole_rows(self):
        """Whether the two-pass kernels take whole key rows per program (kernels
        two_pass_forward._row_softmax_kernel, two_pass_backward._dscores_whole_rows_kernel).
        16-bit inputs only: with fp32's 3xTF32 dots the sm_90 compile stages the whole
        64 x 512 fp32 tile through shared memory (up to 200 KB), and fp32 keeps the
        tiled kernels."""
        return (not self.uses_flash_kernel and self.seq_k <= tuning.WHOLE_ROW_MAX_KEYS
                and self.itemsize == 2)

    @property
    def padded_seq_k(self):
        """kv_len rounded up to whole score tiles: the longest row of a P or dS buffer."""
        return triton.cdiv(self.seq_k, tuning.SCORE_TILE_N) * tuning.SCORE_TILE_N

    @property
    def score_bytes_per_head(self):
        """Scratch of the two-pass launches per query head: two [q_len, kv_len] buffers
        (the backward's P and dS; the forward writes one), rows padded to score tiles."""
        return 2 * self.seq_q * self.padded_seq_k * self.itemsize

    @property
    def head_chunks(self):
        """[(first query head, heads)] of the batch·heads (flattened, batch-major) that
        the two-pass launches take in turn, so that their score-sized scratch stays
        within tuning.SCORE_SCRATCH_BYTES: O(B·H·S) memory plus a fixed budget rather
        than O(B·H·Sq·Sk). Chunks hold whole KV groups (dK and dV sum a group's heads)
        and are as even as that allows. One chunk where that scratch fits, for the flash
        kernels (none), and where the forward keeps P (no bigger than the output)."""
        heads = self.batch * self.num_heads
        group = self.num_heads // self.num_kv_heads
        groups_per_chunk = max(1, tuning.SCORE_SCRATCH_BYTES
                               // (group * self.score_bytes_per_head))
        if self.uses_flash_kernel or self.keeps_probs or groups_per_chunk * group >= heads:
            return [(0, heads)]
        num_chunks = triton.cdiv(heads // group, groups_per_chunk)
        chunk = triton.cdiv(heads // group, num_chunks) * group
        return [(start, min(chunk, heads - start)) for start in range(0, heads, chunk)]

    @property
    def kv_slices(self):
        """(slice length, number of slices) for the split-KV forward, or None.

        Decoding shapes only (few query rows, many keys), and only when the flash
        kernel's one program per batch·head would leave the GPU idle. Not with dropout:
        its mask is drawn per 16 x 16 block of one head's queries and keys
        (masking.dropout_multiplier), which split-KV's rows (several heads' queries
        packed) do not form."""
        if (not self.uses_flash_kernel or self.seq_q > tuning.SPLIT_KV_MAX_Q
                or self.seq_k < tuning.SPLIT_KV_MIN_K or self.features.dropout_rate):
            return None
        row_blocks = triton.cdiv(self.num_heads // self.num_kv_heads * self.seq_q,
                                 tuning.SPLIT_KV_BLOCK_M)
        programs = self.batch * self.num_kv_heads * row_blocks
        slices = min(triton.cdiv(tuning.SPLIT_KV_TARGET_PROGRAMS, programs),
                     self.seq_k // tuning.SPLIT_KV_MIN_SLICE)
        if slices < 2:
            return None
        granule = tuning.SPLIT_KV_GRANULE
        slice_len = triton.cdiv(triton.cdiv(self.seq_k, slices), granule) * granule
        return slice_len, triton.cdiv(self.seq_k, slice_len)

    @property
    def wide_indexing(self):
        """Whether the kernels need a 1-D grid and 64-bit batch·head offsets
        (kernels/tiles.py grid_coords): batch·heads or row blocks past CUDA's cap on
        grid dims y and z, or a buffer of 2**31 elements or more."""
        elements = self.batch * max(self.seq_q * self.num_heads,
                                    self.seq_k * self.num_kv_heads) * self.head_dim
        if not self.uses_flash_kernel:  # P or dS of the largest chunk
            chunk_heads = self.head_chunks[0][1]
            elements = max(elements, chunk_heads * self.seq_q * self.padded_seq_k)
        row_blocks = triton.cdiv(max(self.seq_q, self.seq_k), tuning.MIN_BLOCK_ROWS)
        return (max(self.batch * self.num_heads, row_blocks) > GRID_YZ_LIMIT
                or elements >= INT32_LIMIT)

    def flops(self):
        """Forward matmul FLOPs, halved for causal (as the peers count them)."""
        full = 4 * self.batch * self.num_heads * self.seq_q * self.seq_k * self.head_dim
        return full / 2 if self.is_causal else full


@dataclasses.dataclass(frozen=True)
class Buffer:
    """An array a launch writes; `zeroed`: the launchers zero it first (atomic sums)."""
    name: str
    shape: tuple
    dtype: np.dtype
    zeroed: bool = False


@dataclasses.dataclass(frozen=True)
class Unwritten:
    """The input slot of an output that a chunk's launch updates in place, where no
    earlier chunk wrote it: the launchers pass a one-element array of this dtype,
    which the kernel never reads."""
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: reads `inputs`, writes `outputs` (Buffers).

    Inputs are buffer names, ints (a chunk's first head: Problem.head_chunks) or
    Unwritten slots, in the kernel's argument order. An output named like one of the
    inputs is updated in place: earlier chunks wrote the rest of it.
    after_previous: set on every launch but the first of a plan of several chunks; the
    jax-triton launcher orders it after the previous launch, as XLA could otherwise
    interleave the chunks and keep several chunks' scratch alive at once.
    metaparams: the constexprs offered; the launch keeps those the kernel takes."""
    kernel: triton.JITFunction
    inputs: tuple
    outputs: tuple  # of Buffer
    grid: Callable[[dict], tuple]  # metaparams (with the config's blocks) -> grid
    metaparams: dict
    after_previous: bool = False

    def __post_init__(self):
        taken = set(self.kernel.arg_names)
        object.__setattr__(self, "metaparams",
                           {k: v for k, v in self.metaparams.items() if k in taken})

    @property
    def zeroed_outputs(self):
        """Indices of the outputs to zero before the launch (not those updated in place)."""
        return tuple(i for i, b in enumerate(self.outputs)
                     if b.zeroed and b.name not in self.inputs)

    @property
    def has_persistent_grid(self):
        """Configs with PERSISTENT get a persistent grid (see _persistent_programs)."""
        return self.metaparams.get("NUM_SMS", 0) > 0

    @property
    def in_place(self):
        """Names of the outputs this launch updates in place."""
        return tuple(b.name for b in self.outputs if b.name in self.inputs)

    def arguments(self, buffers, unwritten):
        """The inputs as kernel arguments: buffers[name], ints as they are, and
        unwritten(dtype) for an Unwritten slot."""
        return [buffers[x] if isinstance(x, str) else
                unwritten(x.dtype) if isinstance(x, Unwritten) else x for x in self.inputs]


def _in_place(start, buffer):
    """The input slot of `buffer`, an output of the chunk from head `start` on."""
    return buffer.name if start else Unwritten(buffer.dtype)


def _in_chunks(p, chunk_launches):
    """chunk_launches(start, heads) for each of p.head_chunks, in turn."""
    first, *rest = [launch for start, heads in p.head_chunks
                    for launch in chunk_launches(start, heads)]
    if len(p.head_chunks) > 1:
        rest = [dataclasses.replace(launch, after_previous=True) for launch in rest]
    return [first, *rest]


def _common_constexprs(p):
    """Sizes, the masks and score modifiers (kernels/masking.py), and code choices; each
    launch keeps those its kernel takes."""
    features = p.features
    return dict(IS_CAUSAL=p.is_causal, SEQ_Q=p.seq_q, SEQ_K=p.seq_k, NUM_HEADS=p.num_heads,
                KV_GROUP=p.num_heads // p.num_kv_heads, HEAD_DIM=p.head_dim,
                WINDOW_LEFT=features.window[0], WINDOW_RIGHT=features.window[1],
                SOFT_CAP=features.soft_cap, BIAS_LAYOUT=layout(features.bias),
                MASK_LAYOUT=layout(features.mask), SEGMENTS=features.segments,
                SPANS=layout(features.spans + (1, 1) if features.spans else ()),
                BIAS_GRAD=bias_grad_mode(p), BATCH_INNER=p.batch_inner,
                DROPOUT_THRESHOLD=features.dropout_threshold,
                DROPOUT_SCALE=1.0 / (1.0 - features.dropout_rate),
                BATCH=p.batch if p.batch_inner else 1,  # unused otherwise: no recompiles
                DOT_PRECISION=p.dot_precision, WIDE_INDEXING=p.wide_indexing, TMA=p.tma)


# The feature operands (features.Operands), in the order the kernels that walk keys
# (SCORE_INPUTS) and those that walk queries (FEATURE_INPUTS: all of them) take them.
FEATURE_INPUTS = Operands.NAMES
SCORE_INPUTS = tuple(name for name in FEATURE_INPUTS if name != "query_spans")
BIAS_STORE, BIAS_ACCUMULATE = 1, 2  # kernels/masking.py STORE, ACCUMULATE


def bias_grad_mode(p):
    """0 without a bias gradient; BIAS_STORE where the bias has every dim of the scores
    (each element has one producer); else BIAS_ACCUMULATE, fp32 atomic sums over the
    broadcast dims."""
    features = p.features
    if not features.bias_grad:
        return 0
    full = (p.batch, p.num_heads, p.seq_q, p.seq_k)
    return BIAS_STORE if tuple(features.bias) == full else BIAS_ACCUMULATE


def bias_grad_buffer(p):
    """The "dbias" output: the bias's shape, in its dtype (or fp32 to accumulate in),
    zeroed first, as the kernels write only the blocks that something sees. A
    one-element placeholder without a bias gradient."""
    mode = bias_grad_mode(p)
    if not mode:
        return Buffer("dbias", (1,), np.dtype(np.float32))
    dtype = p.features.bias_dtype if mode == BIAS_STORE else np.dtype(np.float32)
    return Buffer("dbias", tuple(p.features.bias), np.dtype(dtype), zeroed=True)


def _grid(p, fast, middle, slow):
    """(fast, middle, slow) programs, or as many on one axis (kernels/tiles.py grid_coords)."""
    return (fast * middle * slow,) if p.wide_indexing else (fast, middle, slow)


def _tile_grid(p, block_m, block_n, heads):
    """The grid of the kernels that take one score tile each: masking.tile_slots
    programs for each block of block_m query rows of `heads` batch·heads."""
    slots = masking.tile_slots(p.seq_k, block_m, block_n, p.is_causal, *p.features.window)
    return _grid(p, slots, triton.cdiv(p.seq_q, block_m), heads)


def _flash_grid(p, blocks, heads):
    """`blocks` programs for each batch·head (`heads` per batch element), with the batch
    innermost where Problem.batch_inner (kernels/tiles.py block_coords)."""
    if p.batch_inner:
        return _grid(p, blocks * p.batch, 1, heads)
    return _grid(p, blocks, 1, p.batch * heads)


QUERY_SHAPED = ("Q", "O", "DO")  # the rest ("K", "V") are key-shaped


def _stride_constexprs(p, *tensors, rename=None):
    """STRIDE_{X}B/S/H for each tensor X; `rename` maps a tensor to the kernel's name."""
    strides = {}
    for x in tensors:
        seq, heads = (p.seq_q, p.num_heads) if x in QUERY_SHAPED else (p.seq_k, p.num_kv_heads)
        name = (rename or {}).get(x, x)
        strides.update(zip((f"STRIDE_{name}B", f"STRIDE_{name}S", f"STRIDE_{name}H"),
                           p.strides(seq, heads)))
    return strides


def _output_buffers(p):
    out = Buffer("out", _layout_shape(p, p.seq_q, p.num_heads), np.dtype(p.dtype))
    lse = Buffer("lse", (p.batch, p.num_heads, p.seq_q), np.dtype(np.float32))
    return out, lse


def _layout_shape(p, seq, heads):
    if p.heads_major:
        return (p.batch, heads, seq, p.head_dim)
    return (p.batch, seq, heads, p.head_dim)


def _flash_plan(p):
    metaparams = dict(SCALE=p.scale, BLOCK_D=p.block_d, **_common_constexprs(p),
                      **_stride_constexprs(p, "Q", "K", "V", "O"))
    grid = lambda meta: _flash_grid(p, triton.cdiv(p.seq_q, meta["BLOCK_M"]), p.num_heads)
    return [Launch(flash_forward._flash_forward_kernel, ("q", "k", "v") + SCORE_INPUTS,
                   _output_buffers(p), grid, metaparams)]


def _split_kv_plan(p):
    slice_len, slices = p.kv_slices
    batch_heads = p.batch * p.num_heads
    split = Launch(
        split_kv_forward._split_kv_kernel, ("q", "k", "v") + SCORE_INPUTS,
        (Buffer("partial_out", (batch_heads, slices, p.seq_q, p.block_d), np.dtype(np.float32)),
         Buffer("partial_lse", (batch_heads, slices, p.seq_q), np.dtype(np.float32))),
        lambda meta: _grid(p, slices, triton.cdiv(p.num_heads // p.num_kv_heads * p.seq_q,
                                                  meta["BLOCK_M"]), p.batch * p.num_kv_heads),
        dict(SCALE=p.scale, BLOCK_D=p.block_d, SPLIT_LEN=slice_len, NUM_SPLITS=slices,
             **_common_constexprs(p), **_stride_constexprs(p, "Q", "K", "V")))
    combine = Launch(
        split_kv_forward._split_kv_combine_kernel, ("partial_out", "partial_lse"),
        _output_buffers(p),
        lambda meta: _grid(p, triton.cdiv(p.seq_q, meta["BLOCK_M"]), 1, batch_heads),
        dict(SEQ_Q=p.seq_q, NUM_HEADS=p.num_heads, HEAD_DIM=p.head_dim, BLOCK_D=p.block_d,
             NUM_SPLITS=slices, WIDE_INDEXING=p.wide_indexing, **_stride_constexprs(p, "O")))
    return [split, combine]


def _score_tile_buffers(p, tile_n, heads):
    """Probabilities exp2(s - m_t) per TILE_N keys, and their row max m_t and row sum,
    for a chunk of `heads` query heads."""
    num_tiles = triton.cdiv(p.seq_k, tile_n)
    stats_shape = (heads, num_tiles, p.seq_q)
    return (Buffer("tile_probs", (heads, p.seq_q, num_tiles * tile_n), np.dtype(p.dtype)),
            Buffer("tile_max", stats_shape, np.dtype(np.float32)),
            Buffer("tile_sum", stats_shape, np.dtype(np.float32)))


def _heads_shape(p, heads):
    """Leading dims of a per-head buffer of a chunk: [batch, num_heads] for the whole
    problem (the kept P is a residual, which jax.vmap folds along the batch), else
    [heads]."""
    return (p.batch, p.num_heads) if heads == p.batch * p.num_heads else (heads,)


def _probs_buffer(p, name, heads):
    """Probabilities or their gradients of a chunk of `heads` query heads, [.., Sq, Sk]
    in the input dtype; rows padded to whole 16-byte vectors."""
    return Buffer(name, _heads_shape(p, heads) + (p.seq_q, _probs_stride(p)), np.dtype(p.dtype))


def _row_keys(p):
    """Keys per program of the whole-row kernels: kv_len rounded up to a power of two."""
    return max(16, triton.next_power_of_2(p.seq_k))


def _whole_row_launches(p, start, heads, num_sms):
    """Problem.whole_rows: the softmax P of whole rows
    (always written: a backward pass keeps it), then O = P.V."""
    out, lse = _output_buffers(p)
    softmax = Launch(
        two_pass_forward._row_softmax_kernel,
        ("q", "k") + SCORE_INPUTS + (start, _in_place(start, lse)),
        (_probs_buffer(p, "probs", heads), lse),
        lambda meta: _grid(p, triton.cdiv(p.seq_q, meta["BLOCK_M"]), 1, heads),
        dict(SCALE=p.scale, PROBS_STRIDE=_probs_stride(p), ROW_KEYS=_row_keys(p),
             **_common_constexprs(p), **_stride_constexprs(p, "Q", "K")))
    return [softmax, _probs_matmul_launch(p, "probs", "v", out, 1.0, num_sms, start, heads)]


def _tiled_launches(p, start, heads, tile_n, keep_probs):
    """Score tiles, then their values; keep_probs as in _two_pass_plan (one chunk)."""
    scores = Launch(
        two_pass_forward._score_tiles_kernel, ("q", "k") + SCORE_INPUTS + (start,),
        _score_tile_buffers(p, tile_n, heads),
        lambda meta: _tile_grid(p, meta["BLOCK_M"], tile_n, heads),
        dict(SCALE=p.scale, TILE_N=tile_n, **_common_constexprs(p),
             **_stride_constexprs(p, "Q", "K")))
    tiles = ("tile_probs", "tile_max", "tile_sum", "v", "key_spans")
    out, lse = _output_buffers(p)
    if keep_probs:
        kernel, inputs = two_pass_forward._weighted_values_keeping_probs_kernel, tiles
        outputs = (out, lse, _probs_buffer(p, "probs", heads))
    else:
        kernel, outputs = two_pass_forward._weighted_values_kernel, (out, lse)
        inputs = tiles + (start, _in_place(start, out), _in_place(start, lse))
    values = Launch(
        kernel, inputs, outputs,
        lambda meta: _grid(p, triton.cdiv(p.head_dim, meta["BLOCK_D"]) + keep_probs,
                           triton.cdiv(p.seq_q, meta["BLOCK_M"]), heads),
        dict(TILE_N=tile_n, **_common_constexprs(p), **_stride_constexprs(p, "V", "O"),
             **(dict(PROBS_STRIDE=_probs_stride(p)) if keep_probs else {})))
    return [scores, values]


def _two_pass_plan(p, tile_n, keep_probs, num_sms):
    """keep_probs: the values launch also writes the softmax P (Problem.keeps_probs)."""
    def chunk_launches(start, heads):
        if p.whole_rows:
            return _whole_row_launches(p, start, heads, num_sms)
        return _tiled_launches(p, start, heads, tile_n, keep_probs)
    return _in_chunks(p, chunk_launches)


FORWARD_OUTPUTS = ("out", "lse")


def kept_buffers(p):
    """Forward buffers the backward reads besides q, k, v, out and lse (Problem.keeps_probs)."""
    return ("probs",) if p.keeps_probs else ()


def forward_outputs(p, for_backward):
    """What a forward pass returns: FORWARD_OUTPUTS, then kept_buffers(p) for a backward."""
    return FORWARD_OUTPUTS + (kept_buffers(p) if for_backward else ())


# JT_ATTENTION_TMA=1 makes the flash kernels run their TMA variant, on an sm_90 GPU with
# jax-triton >= 0.4 or in the interpreter (launch.tma_supported, interpret._with_tma).
TMA_ENVIRONMENT = "JT_ATTENTION_TMA"


def with_tma(p, supported):
    """p with `tma` set where the device and the stack support TMA (`supported`) and the
    problem allows it (Problem.tma_eligible)."""
    return dataclasses.replace(p, tma=bool(supported) and p.tma_eligible)


def forward_plan(p, for_backward=False, score_tile_n=tuning.SCORE_TILE_N, num_sms=0):
    """The launches of the forward pass; they write FORWARD_OUTPUTS, and kept_buffers(p)
    too if `for_backward`. num_sms: the GPU's SM count, for persistent grids (0: none)."""
    if p.kv_slices:
        return _split_kv_plan(p)
    if p.uses_flash_kernel:
        return _flash_plan(p)
    return _two_pass_plan(p, score_tile_n, for_backward and p.keeps_probs, num_sms)


# Backward: buffers "q", "k", "v", the feature operands, "out", "lse" and
# kept_buffers(p) (forward residuals), "dout" and "dlse" (cotangents) in; "dq", "dk",
# "dv" out, shaped and typed like q, k and v, and "dbias" (bias_grad_buffer).

def backward_inputs(p):
    return (("q", "k", "v") + FEATURE_INPUTS + FORWARD_OUTPUTS + kept_buffers(p)
            + ("dout", "dlse"))


def backward_outputs(p):
    return ("dq", "dk", "dv") + (("dbias",) if bias_grad_mode(p) else ())


def _grad_buffers(p, *names):
    shapes = {"dq": _layout_shape(p, p.seq_q, p.num_heads),
              "dk": _layout_shape(p, p.seq_k, p.num_kv_heads),
              "dv": _layout_shape(p, p.seq_k, p.num_kv_heads)}
    return tuple(Buffer(name, shapes[name], np.dtype(p.dtype)) for name in names)


def _delta_buffer(p, heads):
    return Buffer("delta", _heads_shape(p, heads) + (p.seq_q,), np.dtype(np.float32))


def _delta_launch(p, start, heads):
    return Launch(
        backward_preprocess._output_grad_dot_kernel, ("out", "dout", "dlse", start),
        (_delta_buffer(p, heads),),
        lambda meta: _grid(p, triton.cdiv(p.seq_q, meta["BLOCK_M"]), 1, heads),
        dict(SEQ_Q=p.seq_q, NUM_HEADS=p.num_heads, HEAD_DIM=p.head_dim,
             WIDE_INDEXING=p.wide_indexing, **_stride_constexprs(p, "O", "DO")))


def _flash_backward_plan(p):
    """Query grads first: it also writes delta, which the key grads read."""
    metaparams = dict(SCALE=p.scale, BLOCK_D=p.block_d, **_common_constexprs(p),
                      **_stride_constexprs(p, "Q", "K", "V", "DO"))
    query_grads = Launch(
        flash_backward._flash_query_grads_kernel,
        ("q", "k", "v", "out", "dout", "lse", "dlse") + SCORE_INPUTS,
        _grad_buffers(p, "dq") + (_delta_buffer(p, p.batch * p.num_heads), bias_grad_buffer(p)),
        lambda meta: _flash_grid(p, triton.cdiv(p.seq_q, meta["BLOCK_M"]), p.num_heads),
        dict(metaparams, **_stride_constexprs(p, "O")))
    key_grads = Launch(
        flash_backward._flash_key_grads_kernel,
        ("q", "k", "v", "dout", "lse", "delta") + FEATURE_INPUTS,
        _grad_buffers(p, "dk", "dv"),
        lambda meta: _flash_grid(p, triton.cdiv(p.seq_k, meta["BLOCK_N"]), p.num_kv_heads),
        metaparams)
    return [query_grads, key_grads]


def _probs_matmul_launch(p, a, b, out, out_scale, num_sms, start, heads):
    """out = out_scale * A'.b for the chunk of `heads` query heads from `start` on, where
    A' is `a` ("probs" or "dscores") or, for the key gradients, its transpose; `out` is
    a Buffer. See _persistent_programs."""
    transpose_a = out.name in ("dk", "dv")
    rows = p.seq_k if transpose_a else p.seq_q
    out_heads = heads // (p.num_heads // p.num_kv_heads) if transpose_a else heads
    b_tensor = {"dout": "DO", "q": "Q", "k": "K", "v": "V"}[b]
    out_like = "K" if transpose_a else "Q"
    programs = 0 if transpose_a else _persistent_programs(p, num_sms)

    def grid(meta):
        tiles = (triton.cdiv(p.head_dim, meta["BLOCK_D"]), triton.cdiv(rows, meta["BLOCK_R"]),
                 out_heads)
        if meta["PERSISTENT"] and programs:
            return (min(math.prod(tiles), programs),)
        return _grid(p, *tiles)

    return Launch(
        probs_matmul._probs_matmul_kernel,
        (a, b, "key_spans", "query_spans", start, _in_place(start, out)), (out,), grid,
        dict(OUT_SCALE=out_scale, TRANSPOSE_A=transpose_a, PROBS_STRIDE=_probs_stride(p),
             CHUNK_OUT_HEADS=out_heads, NUM_SMS=programs, **_common_constexprs(p),
             **_stride_constexprs(p, b_tensor, rename={b_tensor: "B"}),
             **_stride_constexprs(p, out_like, rename={out_like: "O"})))


def _persistent_programs(p, num_sms):
    """Programs of the persistent grid for O = P.V and dQ = dS.K (configs with
    PERSISTENT), or 0 where none applies: num_sms = 0, rows of unequal length (causal,
    a window or spans), and rows, keys or head dims that the persistent config's
    blocks do not divide (their masked loops, flattened, took 16-48 KB more shared
    memory than the config and spilled on sm_90: WORKSPACE_NOTES.md, "v9b")."""
    blocks = tuning.PERSISTENT_BLOCKS
    features = p.features
    uniform_rows = not (p.is_causal or features.window != (-1, -1) or features.spans)
    plain = uniform_rows and not (p.seq_q % blocks["BLOCK_R"] or p.seq_k % blocks["BLOCK_C"]
                                  or p.head_dim % blocks["BLOCK_D"])
    return num_sms if plain else 0


def _probs_stride(p):
    """Row stride of the P and dS buffers: whole 16-byte vectors per row."""
    return triton.cdiv(p.seq_k, 8) * 8


def _score_grads_launches(p, start, heads):
    """dS for every visible score tile of a chunk: from the forward's P where it was
    kept (whole rows, or tiles after a delta launch; one chunk); else P is recomputed
    and written too."""
    constexprs = dict(PROBS_STRIDE=_probs_stride(p), **_common_constexprs(p),
                      **_stride_constexprs(p, "V", "DO"))
    dbias = bias_grad_buffer(p)
    dbias_slot = _in_place(start, dbias)
    outputs = (_probs_buffer(p, "dscores", heads), dbias)
    if p.keeps_probs and p.whole_rows:
        return [Launch(two_pass_backward._dscores_whole_rows_kernel,
                       ("v", "dout", "probs", "dlse", "key_spans", dbias_slot), outputs,
                       lambda meta: _grid(p, triton.cdiv(p.seq_q, meta["BLOCK_M"]), 1, heads),
                       dict(ROW_KEYS=_row_keys(p), **constexprs))]
    grid = lambda meta: _tile_grid(p, meta["BLOCK_M"], meta["BLOCK_N"], heads)
    if p.keeps_probs:
        score_grads = Launch(two_pass_backward._dscores_from_probs_kernel,
                             ("v", "dout", "probs", "delta", "key_spans", dbias_slot), outputs,
                             grid, constexprs)
    else:
        score_grads = Launch(two_pass_backward._score_grads_kernel,
                             ("q", "k", "v", "dout", "lse", "delta") + SCORE_INPUTS
                             + (start, dbias_slot),
                             (_probs_buffer(p, "probs", heads),) + outputs, grid,
                             dict(SCALE=p.scale, **constexprs, **_stride_constexprs(p, "Q", "K")))
    return [_delta_launch(p, start, heads), score_grads]


def _two_pass_backward_chunk(p, start, heads, num_sms):
    dq, dk, dv = _grad_buffers(p, "dq", "dk", "dv")
    gemm = functools.partial(_probs_matmul_launch, p, num_sms=num_sms, start=start, heads=heads)
    return _score_grads_launches(p, start, heads) + [gemm("probs", "dout", dv, 1.0),
                                                     gemm("dscores", "q", dk, p.scale),
                                                     gemm("dscores", "k", dq, p.scale)]


def backward_plan(p, num_sms=0):
    """The launches of the backward pass; together they write "dq", "dk" and "dv".
    num_sms as in forward_plan."""
    if p.uses_flash_kernel:
        return _flash_backward_plan(p)
    return _in_chunks(p, lambda start, heads: _two_pass_backward_chunk(p, start, heads, num_sms))
