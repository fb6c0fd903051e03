"""Random shapes and features through the public API, forward and gradients, against float64.

The other tests name their shapes; these draw new ones on every run: lengths from 1
up (decoding shapes too), any head dim from 1 to 1024 (multiples of 8 or not), any
dtype, grouped heads, causal or not, a scale around the default, and features at
random: a bias and a mask of random broadcast shapes, sequence lengths, a window, a
soft-cap, segment ids, dropout. A failure message names the run's seed: JT_RANDOM_SEED=<seed>
draws the same cases again (the inputs themselves are fresh each time, their seed
printed too). On CPU a few small draws run in Triton's interpreter; on a CUDA GPU a
larger sweep runs compiled (`-m gpu`).
"""

import os

import jax
import numpy as np
import pytest

from helpers import DTYPES, check_against_float64, kernel_implementation

IMPL = kernel_implementation()
pytestmark = pytest.mark.int_overflow_checks  # conftest.py
RUN_SEED = int(os.environ.get("JT_RANDOM_SEED", np.random.SeedSequence().entropy % 2**32))


def draw_case(index, max_seq, max_elements):
    """((batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype), keyword arguments,
    with_grads) for draw `index` of this run, with batch·heads·seq_q·seq_k·head_dim <=
    max_elements."""
    rng = np.random.default_rng([RUN_SEED, index])
    dtype = str(rng.choice(list(DTYPES), p=[0.4, 0.4, 0.2]))
    head_dim = int(rng.choice([rng.integers(2, 33) * 8,      # flash kernels
                               rng.integers(33, 129) * 8,    # two-pass kernels
                               rng.integers(1, 1025)]))      # any, mostly not a multiple of 8
    kv_heads, group = int(rng.integers(1, 4)), int(rng.choice([1, 1, 2, 3, 4, 8]))
    batch = int(rng.integers(1, 4))
    shortest = 1 if rng.random() < 0.4 else max_seq // 16  # else several blocks long
    log_uniform = lambda: int(np.exp(rng.uniform(np.log(shortest), np.log(max_seq))))
    if max_seq > 1024 and rng.random() < 0.2:  # decoding: few queries, a long cache
        seq_q, seq_k = int(rng.integers(1, 17)), int(rng.integers(1024, max_seq + 1))
    else:
        seq_q = log_uniform()
        seq_k = seq_q if rng.random() < 0.3 else log_uniform()
    while batch * kv_heads * group * seq_q * seq_k * head_dim > max_elements:
        seq_q, seq_k = (max(1, seq_q // 2), seq_k) if seq_q >= seq_k else (seq_q, seq_k // 2)
    shape = (batch, seq_q, seq_k, kv_heads * group, kv_heads, head_dim, dtype)
    kwargs = dict(scale=float(rng.uniform(0.5, 2) / np.sqrt(head_dim)),
                  is_causal=bool(rng.random() < 0.5), **draw_features(rng, shape))
    return shape, kwargs, bool(rng.random() < 0.6)


def draw_features(rng, shape):
    """Keyword arguments of a random subset of the features, each in a random form."""
    batch, seq_q, seq_k, heads, _, _, dtype = shape
    full = (batch, heads, seq_q, seq_k)
    broadcast = lambda: tuple(n if rng.random() < 0.6 else 1 for n in full)
    kwargs = {}
    if rng.random() < 0.3:
        bias_dtype = DTYPES[dtype] if rng.random() < 0.5 else np.float32
        kwargs["bias"] = rng.standard_normal(broadcast()).astype(bias_dtype)
    if rng.random() < 0.25:
        kwargs["mask"] = rng.random(broadcast()) < rng.uniform(0.6, 0.98)
    if rng.random() < 0.3:
        kwargs["query_seq_lengths"] = rng.integers(0, seq_q + 1, batch).astype(np.int32)
    if rng.random() < 0.3:
        kwargs["key_value_seq_lengths"] = rng.integers(0, seq_k + 1, batch).astype(np.int32)
    if rng.random() < 0.25:
        kwargs["local_window_size"] = tuple(int(rng.integers(0, 2 * max(seq_q, seq_k)))
                                            for _ in range(2))
    if rng.random() < 0.2:
        kwargs["logits_soft_cap"] = float(rng.uniform(1, 50))
    if rng.random() < 0.25:
        runs = int(rng.integers(1, 6))
        ids = lambda n: np.sort(rng.integers(0, runs, (batch, n)), axis=1).astype(np.int32)
        kwargs["query_segment_ids"], kwargs["key_value_segment_ids"] = ids(seq_q), ids(seq_k)
        if rng.random() < 0.2:  # ids out of order
            kwargs["key_value_segment_ids"] = rng.permuted(kwargs["key_value_segment_ids"],
                                                           axis=1)
    if rng.random() < 0.2:
        kwargs["dropout_rate"] = float(rng.uniform(0.05, 0.6))
        kwargs["dropout_rng"] = jax.random.key(int(rng.integers(1 << 30)))
        kwargs["broadcast_dropout"] = bool(rng.random() < 0.3)
    return kwargs


def check_case(case):
    shape, kwargs, with_grads = case
    check_against_float64(shape, IMPL, f"JT_RANDOM_SEED={RUN_SEED} {shape=} "
                          f"{sorted(kwargs)}", with_grads=with_grads, **kwargs)


@pytest.mark.skipif(IMPL != "interpret", reason="the GPU runs the larger sweep below")
@pytest.mark.parametrize("index", range(6))
def test_random_shapes_in_interpreter(index):
    check_case(draw_case(index, max_seq=100, max_elements=1_500_000))


@pytest.mark.gpu
@pytest.mark.skipif(IMPL != "triton", reason="the slow sweep needs a CUDA GPU")
@pytest.mark.parametrize("index", range(16))
def test_random_shapes_on_gpu(index):
    """Each draw compiles and autotunes its kernels (about 3 to 45 s)."""
    check_case(draw_case(index, max_seq=2500, max_elements=1_500_000_000))
