"""Backward kernels: gradients against a float64 closed form, and JAX's transformations.

On a CPU machine the backward kernels run in Triton's interpreter; with a CUDA GPU
the same cases run compiled, and the GPU-only cases compare with jax.nn's gradients.
Dispatch is the forward's: flash backward kernels up to 512-byte rows, the
score-grads + GEMM kernels above. Cases sit on both sides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jt_attention
from jt_attention import interpret, plan, tuning
from helpers import (DTYPES, TOLERANCE, attention_float64, attention_grads_float64,
                     every_launch, gradient_error, kernel_implementation, launch_path,
                     plain_operands, random_cotangent, random_inputs, relative_error)

IMPL = kernel_implementation()

# (batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim, dtype, causal)
CASES = [
    # flash backward
    (2, 37, 45, 4, 2, 64, "float16", False),     # grouped heads, q_len < kv_len
    (1, 45, 37, 2, 2, 64, "float32", True),      # causal with q_len > kv_len
    (1, 17, 1, 2, 2, 16, "float16", False),      # a single key
    (2, 30, 20, 2, 1, 128, "bfloat16", True),
    (1, 1, 97, 2, 2, 40, "float16", False),      # one query, head dim not a power of 2
    (1, 33, 50, 2, 2, 256, "float16", True),     # largest flash head dim
    (1, 5, 1100, 4, 2, 64, "float16", False),    # decoding shape: split-KV forward
    # score grads + GEMMs, on the softmax the forward kept (kv_len <= head_dim): whole rows
    # up to tuning.WHOLE_ROW_MAX_KEYS keys (delta summed there), tiles after a delta launch
    (1, 50, 33, 2, 2, 72, "float32", False),     # fp32 rows past 256 bytes
    (1, 33, 50, 4, 2, 264, "float16", True),     # just past the flash boundary, grouped
    (1, 20, 30, 2, 2, 512, "bfloat16", True),
    (1, 17, 19, 2, 2, 1000, "float16", False),   # head dim not a multiple of the chunks
    (1, 45, 40, 2, 2, 96, "float32", True),      # causal with q_len > kv_len, ragged tile
    (1, 9, 530, 2, 1, 544, "float16", False),    # rows past the whole-row limit: tiled dS
    (1, 128, 64, 2, 1, 512, "bfloat16", False),  # dQ = dS.K on a persistent grid
    # score grads + GEMMs, recomputing the probabilities (kv_len > head_dim)
    (1, 21, 130, 2, 2, 72, "float32", True),
    (1, 37, 300, 4, 2, 264, "float16", False),
]


def test_cases_take_every_backward_path():
    kernels = set()
    for b, sq, sk, n, k, d, dtype, causal in CASES:
        problem = plan.Problem(b, sq, sk, n, k, d, np.dtype(DTYPES[dtype]), 0.1, causal)
        kernels.update(map(launch_path, plan.backward_plan(problem, interpret.INTERPRETER_SMS)))
    assert kernels == {kernel.fn.__name__ for kernel in tuning.KERNEL_TUNING} - {
        "_flash_forward_kernel", "_split_kv_kernel", "_split_kv_combine_kernel",
        "_row_softmax_kernel", "_score_tiles_kernel", "_weighted_values_kernel",
        "_weighted_values_keeping_probs_kernel"} | {"_probs_matmul_kernel persistent"}


def _case_id(case):
    b, sq, sk, n, k, d, dtype, causal = case
    return f"b{b}-q{sq}-k{sk}-h{n}/{k}-d{d}-{dtype}{'-causal' if causal else ''}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradients_match_float64(case):
    batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, causal = case
    (q, k, v), seed = random_inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype)
    dout = random_cotangent(q.shape, dtype, seed)
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=causal, implementation=IMPL)
    _, vjp = jax.vjp(attend, q, k, v)
    grads = vjp(jnp.asarray(dout))
    expected = attention_grads_float64(q, k, v, dout, 1 / np.sqrt(head_dim), causal)
    for name, grad, want, x in zip("qkv", grads, expected, (q, k, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        assert gradient_error(grad, want) < TOLERANCE[dtype], f"d{name} {seed=}"


@pytest.mark.parametrize("head_dim", [32, 320])
def test_logsumexp_gradient(head_dim):
    """return_residual's logsumexp is differentiable too, as in jax.nn."""
    (q, k, v), seed = random_inputs(1, 21, 26, 2, 2, head_dim, "float32")
    dout = random_cotangent(q.shape, "float32", seed)
    dlse = random_cotangent(q.shape[:3], "float32", seed + 1)
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=True, implementation=IMPL, return_residual=True)
    _, vjp = jax.vjp(attend, q, k, v)
    grads = vjp((jnp.asarray(dout), jnp.asarray(dlse)))
    expected = attention_grads_float64(q, k, v, dout, 1 / np.sqrt(head_dim), True, dlse)
    for name, grad, want in zip("qkv", grads, expected):
        assert relative_error(grad, want) < TOLERANCE["float32"], f"d{name} {seed=}"


