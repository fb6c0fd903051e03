"""Two-pass launches in chunks of heads: a scratch budget independent of batch and heads.

Head dims above 256 hold score-sized buffers (P, and dS backward). Past
tuning.SCORE_SCRATCH_BYTES the launches take the batch·heads in chunks
(plan.Problem.head_chunks), writing the outputs and gradients in place. These cases
shrink the budget so that small problems run in several chunks, including a ragged
last chunk and grouped heads, and compare forward and gradients with float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jt_attention
from jt_attention import plan, tuning
from helpers import (DTYPES, TOLERANCE, attention_float64, attention_grads_float64,
                     gradient_error, kernel_implementation, random_cotangent, random_inputs,
                     relative_error)

IMPL = kernel_implementation()

# (batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim, dtype, causal, KV groups per chunk)
CASES = [
    (2, 17, 300, 4, 2, 264, "float16", False, 1),   # whole rows, grouped heads, 4 chunks
    (1, 33, 520, 3, 3, 280, "bfloat16", True, 2),   # score tiles, chunks of 2 + 1 heads
    (2, 20, 300, 2, 1, 272, "float32", True, 1),    # fp32 tiles, one group per chunk
]


def _problem(case):
    batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, causal, _ = case
    return plan.Problem(batch, seq_q, seq_k, heads, kv_heads, head_dim,
                        np.dtype(DTYPES[dtype]), head_dim ** -0.5, causal)


def _budget(case):
    """A budget that holds `groups` KV groups of the case's scratch."""
    problem, groups = _problem(case), case[-1]
    group = problem.num_heads // problem.num_kv_heads
    return groups * group * problem.score_bytes_per_head


def _case_id(case):
    b, sq, sk, n, k, d, dtype, causal, groups = case
    return f"b{b}-q{sq}-k{sk}-h{n}/{k}-d{d}-{dtype}{'-causal' if causal else ''}-g{groups}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunks_hold_whole_groups_within_the_budget(case, monkeypatch):
    monkeypatch.setattr(tuning, "SCORE_SCRATCH_BYTES", _budget(case))
    problem = _problem(case)
    chunks = problem.head_chunks
    group = problem.num_heads // problem.num_kv_heads
    assert len(chunks) > 1
    assert [start for start, _ in chunks] == list(np.cumsum([0] + [h for _, h in chunks[:-1]]))
    assert sum(heads for _, heads in chunks) == problem.batch * problem.num_heads
    for _, heads in chunks:
        assert heads % group == 0
        assert heads * problem.score_bytes_per_head <= tuning.SCORE_SCRATCH_BYTES
    for launches in (plan.forward_plan(problem), plan.backward_plan(problem)):
        assert not launches[0].after_previous and all(l.after_previous for l in launches[1:])
        for launch in launches:
            for buffer in launch.outputs:
                if buffer.name in ("probs", "dscores", "tile_probs"):
                    assert buffer.shape[0] == chunks[0][1] or buffer.shape[0] == chunks[-1][1]


def test_one_chunk_where_the_scratch_fits_or_probs_are_kept():
    assert plan.Problem(1, 2048, 2048, 8, 8, 512, np.dtype(np.float16), 0.05,
                        False).head_chunks == [(0, 8)]  # 128 MiB of P and dS
    assert len(plan.Problem(4, 2048, 2048, 32, 32, 128, np.dtype(np.float16), 0.1,
                            False).head_chunks) == 1  # flash: no score scratch
    kept = plan.Problem(64, 512, 512, 64, 64, 1024, np.dtype(np.float16), 0.03, False)
    assert kept.keeps_probs and len(kept.head_chunks) == 1  # P no bigger than the output


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunked_forward_and_gradients_match_float64(case, monkeypatch):
    monkeypatch.setattr(tuning, "SCORE_SCRATCH_BYTES", _budget(case))
    batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, causal, _ = case
    (q, k, v), seed = random_inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype)
    dout = random_cotangent(q.shape, dtype, seed)
    attend = lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=causal, implementation=IMPL, return_residual=True)
    (out, lse), vjp = jax.vjp(attend, q, k, v)
    grads = vjp((jnp.asarray(dout), jnp.zeros_like(lse)))
    scale = head_dim ** -0.5
    ref, ref_lse = attention_float64(q, k, v, scale, causal)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"{seed=}"
    assert relative_error(lse, ref_lse) < TOLERANCE[dtype], f"{seed=}"
    inference = jt_attention.dot_product_attention(q, k, v, is_causal=causal,
                                                   implementation=IMPL)
    assert relative_error(inference, ref) < TOLERANCE[dtype], f"{seed=}"
    expected = attention_grads_float64(q, k, v, dout, scale, causal)
    for name, grad, want in zip("qkv", grads, expected):
        assert gradient_error(grad, want) < TOLERANCE[dtype], f"d{name} {seed=}"
