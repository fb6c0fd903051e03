"""Random shapes through the public API, forward and gradients, against float64.

The other tests name their shapes; these draw new ones on every run: lengths from 1
up (decoding shapes too), any head dim from 16 to 1024 (multiples of 8 or not), any
dtype, grouped heads, causal or not, a scale around the default. A failure message
names the run's seed: JT_RANDOM_SEED=<seed> draws the same shapes again (the inputs
themselves are fresh each time, their seed printed too). On CPU a few small draws
run in Triton's interpreter; on a CUDA GPU a larger sweep runs compiled (`-m gpu`).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jt_attention
from helpers import (DTYPES, TOLERANCE, attention_float64, attention_grads_float64,
                     gradient_error, kernel_implementation, random_inputs, relative_error)

IMPL = kernel_implementation()
RUN_SEED = int(os.environ.get("JT_RANDOM_SEED", np.random.SeedSequence().entropy % 2**32))


def draw_case(index, max_seq, max_elements):
    """(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, causal, scale, with_grads)
    for draw `index` of this run, with batch·heads·seq_q·seq_k·head_dim <= max_elements."""
    rng = np.random.default_rng([RUN_SEED, index])
    dtype = str(rng.choice(list(DTYPES), p=[0.4, 0.4, 0.2]))
    head_dim = int(rng.choice([rng.integers(2, 33) * 8,      # flash kernels
                               rng.integers(33, 129) * 8,    # two-pass kernels
                               rng.integers(16, 1025)]))     # any, mostly not a multiple of 8
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
    scale = float(rng.uniform(0.5, 2) / np.sqrt(head_dim))
    return (batch, seq_q, seq_k, kv_heads * group, kv_heads, head_dim, dtype,
            bool(rng.random() < 0.5), scale, bool(rng.random() < 0.6))


def check_case(case):
    batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, causal, scale, with_grads = case
    (q, k, v), data_seed = random_inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype)
    where = f"JT_RANDOM_SEED={RUN_SEED} {case=} {data_seed=}"
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation=IMPL, return_residual=True)
    out, lse = jax.jit(attend)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype, where
    want_out, want_lse = attention_float64(q, k, v, scale, causal)
    tolerance = TOLERANCE[dtype]
    assert relative_error(out, want_out) < tolerance, f"out {where}"
    lse = np.asarray(lse).astype(np.float64)
    assert relative_error(lse, want_lse) < 2 * tolerance, f"lse {where}"
    if not with_grads:
        return
    dout = np.random.default_rng([data_seed, 1]).standard_normal(q.shape).astype(DTYPES[dtype])
    grads = jax.jit(lambda q, k, v: jax.vjp(lambda *x: attend(*x)[0], q, k, v)[1](
        jnp.asarray(dout)))(q, k, v)
    wanted = attention_grads_float64(q, k, v, dout, scale, causal)
    for name, grad, want, x in zip("qkv", grads, wanted, (q, k, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype, f"d{name} {where}"
        assert gradient_error(grad, want) < tolerance, f"d{name} {where}"


@pytest.mark.skipif(IMPL != "interpret", reason="the GPU runs the larger sweep below")
@pytest.mark.parametrize("index", range(12))
def test_random_shapes_in_interpreter(index):
    check_case(draw_case(index, max_seq=100, max_elements=4_000_000))


@pytest.mark.gpu
@pytest.mark.skipif(IMPL != "triton", reason="the slow sweep needs a CUDA GPU")
@pytest.mark.parametrize("index", range(16))
def test_random_shapes_on_gpu(index):
    """Each draw compiles and autotunes its kernels (about 3 to 45 s)."""
    check_case(draw_case(index, max_seq=2500, max_elements=1_500_000_000))
