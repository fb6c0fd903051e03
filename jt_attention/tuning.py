"""Block sizes and autotuning for every kernel, in one place.

Each kernel has two lists of 1 to 4 `triton.Config`s: `h100`, each of them the
measured winner on at least one benchmark shape on the H100 (WORKSPACE_NOTES.md,
"Autotuning"), and `small_parts`, sized for 99 KB of shared memory (RTX 4090, sm_89;
compile-checked only, as no such card is here). Before a launch a `keep()` filter
(Triton tutorial 06) prunes them per device: parts with more than 99 KB try the
fitting `h100` configs, and fall back to `small_parts` where none fits (fp32
operands, say); 99 KB parts try only `small_parts`. `tests/test_compile.py` compiles
every kept config for sm_89 and sm_90 and checks the estimate below against the
compiler's figure.

Of the kept configs, a launch times those that won on the H100 for its shape class
(head-dim tile, and whether blocks are skipped: `tried_for` on each config), or all kept
ones where none of those fits (candidate_configs). jax-triton benchmarks them at the first
execution of each jit lowering and keeps the fastest; the autotune `key` plays no part
there. JT_ATTENTION_AUTOTUNE=all in the environment times every kept config;
JT_ATTENTION_AUTOTUNE=0 times none: each launch takes its first candidate (a faster
first call, for tests and short jobs).
"""

import os
from typing import Callable, NamedTuple

import triton

from jt_attention.kernels import (backward_preprocess, flash_backward, flash_forward,
                                  probs_matmul, split_kv_forward, two_pass_backward,
                                  two_pass_forward)

KIB = 1024
# Shared memory per block, by compute capability. Unknown parts get the smallest.
SHARED_MEMORY_BYTES = {"8.0": 163 * KIB, "8.6": 99 * KIB, "8.7": 163 * KIB,
                       "8.9": 99 * KIB, "9.0": 227 * KIB}
SMALLEST_SHARED_MEMORY_BYTES = 99 * KIB

# Width of the score tiles of the two-pass kernels: the tile statistics are laid
# out per TILE_N keys, so both launches must agree on it and it is not autotuned.
# 256 beat 128 on 8 of 9 large-head-dim shapes on the H100 (-3% on the seed workload).
SCORE_TILE_N = 256

# Head dims above 256: rows of up to this many keys are taken whole by one program,
# which finds the softmax (two_pass_forward._row_softmax_kernel) or sums the backward's
# delta itself (two_pass_backward._dscores_whole_rows_kernel). A 64 x 512 fp32 tile
# holds as many registers per thread (128 at 8 warps) as the tiled kernels' 128 x 256.
WHOLE_ROW_MAX_KEYS = 512

# Head dims above 256: the two-pass launches hold score-sized buffers (the softmax P
# and, backward, its gradient dS: plan.Problem.score_bytes_per_head). Past this many
# bytes they run over the batch·heads in chunks (plan.Problem.head_chunks), so their
# scratch stays within it, whatever the batch and head count. Chunks cost time (H100,
# B4 H32 S2048 D512 forward + backward: 8.18 ms in one chunk, 8.48 in two, 8.70 in
# eight; WORKSPACE_NOTES.md, "v11: head chunks"), so the budget is set where that
# shape, a training benchmark row, still runs whole.
SCORE_SCRATCH_BYTES = 2 << 30

# No config's BLOCK_M, BLOCK_N or BLOCK_R is smaller (tests/test_compile.py checks):
# it bounds the row blocks on a grid axis (plan.Problem.wide_indexing).
MIN_BLOCK_ROWS = 16

# Split-KV (decoding): up to this many query rows and from this many keys, the flash
# forward would run one program per batch·head; the keys are cut into slices of a
# multiple of SPLIT_KV_GRANULE (every BLOCK_N divides it), enough of them for about
# SPLIT_KV_TARGET_PROGRAMS programs (4 per SM on a 132-SM H100), and no slice shorter
# than SPLIT_KV_MIN_SLICE keys, where the combine step would start to cost more.
SPLIT_KV_MAX_Q = 16
SPLIT_KV_BLOCK_M = 16  # rows per split-KV program: (query head of a KV group, query) pairs
SPLIT_KV_MIN_K = 1024
SPLIT_KV_GRANULE = 128
SPLIT_KV_MIN_SLICE = 256
SPLIT_KV_TARGET_PROGRAMS = 528

