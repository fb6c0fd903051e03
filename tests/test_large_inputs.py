"""Inputs past the GPU's 32-bit limits: the kernels' wide-indexing mode.

- batch x heads over 65535: CUDA caps grid dims y and z there, so such problems
  run every kernel on a one-dimensional grid;
- tensors, or the two-pass probability buffers, of 2**31 elements or more: the
  batch, head and row offsets are then 64-bit.

On every machine the wide mode is forced at small shapes (the interpreter on CPU)
and checked against float64. On the GPU, real inputs past the limits (10-40 GB
each) are checked where an overflow would land: whole batch elements (or heads)
at both ends against float64, and one head whose probability matrix alone passes
2**31 elements against the same kernels run on query chunks small enough for
32-bit offsets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jt_attention
from jt_attention import plan, tuning
from helpers import (TOLERANCE, attention_float64, attention_grads_float64,
                     kernel_implementation, random_inputs, relative_error)

IMPL = kernel_implementation()
pytestmark = pytest.mark.int_overflow_checks  # conftest.py
gpu_only = pytest.mark.skipif(IMPL != "triton", reason="needs a CUDA GPU")


# (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal): flash, split-KV, two-pass
# with the forward's probabilities kept, then recomputed (kv_len > head_dim)
FORCED_WIDE_CASES = [(3, 37, 45, 4, 2, 64, True), (1, 3, 1100, 4, 2, 64, False),
                     (1, 33, 50, 4, 2, 264, True), (1, 21, 300, 2, 2, 264, False)]


@pytest.mark.parametrize("case", FORCED_WIDE_CASES, ids=str)
def test_forced_wide_indexing(case, monkeypatch):
    """Every kernel on its one-dimensional grid with 64-bit batch·head offsets."""
    monkeypatch.setattr(plan, "GRID_YZ_LIMIT", 0)
    batch, seq_q, seq_k, heads, kv_heads, head_dim, causal = case
    assert plan.Problem(batch, seq_q, seq_k, heads, kv_heads, head_dim, np.dtype("float16"),
                        1.0, causal).wide_indexing
    (q, k, v), seed = random_inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, "float16")
    dout = np.random.default_rng(seed + 1).standard_normal(q.shape).astype(np.float16)
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=causal, implementation=IMPL)
    out, vjp = jax.vjp(attend, q, k, v)
    scale = 1 / np.sqrt(head_dim)
    ref, _ = attention_float64(q, k, v, scale, causal)
    assert relative_error(out, ref) < TOLERANCE["float16"], f"{seed=}"
    want = attention_grads_float64(q, k, v, dout, scale, causal)
    for name, grad, ref in zip(("dq", "dk", "dv"), vjp(jnp.asarray(dout)), want):
        assert relative_error(grad, ref) < TOLERANCE["float16"], f"{name} {seed=}"


def _device_inputs(seed, shapes, dtype=jnp.float16):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes)]


def _attention_and_grads(q, k, v, dout, causal):
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=causal, implementation="triton")
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)


def _check_slices(out, grads, inputs, causal, index, where):
    """out (and grads) at `index` against float64 on the inputs at `index`."""
    q, k, v, dout = [np.asarray(x[index]) for x in inputs]
    scale = 1 / np.sqrt(q.shape[-1])
    ref, _ = attention_float64(q, k, v, scale, causal)
    assert relative_error(out[index], ref) < TOLERANCE["float16"], where
    if grads is not None:
        want = attention_grads_float64(q, k, v, dout, scale, causal)
        for name, grad, ref in zip(("dq", "dk", "dv"), grads, want):
            assert relative_error(grad[index], ref) < TOLERANCE["float16"], (name, where)


@pytest.mark.gpu
@gpu_only
def test_batch_heads_past_grid_limit():
    """8193 x 8 batch·heads, head dim 256 (flash kernels): q, k, v of 2.1e9 elements."""
    batch, seq, heads, head_dim = 8193, 128, 8, 256
    inputs = _device_inputs(0, [(batch, seq, heads, head_dim)] * 4)
    out, grads = _attention_and_grads(*inputs, causal=True)
    for b in (0, batch // 2, batch - 1):  # each batch element is its own problem
        _check_slices(out, grads, inputs, True, np.s_[b:b + 1], f"batch {b}")


@pytest.mark.gpu
@gpu_only
def test_decoding_keys_past_2_31_elements():
    """Split-KV: one query over 4.5e6 keys x 8 KV heads x 64 (k and v 2.3e9 elements)."""
    q, k, v = _device_inputs(1, [(1, 1, 16, 64)] + [(1, 4_500_000, 8, 64)] * 2)
    out = jt_attention.dot_product_attention(q, k, v)
    last_group = (q[:, :, 14:], k[:, :, 7:], v[:, :, 7:], q[:, :, 14:])  # 2 query heads
    _check_slices(out[:, :, 14:], None, last_group, False, np.s_[:], "last KV head")


@pytest.mark.gpu
@gpu_only
def test_two_pass_buffers_past_2_31_elements(monkeypatch):
    """Head dim 512 (two-pass kernels): P and dS of all heads, then of one head, > 2**31."""
    # 40 heads x 7400 x 7400: in chunks of heads (8.8 GB of P and dS), and in one chunk,
    # where the per-head base offsets pass 2**31.
    q, k, v, dout = _device_inputs(1, [(1, 7400, 40, 512)] * 4)
    for budget in (tuning.SCORE_SCRATCH_BYTES, 1 << 40):
        monkeypatch.setattr(tuning, "SCORE_SCRATCH_BYTES", budget)
        out, grads = _attention_and_grads(q, k, v, dout, causal=False)
        _check_slices(out, grads, (q, k, v, dout), False, np.s_[:, :, -1:], f"{budget=}")
    del q, k, v, dout, out, grads

    # One head of 47000 x 47000 keys in fp32: row offsets inside the head pass 2**31.
    # Reference: the same kernels on query chunks small enough for 32-bit offsets;
    # out and dq rows are the chunks', dk and dv the sums over the chunks.
    q, k, v, dout = _device_inputs(2, [(1, 47000, 1, 512)] * 4, jnp.float32)
    out, grads = _attention_and_grads(q, k, v, dout, causal=False)
    chunks = [_attention_and_grads(q[:, s:s + 4700], k, v, dout[:, s:s + 4700], causal=False)
              for s in range(0, 47000, 4700)]
    want = [jnp.concatenate([c[0] for c in chunks], axis=1),
            jnp.concatenate([c[1][0] for c in chunks], axis=1),
            sum(c[1][1] for c in chunks), sum(c[1][2] for c in chunks)]
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        assert relative_error(got, np.asarray(ref, np.float64)) < TOLERANCE["float32"], name