@pytest.mark.parametrize("head_dim", [16, 72])  # fp32: flash, then score grads + GEMMs
def test_check_grads(head_dim):
    (q, k, v), _ = random_inputs(1, 5, 7, 2, 1, head_dim, "float32")
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=True, implementation=IMPL)
    # eps 3e-3, not the default 1e-4: float32 rounding over 1e-4 steps put the finite
    # differences 4% off once in a full run (central differences' truncation error at
    # 3e-3 is far below the bound).
    check_grads(attend, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=3e-3)


def _loss(implementation, **kwargs):
    def loss(q, k, v):
        attend = lambda q, k, v: jt_attention.dot_product_attention(
            q, k, v, implementation=implementation, **kwargs)
        hidden = attend(q, k, v)
        return jnp.sum(attend(hidden, k, v) ** 2)  # attention used twice
    return loss


@pytest.mark.parametrize("head_dim", [32, 288])
def test_transformations(head_dim):
    """jit of value_and_grad, remat, and a loss that uses attention twice."""
    (q, k, v), seed = random_inputs(2, 19, 19, 2, 2, head_dim, "float32")
    expected = jax.value_and_grad(_loss("xla", is_causal=True), argnums=(0, 1, 2))(q, k, v)
    kernel_loss = _loss(IMPL, is_causal=True)
    for transform in (lambda f: f, jax.checkpoint):
        value, grads = jax.jit(jax.value_and_grad(transform(kernel_loss), argnums=(0, 1, 2)))(
            q, k, v)
        np.testing.assert_allclose(value, expected[0], rtol=1e-4, err_msg=f"{seed=}")
        for grad, want in zip(grads, expected[1]):
            assert relative_error(grad, np.asarray(want, np.float64)) < 1e-4, f"{seed=}"


@pytest.mark.parametrize("head_dim", [32, 288])
def test_vmap(head_dim):
    """jax.vmap folds the mapped axis into the batch: all inputs mapped or only the
    queries, nested, and under jax.grad either way round."""
    (q, k, v), seed = random_inputs(6, 9, 11, 2, 1, head_dim, "float32")
    dout = random_cotangent(q.shape, "float32", seed)
    split = lambda x: x.reshape(3, 2, *x.shape[1:])  # a mapped axis of 3 over batch 2
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=True, implementation=IMPL)
    scale = 1 / np.sqrt(head_dim)
    ref, _ = attention_float64(q, k, v, scale, True)
    out = jax.jit(jax.vmap(attend))(*map(split, (q, k, v)))
    assert relative_error(out.reshape(q.shape), ref) < TOLERANCE["float32"], f"{seed=}"
    out = jax.vmap(jax.vmap(attend))(*(x.reshape(3, 2, 1, *x.shape[1:]) for x in (q, k, v)))
    assert relative_error(out.reshape(q.shape), ref) < TOLERANCE["float32"], f"{seed=}"

    shared_kv = jax.vmap(attend, in_axes=(0, None, None))(split(q), k[:2], v[:2])
    for i in range(3):
        want, _ = attention_float64(split(q)[i], k[:2], v[:2], scale, True)
        assert relative_error(shared_kv[i], want) < TOLERANCE["float32"], f"{seed=}"

    expected = attention_grads_float64(q, k, v, dout, scale, True)
    loss = lambda q, k, v, dout: jnp.sum(attend(q, k, v) * dout)
    mapped_loss = lambda q, k, v: jnp.sum(jax.vmap(attend)(q, k, v) * split(dout))
    for grads in (jax.grad(mapped_loss, argnums=(0, 1, 2))(*map(split, (q, k, v))),
                  jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(*map(split, (q, k, v, dout)))):
        for name, grad, want in zip("qkv", grads, expected):
            assert relative_error(grad.reshape(want.shape), want) < TOLERANCE["float32"], (
                f"d{name} {seed=}")