# Flash kernel: the whole head dim sits in one tile, so it serves head dims up to
# this (by itemsize); wider rows take the two-pass kernels, whose shared memory
# does not grow with the head dim. fp32 stops at 64: its 3xTF32 dots stage
# operands through shared memory, and wider fp32 tiles no longer fit a 99 KB part.
FLASH_MAX_BLOCK_D = {2: 256, 4: 64}


def shared_memory_limit(compute_capability):
    return SHARED_MEMORY_BYTES.get(compute_capability, SMALLEST_SHARED_MEMORY_BYTES)


def _config(num_warps, num_stages, tried_for=None, **blocks):
    """A config; `tried_for`: the shape classes (shape_class) it is timed for
    (candidate_configs), those it won on the H100; None: wherever it fits."""
    config = triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)
    config.tried_for = tried_for
    return config


def _classes(*block_ds, masked=(False, True)):
    """Shape classes: these head-dim tiles, with and/or without skipped blocks."""
    return frozenset((block_d, m) for block_d in block_ds for m in masked)


def shape_class(footprint):
    """(head-dim tile, whether blocks are skipped): what the H100 winners were sorted by.
    Tiles under 64 count as 64."""
    return max(footprint.block_d, 64), footprint.masked


# Comments name the shapes each H100 config wins (WORKSPACE_NOTES.md, "Autotuning").
FLASH = dict(
    h100=[_config(8, 3, BLOCK_M=128, BLOCK_N=128,   # head dim 128, non-causal
                  tried_for=_classes(128, masked=[False])),
          _config(4, 3, BLOCK_M=64, BLOCK_N=64,     # head dim 64; causal 128 at S=8192
                  tried_for=_classes(64, 256) | _classes(128, masked=[True])),
          _config(8, 2, BLOCK_M=128, BLOCK_N=64,    # head dim 256
                  tried_for=_classes(256)),
          _config(8, 3, BLOCK_M=128, BLOCK_N=64,    # causal 128 at S=2048; 64 at S=8192;
                  tried_for=_classes(64, 128))],    # runner-up at 128 non-causal
    small_parts=[_config(8, 2, BLOCK_M=128, BLOCK_N=64),   # head dim <= 128
                 _config(4, 2, BLOCK_M=64, BLOCK_N=32),    # 512-byte rows (256 fp16, 128 fp32)
                 _config(4, 2, BLOCK_M=32, BLOCK_N=32)],   # the same with a bias and a mask
)
SPLIT_KV = dict(  # BLOCK_M 16: the smallest tl.dot tile
    h100=[_config(4, 3, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=128),   # 8 x 32 x 32768 keys
          _config(4, 3, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=64),    # 2 x 16 x 4 x 8192, D 64
          _config(4, 2, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=32)],   # the other five decode shapes
    small_parts=[_config(4, 2, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=64),
                 _config(4, 2, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=32)],  # head dim 256, fp32
)
SPLIT_KV_COMBINE = dict(
    h100=[_config(4, 1, BLOCK_M=16),    # six of seven decode shapes (ties within 1%)
          _config(2, 1, BLOCK_M=16)],   # 1 x 32 x 4096 keys
    small_parts=[_config(4, 1, BLOCK_M=16)],
)
SCORE_TILES = dict(
    h100=[_config(8, 4, BLOCK_M=128, BLOCK_K=64),    # seed; head dims 512 and 1024 (7 shapes)
          _config(8, 3, BLOCK_M=128, BLOCK_K=64)],   # 1 16 8192 512; 4 32 2048 1024 causal
    small_parts=[_config(4, 3, BLOCK_M=64, BLOCK_K=32),    # fp16, bf16
                 _config(4, 3, BLOCK_M=64, BLOCK_K=16)],   # fp32
)
ROW_SOFTMAX = dict(  # 16-bit inputs only (plan.Problem.whole_rows); ROW_KEYS is not tuned
    h100=[_config(8, 3, BLOCK_M=64, BLOCK_K=64)],   # seed (1.257 ms; K32 5 stages 1.535)
    small_parts=[_config(8, 2, BLOCK_M=64, BLOCK_K=32)],
)
WEIGHTED_VALUES = dict(
    # 8w3s D128 (the seed's winner until 2026-11-24) gave 5e-3 errors on the seed
    # workload on the H100 (Triton 3.6): not shipped there.
    h100=[_config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=256),   # 8 of 9 large shapes; seed causal
          _config(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_D=256)],  # seed
    small_parts=[_config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128),
                 _config(4, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128)],  # fp32
)


