"""Block sizes and autotuning for every kernel, in one place.

Each kernel has 2 to 4 `triton.Config`s. Before a launch a `keep()` filter
(Triton tutorial 06) prunes them to those whose shared memory fits the device, so
a 99 KB part (RTX 4090, sm_89) never launches a config tuned for the H100's 227 KB.
`tests/test_compile.py` compiles every kept config for sm_89 and sm_90 and checks
the estimate below against the compiler's figure.

jax-triton benchmarks the kept configs at the first execution of each jit lowering
and keeps the fastest (GUIDE.md 3c); the autotune `key` plays no part there.
"""

import triton

from jt_attention.kernels import (backward_preprocess, flash_backward, flash_forward,
                                  split_kv_forward, two_pass_backward, two_pass_forward)

KIB = 1024
# Shared memory per block, by compute capability. Unknown parts get the smallest.
SHARED_MEMORY_BYTES = {"8.0": 163 * KIB, "8.6": 99 * KIB, "8.7": 163 * KIB,
                       "8.9": 99 * KIB, "9.0": 227 * KIB}
SMALLEST_SHARED_MEMORY_BYTES = 99 * KIB

# Width of the score tiles of the two-pass kernels: the tile statistics are laid
# out per TILE_N keys, so both launches must agree on it and it is not autotuned.
SCORE_TILE_N = 128

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


def _config(num_warps, num_stages, **blocks):
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


# Each config is the measured winner for the shapes in its comment (WORKSPACE_NOTES.md).
FLASH_CONFIGS = [
    _config(8, 3, BLOCK_M=128, BLOCK_N=128),  # H100: head dim 128, non-causal
    _config(4, 3, BLOCK_M=64, BLOCK_N=64),    # H100: head dim 64; causal 128
    _config(8, 2, BLOCK_M=128, BLOCK_N=64),   # H100: head dim 256; 99 KB parts: head dim <= 128
    _config(4, 2, BLOCK_M=64, BLOCK_N=32),    # 99 KB parts: 512-byte rows (256 fp16, 128 fp32)
]
SPLIT_KV_CONFIGS = [  # BLOCK_M 16: the smallest tl.dot tile
    _config(4, 3, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=128),
    _config(4, 3, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=64),
    _config(4, 2, BLOCK_M=SPLIT_KV_BLOCK_M, BLOCK_N=32),  # 99 KB parts: head dim 256, fp32
]
SPLIT_KV_COMBINE_CONFIGS = [
    _config(4, 1, BLOCK_M=16),
    _config(2, 1, BLOCK_M=16),
]
SCORE_TILES_CONFIGS = [
    _config(8, 3, BLOCK_M=128, BLOCK_K=64),   # H100: seed workload
    _config(4, 3, BLOCK_M=128, BLOCK_K=64),   # H100: head dim 512
    _config(4, 3, BLOCK_M=64, BLOCK_K=32),    # 99 KB parts, any dtype
]
WEIGHTED_VALUES_CONFIGS = [
    _config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=256),  # H100: seed workload, head dim 512
    _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_D=256),   # H100: fewer rows per program
    _config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128),  # 99 KB parts
    _config(4, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128),   # 99 KB parts, fp32
]


def _fp32_staging_bytes(rows, inner_block, itemsize):
    """fp32 (3xTF32) dots stage an operand tile through shared memory; 16-bit dots do not."""
    return 2 * rows * inner_block * itemsize if itemsize == 4 else 0


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
            + _fp32_staging_bytes(blocks["BLOCK_M"], blocks["BLOCK_K"], itemsize))


def _weighted_values_shared_bytes(config, block_d, itemsize):
    del block_d  # the output is split into BLOCK_D chunks
    blocks = config.kwargs
    tile = blocks["BLOCK_N"] * (blocks["BLOCK_M"] + blocks["BLOCK_D"])
    row_weights = 8 * blocks["BLOCK_M"]  # the per-row rescale changes layout through shared memory
    return (tile * config.num_stages * itemsize + row_weights
            + _fp32_staging_bytes(blocks["BLOCK_M"], blocks["BLOCK_N"], itemsize))