@pytest.mark.parametrize("head_dim", [64, 320])
def test_heads_major_gradients(head_dim):
    """Gradients through the [B, H, S, D] entry point come back in that layout."""
    (q, k, v), seed = random_inputs(1, 23, 31, 2, 2, head_dim, "float32")
    dout = random_cotangent(q.shape, "float32", seed)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)
    attend = lambda q, k, v: jt_attention.scaled_dot_product_attention(
        q, k, v, is_causal=True, implementation=IMPL)
    _, vjp = jax.vjp(attend, *map(heads_major, (q, k, v)))
    grads = vjp(heads_major(dout))
    expected = attention_grads_float64(q, k, v, dout, 1 / np.sqrt(head_dim), True)
    for name, grad, want in zip("qkv", grads, expected):
        assert relative_error(heads_major(grad), want) < TOLERANCE["float32"], f"d{name} {seed=}"


@pytest.mark.skipif(IMPL != "interpret", reason="runs the GPU block sizes in the interpreter")
@pytest.mark.parametrize("head_dim,causal,seq_k", [(64, True, 230), (256, False, 230),
                                                   (520, True, 230), (264, False, 300)])
def test_gpu_block_sizes_in_interpreter(head_dim, causal, seq_k):
    """Every shipped config of the forward for a backward pass and of the backward, run
    by the interpreter on sequences that cross its blocks."""
    (q, k, v), seed = random_inputs(1, 150, seq_k, 2, 1, head_dim, "float16")
    dout = random_cotangent(q.shape, "float16", seed)
    problem = plan.Problem(1, 150, seq_k, 2, 1, head_dim, np.dtype(np.float16),
                           1 / np.sqrt(head_dim), causal)
    launches = plan.forward_plan(problem, for_backward=True) + plan.backward_plan(problem)
    inputs = {"q": q, "k": k, "v": v, "dout": dout, **plain_operands(),
              "dlse": np.zeros((1, 2, 150), np.float32)}
    expected = attention_grads_float64(q, k, v, dout, problem.scale, causal)
    per_kernel = [tuning.fitting_configs(l.kernel, "9.0", problem.footprint) for l in launches]
    for i in range(max(map(len, per_kernel))):
        blocks = {l.kernel.fn.__name__: configs[min(i, len(configs) - 1)].kwargs
                  for l, configs in zip(launches, per_kernel)}
        grads = interpret.run_interpreted(launches, inputs, blocks)
        for name, want in zip(("dq", "dk", "dv"), expected):
            assert relative_error(grads[name], want) < TOLERANCE["float16"], f"{seed=} {blocks=}"


# (head_dim, dtype, causal, seq_q, seq_k): every backward kernel and dtype on the GPU, at
# ragged lengths, against jax.nn's XLA gradients.
GPU_SWEEP = [
    (64, "float16", True, 777, 1537), (128, "bfloat16", False, 1000, 1000),
    (256, "float16", True, 1537, 777), (64, "float32", False, 777, 1537),
    (512, "float16", True, 1000, 1000), (1024, "bfloat16", False, 777, 1537),
    (96, "float32", True, 1000, 1000),
    (1024, "float16", True, 777, 1000), (520, "bfloat16", False, 1000, 333),  # kept P
    (1024, "float16", False, 100, 700),  # one query block per head of a KV group (dK, dV)
]


