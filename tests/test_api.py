"""Validation, dispatch and the XLA reference path."""

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jt_attention
from helpers import (TOLERANCE, attention_float64, kernel_implementation, random_inputs,
                     relative_error)

_KERNELS = kernel_implementation()


def _inputs(q_shape=(2, 8, 4, 64), kv_shape=(2, 12, 4, 64), dtype=np.float16):
    rng = np.random.default_rng()
    return (rng.standard_normal(q_shape).astype(dtype), rng.standard_normal(kv_shape).astype(dtype),
            rng.standard_normal(kv_shape).astype(dtype))


@pytest.mark.parametrize("name,q_shape,kv_shape,v_shape,match", [
    ("rank", (8, 64), (12, 64), (12, 64), "3-D or more"),
    ("mixed rank", (2, 8, 4, 64), (12, 4, 64), (12, 4, 64), "same rank"),
    ("key/value shapes", (2, 8, 4, 64), (2, 12, 4, 64), (2, 13, 4, 64), "same shape"),
    ("batch", (3, 8, 4, 64), (2, 12, 4, 64), (2, 12, 4, 64), "batch"),
    ("head dim mismatch", (2, 8, 4, 64), (2, 12, 4, 32), (2, 12, 4, 32), "head_dim"),
    ("heads not a multiple", (2, 8, 5, 64), (2, 12, 2, 64), (2, 12, 2, 64), "multiple"),
    ("head dim zero", (2, 8, 4, 0), (2, 12, 4, 0), (2, 12, 4, 0), "head_dim=0"),
    ("head dim too large", (1, 2, 1, 1040), (1, 2, 1, 1040), (1, 2, 1, 1040), "head_dim=1040"),
    ("empty sequence", (2, 0, 4, 64), (2, 12, 4, 64), (2, 12, 4, 64), ">= 1"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_shapes_raise_value_error(name, q_shape, kv_shape, v_shape, match):
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal(s).astype(np.float16) for s in (q_shape, kv_shape, v_shape))
    with pytest.raises(ValueError, match=match):
        jt_attention.dot_product_attention(q, k, v, implementation="xla")


def test_bad_dtypes_raise_type_error():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="share a dtype"):
        jt_attention.dot_product_attention(q, k.astype(np.float32), v)
    with pytest.raises(TypeError, match="float64"):
        jt_attention.dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)))
    with pytest.raises(TypeError, match="int32"):
        jt_attention.dot_product_attention(*(x.astype(np.int32) for x in (q, k, v)))


def test_non_array_input_raises_type_error():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="query must be a jax.Array"):
        jt_attention.dot_product_attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="value must be a jax.Array"):
        jt_attention.dot_product_attention(q, k, None)


def test_bad_options_raise():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="implementation='cuda'"):
        jt_attention.dot_product_attention(q, k, v, implementation="cuda")
    with pytest.raises(TypeError, match="scale"):
        jt_attention.dot_product_attention(q, k, v, scale="0.1")
    with pytest.raises(TypeError, match="is_causal"):
        jt_attention.dot_product_attention(q, k, v, is_causal="yes")


def test_triton_without_gpu_says_what_to_use():
    if any(getattr(d, "compute_capability", None) for d in jax.devices()):
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(RuntimeError, match="JAX sees none.*implementation='interpret'"):
        jt_attention.dot_product_attention(*_inputs(), implementation="triton")


def test_unknown_implementation_lists_the_choices():
    with pytest.raises(ValueError, match=r"'cudnn' is not one of \(None, 'triton'"):
        jt_attention.dot_product_attention(*_inputs(), implementation="cudnn")


def test_interpreter_chosen_after_import_is_detected(monkeypatch):
    """TRITON_INTERPRET=1 set once triton is imported: the kernels are GPU kernels."""
    from jt_attention.kernels import flash_forward
    from jt_attention import interpret

    monkeypatch.setattr(interpret, "interpreter_enabled", lambda: True)
    monkeypatch.setattr(flash_forward, "_flash_forward_kernel", object())
    with pytest.raises(RuntimeError, match="was set after triton .* was imported"):
        jt_attention.dot_product_attention(*_inputs(), implementation="interpret")


@pytest.mark.parametrize("transform", [
    lambda f, q: jax.jvp(f, (q,), (q,)),
    lambda f, q: jax.jacfwd(f)(q),
])
def test_forward_mode_names_reverse_mode(transform):
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    f = lambda q: jt_attention.dot_product_attention(q, q, q, implementation=_KERNELS).sum()
    with pytest.raises(TypeError, match="reverse mode only"):
        transform(f, q)


def test_grad_of_grad_names_the_limit():
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    f = lambda q: jt_attention.dot_product_attention(q, q, q, implementation=_KERNELS).sum()
    with pytest.raises(NotImplementedError, match="grad-of-grad .* is not supported"):
        jax.grad(lambda q: jax.grad(f)(q).sum())(q)
    with pytest.raises(NotImplementedError, match="grad-of-grad"):
        jax.hessian(f)(q)


def test_heads_major_entry_validates():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"\[batch, num_heads, seq, head_dim\]"):
        jt_attention.scaled_dot_product_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="head_dim"):
        jt_attention.scaled_dot_product_attention(q, k[..., :32], v[..., :32])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("causal", [False, True])