def _fp32_staging_bytes(rows, inner_block, itemsize, copies=2):
    """fp32 (3xTF32) dots stage an operand tile through shared memory; 16-bit dots do not."""
    return copies * rows * inner_block * itemsize if itemsize == 4 else 0


def _flash_shared_bytes(config, block_d, itemsize):
    blocks = config.kwargs
    # Q stays resident; K and V are multi-buffered num_stages deep.
    rows = blocks["BLOCK_M"] + 2 * blocks["BLOCK_N"] * config.num_stages
    return (rows * block_d * itemsize
            + _fp32_staging_bytes(blocks["BLOCK_M"], blocks["BLOCK_N"], itemsize))


def _combine_shared_bytes(config, block_d, itemsize):
    del block_d, itemsize
    return 8 * config.kwargs["BLOCK_M"]  # elementwise; at most per-row values change layout


def _score_tiles_shared_bytes(config, block_d, itemsize):
    del block_d  # the head dim is streamed in BLOCK_K chunks
    blocks = config.kwargs
    pipeline = (blocks["BLOCK_M"] + SCORE_TILE_N) * blocks["BLOCK_K"] * config.num_stages
    return (pipeline * itemsize
            # three copies at TILE_N 256 on sm_90 (compiler's figure)
            + _fp32_staging_bytes(blocks["BLOCK_M"], blocks["BLOCK_K"], itemsize, copies=3))


def _whole_rows_shared_bytes(config, block_d, itemsize):
    del block_d  # the head dim is streamed in BLOCK_K chunks
    blocks = config.kwargs
    pipeline = (blocks["BLOCK_M"] + WHOLE_ROW_MAX_KEYS) * blocks["BLOCK_K"] * config.num_stages
    # per-row fp32 maxima and sums cross warps through shared memory
    return pipeline * itemsize + 8 * blocks["BLOCK_M"]


def _weighted_values_shared_bytes(config, block_d, itemsize):
    del block_d  # the output is split into BLOCK_D chunks
    blocks = config.kwargs
    tile = blocks["BLOCK_N"] * (blocks["BLOCK_M"] + blocks["BLOCK_D"])
    # per-row fp32 vectors (tile max, 1 / l) change layout through shared memory
    row_weights = 12 * blocks["BLOCK_M"]
    return (tile * config.num_stages * itemsize + row_weights
            + _fp32_staging_bytes(blocks["BLOCK_M"], blocks["BLOCK_N"], itemsize))