@pytest.mark.gpu
@pytest.mark.skipif(IMPL != "triton", reason="the slow sweep needs a CUDA GPU")
@pytest.mark.parametrize("head_dim,dtype,causal,seq_q,seq_k", GPU_SWEEP, ids=lambda x: str(x))
def test_sweep_matches_jax_nn_on_gpu(head_dim, dtype, causal, seq_q, seq_k):
    (q, k, v), seed = random_inputs(2, seq_q, seq_k, 4, 2, head_dim, dtype)
    dout = jnp.asarray(random_cotangent(q.shape, dtype, seed))

    def grads(implementation):
        attend = lambda q, k, v: (jt_attention.dot_product_attention if implementation == IMPL
                                  else jax.nn.dot_product_attention)(
            q, k, v, is_causal=causal, implementation=implementation)
        return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](dout))(q, k, v)

    with jax.default_matmul_precision("highest"):
        expected = grads("xla")
    reference = attention_grads_float64(q, k, v, np.asarray(dout), 1 / np.sqrt(head_dim), causal)
    for name, got, theirs, want in zip("qkv", grads(IMPL), expected, reference):
        ours_error = relative_error(got, want)
        assert ours_error < TOLERANCE[dtype], f"d{name} {seed=}"
        assert ours_error < 2 * relative_error(theirs, want) + 1e-5, f"d{name} {seed=}"


@pytest.mark.gpu
@pytest.mark.skipif(IMPL != "triton", reason="compiles every H100 config on the GPU")
@pytest.mark.parametrize("head_dim,dtype,causal,seq_q,seq_k", [
    (1024, "float16", False, 512, 512), (1024, "float16", True, 512, 512),  # the seed's rows
    (520, "bfloat16", True, 1000, 333), (264, "float16", False, 300, 777),
    (1024, "float16", True, 65, 65),  # whole rows, one ragged row past a block of 64
    (512, "bfloat16", True, 100, 100)])
def test_every_config_on_gpu(monkeypatch, head_dim, dtype, causal, seq_q, seq_k):
    """Each shipped config of every launch, forced one at a time on the GPU: autotuning
    must never be able to pick a config that computes a wrong result (2026-11-24 found
    one that did on the seed workload: WORKSPACE_NOTES.md)."""
    (q, k, v), seed = random_inputs(2, seq_q, seq_k, 4, 4, head_dim, dtype)
    dout = random_cotangent(q.shape, dtype, seed)
    problem = plan.Problem(2, seq_q, seq_k, 4, 4, head_dim, np.dtype(DTYPES[dtype]),
                           1 / np.sqrt(head_dim), causal)
    out_want, _ = attention_float64(q, k, v, problem.scale, causal)
    grads_want = attention_grads_float64(q, k, v, dout, problem.scale, causal)
    fitting = tuning.fitting_configs
    from jt_attention import launch  # the SM count that the GPU path plans with

    per_kernel = {l.kernel: fitting(l.kernel, "9.0", problem.footprint, l.has_persistent_grid)
                  for l in every_launch(problem, launch.multiprocessor_count())}
    attend = lambda q, k, v: jt_attention.dot_product_attention(q, k, v, is_causal=causal)
    for i in range(max(map(len, per_kernel.values()))):
        forced = {kernel: [configs[min(i, len(configs) - 1)]]
                  for kernel, configs in per_kernel.items()}
        monkeypatch.setattr(tuning, "fitting_configs", lambda kernel, *_: forced[kernel])
        out = jax.jit(attend)(q, k, v)
        grads = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](dout))(q, k, v)
        where = f"{seed=} configs={[str(c[0]) for c in forced.values()]}"
        assert relative_error(out, out_want) < TOLERANCE[dtype], where
        for name, got, want in zip("qkv", grads, grads_want):
            assert relative_error(got, want) < TOLERANCE[dtype], f"d{name} {where}"