OUTPUT_GRAD_DOT_CONFIGS = [
    _config(4, 1, BLOCK_M=32, BLOCK_D=128),   # H100: seed workload, head dim 512 (memory-bound)
    _config(4, 1, BLOCK_M=64, BLOCK_D=64),    # H100: second, within 8%
]
# Backward, head dim <= 256. Key grads hold K, V, dK, dV for BLOCK_N keys and stream
# BLOCK_M queries; query grads hold Q, dO, dQ for BLOCK_M queries and stream keys.
FLASH_KEY_GRADS_CONFIGS = [
    _config(4, 2, BLOCK_M=64, BLOCK_N=64),    # H100: head dim 128
    _config(8, 3, BLOCK_M=64, BLOCK_N=128),   # H100: head dim 128 causal
    _config(8, 2, BLOCK_M=64, BLOCK_N=64),    # H100: head dim 256
    _config(4, 2, BLOCK_M=16, BLOCK_N=32),    # 99 KB parts: head dim 256, fp32
]
FLASH_QUERY_GRADS_CONFIGS = [
    _config(8, 3, BLOCK_M=128, BLOCK_N=64),   # H100: head dims 64 and 128, causal or not
    _config(4, 2, BLOCK_M=64, BLOCK_N=64),    # H100: head dim 256
    _config(4, 2, BLOCK_M=64, BLOCK_N=32),    # 99 KB parts: head dim <= 128
    _config(4, 2, BLOCK_M=32, BLOCK_N=32),    # 99 KB parts: head dim 256, fp32
]
# Backward, head dim > 256.
SCORE_GRADS_CONFIGS = [
    _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),  # H100: seed workload, head dim 512
    _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),  # H100: second at head dim 512
    _config(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),    # 99 KB parts
    _config(4, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32),    # 99 KB parts, fp32
]
PROBS_MATMUL_CONFIGS = [
    _config(8, 3, BLOCK_R=128, BLOCK_C=64, BLOCK_D=128),  # H100: seed workload; 99 KB parts
    _config(8, 3, BLOCK_R=128, BLOCK_C=64, BLOCK_D=256),  # H100: head dim 512
    _config(4, 2, BLOCK_R=64, BLOCK_C=32, BLOCK_D=128),   # 99 KB parts, fp32
]


def _output_grad_dot_shared_bytes(config, block_d, itemsize):
    del block_d, itemsize
    return 4 * config.kwargs["BLOCK_M"]  # at most a cross-warp row reduction


def _key_grads_shared_bytes(config, block_d, itemsize):
    blocks = config.kwargs
    resident = 2 * blocks["BLOCK_N"] * block_d  # K and V
    streamed = 2 * blocks["BLOCK_M"] * block_d * config.num_stages  # Q and dO
    row_stats = 8 * blocks["BLOCK_M"] * config.num_stages  # lse and delta, fp32
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


def _probs_matmul_shared_bytes(config, block_d, itemsize):
    del block_d  # the output is split into BLOCK_D chunks
    blocks = config.kwargs
    tile = blocks["BLOCK_C"] * (blocks["BLOCK_R"] + blocks["BLOCK_D"])
    return (tile * config.num_stages * itemsize
            + _fp32_staging_bytes(blocks["BLOCK_R"], blocks["BLOCK_C"], itemsize))


# kernel -> (candidate configs, shared-memory estimate in bytes)
KERNEL_TUNING = {
    flash_forward._flash_forward_kernel: (FLASH_CONFIGS, _flash_shared_bytes),
    split_kv_forward._split_kv_kernel: (SPLIT_KV_CONFIGS, _flash_shared_bytes),
    split_kv_forward._split_kv_combine_kernel: (SPLIT_KV_COMBINE_CONFIGS, _combine_shared_bytes),
    two_pass_forward._score_tiles_kernel: (SCORE_TILES_CONFIGS, _score_tiles_shared_bytes),
    two_pass_forward._weighted_values_kernel:
        (WEIGHTED_VALUES_CONFIGS, _weighted_values_shared_bytes),
    backward_preprocess._output_grad_dot_kernel:
        (OUTPUT_GRAD_DOT_CONFIGS, _output_grad_dot_shared_bytes),
    flash_backward._flash_key_grads_kernel: (FLASH_KEY_GRADS_CONFIGS, _key_grads_shared_bytes),
    flash_backward._flash_query_grads_kernel:
        (FLASH_QUERY_GRADS_CONFIGS, _query_grads_shared_bytes),
    two_pass_backward._score_grads_kernel: (SCORE_GRADS_CONFIGS, _score_grads_shared_bytes),
    two_pass_backward._probs_matmul_kernel: (PROBS_MATMUL_CONFIGS, _probs_matmul_shared_bytes),
}


def fitting_configs(kernel, compute_capability, itemsize, block_d):
    """The kernel's configs whose estimated shared memory fits the device."""
    configs, shared_bytes = KERNEL_TUNING[kernel]
    limit = shared_memory_limit(compute_capability)

    def keep(config):
        return shared_bytes(config, block_d, itemsize) <= limit

    kept = [c for c in configs if keep(c)]
    if not kept:
        raise ValueError(f"no config of {kernel.__name__} fits {limit} bytes of shared memory "
                         f"({compute_capability=}, {itemsize=}, {block_d=})")
    return kept


def autotuned(kernel, compute_capability, itemsize, block_d):
    """`kernel` wrapped in `triton.autotune` over its configs that fit the device.

    A fresh wrapper per trace, on purpose: jax-triton chains a new prune hook onto the
    Autotuner at every lowering, so a shared one would grow with every new shape.
    Compiled kernels are cached by jax-triton per JITFunction, so nothing recompiles."""
    configs = fitting_configs(kernel, compute_capability, itemsize, block_d)
    return triton.autotune(configs=configs, key=[])(kernel)