def test_xla_reference_matches_float64(dtype, causal):
    (q, k, v), seed = random_inputs(2, 33, 47, 4, 2, 80, dtype)
    out, lse = jt_attention.dot_product_attention(q, k, v, is_causal=causal, implementation="xla",
                                                  return_residual=True)
    ref, ref_lse = attention_float64(q, k, v, 1 / np.sqrt(80), causal)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"{seed=}"
    np.testing.assert_allclose(np.asarray(lse, np.float64), ref_lse, rtol=2 * TOLERANCE[dtype],
                               atol=1e-3)


def test_xla_reference_runs_under_debug_infs():
    """A mask that hides keys but leaves every row something to see puts no inf anywhere
    (jax.debug_infs checks each operation when not under jit); a row that sees nothing
    gets 0 and, only then, a logsumexp of -inf."""
    q = np.zeros((5, 6, 11), np.float32)
    kv = np.zeros((7, 3, 11), np.float32)
    with jax.debug_infs(True):
        out = jt_attention.dot_product_attention(q, kv, kv, mask=np.arange(7) <= 3,
                                                 implementation="xla")
    assert np.isfinite(np.asarray(out)).all()
    sees = np.array([True, False, True, True, False])  # q is [q_len 5, heads 6, head_dim]
    out, lse = jt_attention.dot_product_attention(
        q + 1, kv + 1, kv + 1, mask=np.broadcast_to(sees[:, None], (5, 7)),
        implementation="xla", return_residual=True)
    hidden_rows = np.broadcast_to(~sees[:, None], (5, 6))  # lse is [q_len, heads]
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), hidden_rows)
    np.testing.assert_array_equal(np.asarray(out)[~sees], 0.0)


def test_default_implementation_without_gpu_is_xla_and_logged(caplog):
    if any(getattr(d, "compute_capability", None) for d in jax.devices()):
        pytest.skip("this machine has a CUDA GPU: the default is the Triton kernels")
    q, k, v = _inputs()
    jt_attention.log.log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="jt_attention"):
        out = jt_attention.dot_product_attention(q, k, v)
    assert "XLA reference" in caplog.text
    expected = jt_attention.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_matches_jax_nn_signature_and_output():
    (q, k, v), _ = random_inputs(2, 16, 16, 4, 2, 32, "float32")
    ours = jt_attention.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    with jax.default_matmul_precision("highest"):  # jax.nn's fp32 einsums use TF32 on GPUs
        theirs = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                              is_causal=True, implementation="xla")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mask=np.ones((2, 4, 8, 12), np.float32)), TypeError, "mask.dtype=float32; expected bool"),
    (dict(mask=np.ones((3, 1, 8, 12), bool)), ValueError, r"mask.shape=\(3, 1, 8, 12\)"),
    (dict(bias=np.ones((2, 4, 8, 13), np.float32)), ValueError, r"bias.shape=.*kv_len dim is 13"),
    (dict(bias=np.ones((1, 2, 4, 8, 12), np.float32)), ValueError, "bias.ndim=5"),
    (dict(bias=[[1.0]]), TypeError, "bias must be a jax.Array"),
    (dict(query_seq_lengths=np.ones((2,), np.int64)), TypeError,
     "query_seq_lengths.dtype=int64; expected int32"),
    (dict(key_value_seq_lengths=np.ones((3,), np.int32)), ValueError,
     r"key_value_seq_lengths.shape=\(3,\); expected \(2,\)"),
    (dict(local_window_size=(-1, 2)), ValueError, "must not be negative"),
    (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size"),
    (dict(local_window_size=1.5), TypeError, "local_window_size"),
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap=0.0 must be a positive"),
    (dict(logits_soft_cap="30"), TypeError, "logits_soft_cap"),
    (dict(query_segment_ids=np.zeros((2, 8), np.int32)), ValueError, "given together"),
    (dict(query_segment_ids=np.zeros((2, 8), np.int32),
          key_value_segment_ids=np.zeros((2, 8), np.int32)), ValueError,
     r"key_value_segment_ids.shape=\(2, 8\); expected \(2, 12\)"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_feature_arguments_raise(kwargs, error, match):
    q, k, v = _inputs()
    with pytest.raises(error, match=match):
        jt_attention.dot_product_attention(q, k, v, implementation="xla", **kwargs)


def test_batch_dims_must_match():
    rng = np.random.default_rng()
    q = rng.standard_normal((2, 3, 8, 4, 16)).astype(np.float32)
    k = rng.standard_normal((3, 2, 12, 4, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"key's batch dims \(3, 2\) must match query's"):
        jt_attention.dot_product_attention(q, k, k)


def test_a_constant_mask_is_not_folded_at_compile_time():
    """A mask the jitted function closes over is an XLA constant: the kernels' spans of it
    (features._spans) must stay run-time work. Folded, a 2048 x 2048 mask cost 13 s of
    compile on a CPU (and a training step's compile ran past 30 s on the GPU machine);
    kept, well under a second."""
    mask = jnp.tril(jnp.ones((2048, 2048), bool))[None, None]
    q, k, v = (jnp.zeros((1, 2048, 1, 16), jnp.float16) for _ in range(3))
    attend = jax.jit(lambda q, k, v: jax.grad(lambda q: jt_attention.dot_product_attention(
        q, k, v, mask=mask, implementation=_KERNELS).astype(jnp.float32).sum())(q))
    start = time.perf_counter()
    attend.lower(q, k, v).compile()
    assert time.perf_counter() - start < 5.0