OUTPUT_GRAD_DOT = dict(  # memory-bound
    h100=[_config(4, 1, BLOCK_M=32, BLOCK_D=128,    # seed; head dims 128, 256, 512
                  tried_for=_classes(128, 256, 512, 1024)),
          _config(4, 1, BLOCK_M=64, BLOCK_D=64, tried_for=_classes(64))],   # head dim 64
    small_parts=[_config(4, 1, BLOCK_M=32, BLOCK_D=128), _config(4, 1, BLOCK_M=64, BLOCK_D=64)],
)
# Backward, head dim <= 256. Key grads hold K, V, dK, dV for BLOCK_N keys and stream
# BLOCK_M queries; query grads hold Q, dO, dQ for BLOCK_M queries and stream keys.
FLASH_KEY_GRADS = dict(
    # Head dim 64 times every config here and in query grads: its winner moves with the
    # shape (bf16 B8 S2048 forward + backward: 1.371 ms with M32 N64 alone, 1.261 with all).
    h100=[_config(4, 2, BLOCK_M=64, BLOCK_N=64,     # head dim 128
                  tried_for=_classes(64) | _classes(128, masked=[False])),
          _config(8, 3, BLOCK_M=64, BLOCK_N=128,    # head dim 128 causal
                  tried_for=_classes(64) | _classes(128, masked=[True])),
          _config(8, 2, BLOCK_M=64, BLOCK_N=64, tried_for=_classes(64, 256)),   # head dim 256
          _config(4, 3, BLOCK_M=32, BLOCK_N=64, tried_for=_classes(64))],       # head dim 64
    small_parts=[_config(4, 2, BLOCK_M=64, BLOCK_N=64),
                 _config(4, 2, BLOCK_M=16, BLOCK_N=32)],   # head dim 256, fp32
)
FLASH_QUERY_GRADS = dict(
    h100=[_config(8, 3, BLOCK_M=128, BLOCK_N=64,    # head dims 64 and 128, causal or not
                  tried_for=_classes(64, 128)),
          _config(4, 2, BLOCK_M=64, BLOCK_N=64, tried_for=_classes(64, 256))],   # head dim 256
    small_parts=[_config(4, 2, BLOCK_M=64, BLOCK_N=32),    # head dim <= 128
                 _config(4, 2, BLOCK_M=32, BLOCK_N=32),    # head dim 256, fp32
                 _config(4, 2, BLOCK_M=16, BLOCK_N=32)],   # the same with a bias and a mask
)
# Backward, head dim > 256.
SCORE_GRADS = dict(
    h100=[_config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)],   # seed, head dim 512
    small_parts=[_config(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
                 _config(4, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)],   # fp32
)
DSCORES_FROM_PROBS = dict(
    h100=[_config(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)],   # seed, causal or not
    small_parts=[_config(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
                 _config(4, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)],   # fp32
)
DSCORES_WHOLE_ROWS = ROW_SOFTMAX  # the same loop; seed 1.482 ms (K32 5 stages 1.684)
PERSISTENT_BLOCKS = dict(BLOCK_R=128, BLOCK_C=64, BLOCK_D=256)  # of the persistent config
PROBS_MATMUL = dict(  # the forward's P.V (rows <= WHOLE_ROW_MAX_KEYS) and backward GEMMs
    # seed P.V 1.225 ms; R256 D128 1.263, R64 D512 1.390, C128 2 stages 1.536 (2026-11-24)
    h100=[_config(8, 4, **PERSISTENT_BLOCKS, PERSISTENT=1),  # seed P.V 1.190 ms vs 1.259 (v9b)
          _config(8, 4, BLOCK_R=128, BLOCK_C=64, BLOCK_D=256, PERSISTENT=0),   # seed
          _config(8, 3, BLOCK_R=128, BLOCK_C=64, BLOCK_D=256, PERSISTENT=0)],  # head dim 512
    small_parts=[_config(8, 3, BLOCK_R=128, BLOCK_C=64, BLOCK_D=128, PERSISTENT=0),
                 _config(4, 2, BLOCK_R=64, BLOCK_C=32, BLOCK_D=128, PERSISTENT=0)],   # fp32
)


def _output_grad_dot_shared_bytes(config, block_d, itemsize):
    del block_d, itemsize
    return 4 * config.kwargs["BLOCK_M"]  # at most a cross-warp row reduction


def _key_grads_shared_bytes(config, block_d, itemsize):
    blocks = config.kwargs
    resident = 2 * blocks["BLOCK_N"] * block_d  # K and V
    streamed = 2 * blocks["BLOCK_M"] * block_d * config.num_stages  # Q and dO
    # lse and delta, fp32, num_stages deep, plus one more row of each (seen at BLOCK_M 32)
    row_stats = 8 * blocks["BLOCK_M"] * (config.num_stages + 1)
    return ((resident + streamed) * itemsize + row_stats
            + _fp32_staging_bytes(blocks["BLOCK_N"], block_d, itemsize))


def _query_grads_shared_bytes(config, block_d, itemsize):
    blocks = config.kwargs
    resident = 2 * blocks["BLOCK_M"] * block_d  # Q and dO
    streamed = 2 * blocks["BLOCK_N"] * block_d * config.num_stages  # K and V
    return ((resident + streamed) * itemsize
            + _fp32_staging_bytes(blocks["BLOCK_M"], block_d, itemsize))


def _score_grads_shared_bytes(config, block_d, itemsize):
    del block_d  # the head dim is streamed in BLOCK_K chunks
    blocks = config.kwargs
    pipeline = 2 * (blocks["BLOCK_M"] + blocks["BLOCK_N"]) * blocks["BLOCK_K"] * config.num_stages
    return (pipeline * itemsize
            + 2 * _fp32_staging_bytes(blocks["BLOCK_M"], blocks["BLOCK_K"], itemsize))


def _dscores_from_probs_shared_bytes(config, block_d, itemsize):
    del block_d  # the head dim is streamed in BLOCK_K chunks
    blocks = config.kwargs
    pipeline = (blocks["BLOCK_M"] + blocks["BLOCK_N"]) * blocks["BLOCK_K"] * config.num_stages
    return (pipeline * itemsize
            + _fp32_staging_bytes(blocks["BLOCK_M"], blocks["BLOCK_K"], itemsize))


def _probs_matmul_shared_bytes(config, block_d, itemsize):
    del block_d  # the output is split into BLOCK_D chunks
    blocks = config.kwargs
    tile = blocks["BLOCK_C"] * (blocks["BLOCK_R"] + blocks["BLOCK_D"])
    # The persistent grid's flattened loop holds one more B block (sm_90, Triton 3.6).
    persistent = blocks["PERSISTENT"] * blocks["BLOCK_C"] * blocks["BLOCK_D"]
    # fp32: A is staged three times where it is transposed or masked (sm_90, Triton 3.9)
    return ((tile * config.num_stages + persistent) * itemsize
            + _fp32_staging_bytes(blocks["BLOCK_R"], blocks["BLOCK_C"], itemsize, copies=3))


class Footprint(NamedTuple):
    """What sets a launch's shared memory besides its config (plan.Problem.footprint)."""
    itemsize: int
    block_d: int
    score_bytes: int = 0   # bytes per score element of the bias and the mask
    masked: bool = False   # causal, a window, spans, segment ids or a mask
    tma: bool = False      # the flash kernels' TMA variant (plan.Problem.tma)
    dropout: bool = False  # attention dropout


# TMA loads complete on mbarriers in shared memory, a few per pipeline stage; the
# compiler's figure for the TMA variants (sm_90, Triton 3.9) was up to 24 bytes over
# the pointer variants' estimate.
TMA_BARRIER_BYTES = KIB


def _feature_slack(config, footprint):
    """Any kernel with features: their loads and predicates took up to 2 KB more (the score
    tiles on sm_89, Triton 3.6), and so did dropout's draw (the score tiles on sm_89,
    Triton 3.9)."""
    del config
    return 2 * KIB if footprint.score_bytes or footprint.masked or footprint.dropout else 0


def _streamed_scores_bytes(config, footprint):
    """Flash kernels: the pipeliner stages each step's bias and mask tiles in shared
    memory, num_stages deep (compiler's figure, sm_89 and sm_90: up to that, plus at most
    1 KB for the spans and segment ids)."""
    if not (footprint.score_bytes or footprint.masked):
        return 0
    blocks = config.kwargs
    return (config.num_stages * blocks["BLOCK_M"] * blocks["BLOCK_N"] * footprint.score_bytes
            + 2 * KIB)


def _fp32_select_bytes(config, footprint):
    """fp32 readers of P and dS: the select of the masked blocks stages one more copy of
    the fp32 tile (compiler's figure, sm_90: 8 KB for a 64 x 32 tile)."""
    if footprint.itemsize != 4 or not footprint.masked:
        return 0
    blocks = config.kwargs
    rows = blocks.get("BLOCK_M", blocks.get("BLOCK_R"))
    cols = blocks.get("BLOCK_N", blocks.get("BLOCK_C"))
    return rows * cols * 4 + KIB


class KernelTuning(NamedTuple):
    h100: list          # measured H100 winners; tried on parts with more than 99 KB
    small_parts: list   # for 99 KB parts, and wherever no h100 config fits
    shared_bytes: Callable  # (config, block_d, itemsize) -> estimated shared memory
    feature_bytes: Callable = _feature_slack  # what the features add to it

    def estimate(self, config, footprint):
        """Estimated shared memory of `config` for a launch of this footprint."""
        return (self.shared_bytes(config, footprint.block_d, footprint.itemsize)
                + self.feature_bytes(config, footprint)
                + (TMA_BARRIER_BYTES if footprint.tma else 0))

    @property
    def configs(self):
        """Every distinct config."""
        distinct = {str(c): c for c in self.small_parts + self.h100}
        return list(distinct.values())


KERNEL_TUNING = {
    flash_forward._flash_forward_kernel:
        KernelTuning(**FLASH, shared_bytes=_flash_shared_bytes,
                     feature_bytes=_streamed_scores_bytes),
    split_kv_forward._split_kv_kernel:
        KernelTuning(**SPLIT_KV, shared_bytes=_flash_shared_bytes,
                     feature_bytes=_streamed_scores_bytes),
    split_kv_forward._split_kv_combine_kernel:
        KernelTuning(**SPLIT_KV_COMBINE, shared_bytes=_combine_shared_bytes),
    two_pass_forward._score_tiles_kernel:
        KernelTuning(**SCORE_TILES, shared_bytes=_score_tiles_shared_bytes),
    two_pass_forward._row_softmax_kernel:
        KernelTuning(**ROW_SOFTMAX, shared_bytes=_whole_rows_shared_bytes),
    two_pass_forward._weighted_values_kernel:
        KernelTuning(**WEIGHTED_VALUES, shared_bytes=_weighted_values_shared_bytes,
                     feature_bytes=_fp32_select_bytes),
    two_pass_forward._weighted_values_keeping_probs_kernel:
        KernelTuning(**WEIGHTED_VALUES, shared_bytes=_weighted_values_shared_bytes,
                     feature_bytes=_fp32_select_bytes),
    backward_preprocess._output_grad_dot_kernel:
        KernelTuning(**OUTPUT_GRAD_DOT, shared_bytes=_output_grad_dot_shared_bytes),
    flash_backward._flash_key_grads_kernel:
        KernelTuning(**FLASH_KEY_GRADS, shared_bytes=_key_grads_shared_bytes,
                     feature_bytes=_streamed_scores_bytes),
    flash_backward._flash_query_grads_kernel:
        KernelTuning(**FLASH_QUERY_GRADS, shared_bytes=_query_grads_shared_bytes,
                     feature_bytes=_streamed_scores_bytes),
    two_pass_backward._score_grads_kernel:
        KernelTuning(**SCORE_GRADS, shared_bytes=_score_grads_shared_bytes),
    two_pass_backward._dscores_from_probs_kernel:
        KernelTuning(**DSCORES_FROM_PROBS, shared_bytes=_dscores_from_probs_shared_bytes),
    two_pass_backward._dscores_whole_rows_kernel:
        KernelTuning(**DSCORES_WHOLE_ROWS, shared_bytes=_whole_rows_shared_bytes),
    probs_matmul._probs_matmul_kernel:
        KernelTuning(**PROBS_MATMUL, shared_bytes=_probs_matmul_shared_bytes,
                     feature_bytes=_fp32_select_bytes),
}


def fitting_configs(kernel, compute_capability, footprint, persistent_grid=False):
    """The kernel's configs for this device whose estimated shared memory fits it, for a
    launch of this Footprint.

    persistent_grid: the launch runs a persistent grid for configs with PERSISTENT
    (plan: NUM_SMS > 0); without one those configs would repeat another, so they are
    left out."""
    tuning = KERNEL_TUNING[kernel]
    limit = shared_memory_limit(compute_capability)

    def keep(config):
        return ((persistent_grid or not config.kwargs.get("PERSISTENT"))
                and tuning.estimate(config, footprint) <= limit)

    kept = [c for c in tuning.h100 if keep(c)] if limit > SMALLEST_SHARED_MEMORY_BYTES else []
    kept = kept or [c for c in tuning.small_parts if keep(c)]
    if not kept:
        raise ValueError(f"no config of {kernel.__name__} fits {limit} bytes of shared memory "
                         f"({compute_capability=}, {footprint})")
    return kept


def candidate_configs(kernel, compute_capability, footprint, persistent_grid=False):
    """The fitting configs (fitting_configs) that autotuning times for this launch: those
    that won on the H100 for its shape class (shape_class), or every fitting one where
    none of those fits (a bias's tiles, say) or JT_ATTENTION_AUTOTUNE=all is set.

    Each config costs a new shape's first call its front end, compile, ptxas and timing
    runs (about half a second on the H100 machine): timing a class's winners only took
    the training step's first call at head dim 128 from 5.4 to 2.5 s (WORKSPACE_NOTES.md,
    "First call: candidates by shape class")."""
    fitting = fitting_configs(kernel, compute_capability, footprint, persistent_grid)
    if os.environ.get("JT_ATTENTION_AUTOTUNE") == "all":
        return fitting
    key = shape_class(footprint)
    tried = [c for c in fitting if c.tried_for is None or key in c.tried_for]
    return tried or fitting


def autotuned(kernel, compute_capability, footprint, persistent_grid=False):
    """`kernel` wrapped in `triton.autotune` over its candidate configs
    (candidate_configs).

    A fresh wrapper per trace, on purpose: jax-triton chains a new prune hook onto the
    Autotuner at every lowering, so a shared one would grow with every new shape.
    Compiled kernels are cached by jax-triton per JITFunction, so nothing recompiles."""
    configs = candidate_configs(kernel, compute_capability, footprint, persistent_grid)
    if os.environ.get("JT_ATTENTION_AUTOTUNE") == "0":
        configs = configs[:1]  # no benchmarking at the first call: the first candidate
    # The chunk's first head is the one scalar argument; jax-triton warns unless it is a key.
    key = [name for name in ("head_start",) if name in kernel.arg_names]
    return triton.autotune(configs=configs, key=key)(kernel)
