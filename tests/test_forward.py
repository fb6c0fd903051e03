"""Forward kernels against a float64 reference, on fresh random inputs.

On a CPU machine the kernels run in Triton's interpreter (implementation='interpret');
with a CUDA GPU the same cases run compiled (implementation='triton').
Dispatch: the flash kernel takes head dim <= 256 in fp16/bf16 (<= 64 in fp32), and
decoding shapes among those (<= 16 queries, >= 1024 keys) take the split-KV kernels;
wider heads take the two-pass kernels: whole rows up to tuning.WHOLE_ROW_MAX_KEYS keys,
score tiles past it. Cases sit on every side.
"""

import jax
import numpy as np
import pytest

import jt_attention
from jt_attention import interpret, plan, tuning
from helpers import (DTYPES, TOLERANCE, attention_float64, kernel_implementation,
                     launch_path, plain_operands, random_inputs, relative_error)

IMPL = kernel_implementation()

# (batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim, dtype, causal)
CASES = [
    # flash kernel
    (2, 97, 130, 4, 2, 64, "float16", False),
    (1, 130, 97, 2, 2, 64, "float16", True),     # causal with q_len > kv_len
    (1, 1, 1, 1, 1, 16, "float16", False),       # single query, single key
    (2, 17, 17, 2, 1, 128, "bfloat16", True),
    (1, 1, 130, 2, 2, 40, "float16", False),     # decode-like, head dim not a power of 2
    (1, 70, 33, 2, 2, 256, "float16", True),     # largest flash head dim
    (1, 33, 70, 2, 2, 256, "bfloat16", False),
    (1, 60, 50, 2, 2, 128, "float32", True),     # largest flash head dim in fp32
    (1, 45, 45, 3, 3, 24, "float32", False),
    (3, 70, 40, 3, 3, 32, "float16", True),      # causal grid order: 8 + 1 batch·heads
    # split-KV (decoding: <= 16 queries, >= 1024 keys), then the combine kernel
    (1, 1, 1100, 8, 2, 64, "float16", False),    # 4 query heads per kv head
    (2, 5, 1500, 2, 2, 128, "bfloat16", True),
    (1, 16, 2049, 2, 1, 40, "float32", False),
    (1, 3, 1030, 2, 2, 256, "float16", True),
    # two-pass kernels: whole rows
    (1, 50, 61, 2, 2, 264, "float16", True),     # just past the flash boundary
    (1, 61, 50, 2, 1, 136, "float32", False),    # fp32 rows past 512 bytes
    (2, 97, 70, 2, 2, 512, "bfloat16", True),
    (1, 33, 100, 2, 2, 1000, "float16", False),  # head dim not a multiple of the chunks
    (1, 65, 65, 2, 2, 1024, "float16", True),
    (1, 1, 97, 2, 2, 1024, "float32", False),
    (1, 128, 64, 2, 1, 512, "float16", False),   # O = P.V on a persistent grid
    # two-pass kernels: score tiles (rows longer than the whole-row limit)
    (1, 20, 600, 2, 1, 288, "bfloat16", True),
    (1, 7, 530, 2, 2, 520, "float16", False),
]


def test_cases_take_every_forward_path():
    kernels = set()
    for b, sq, sk, n, k, d, dtype, causal in CASES:
        problem = plan.Problem(b, sq, sk, n, k, d, np.dtype(DTYPES[dtype]), 0.1, causal)
        kernels.update(launch_path(launch) for launch in plan.forward_plan(
            problem, num_sms=interpret.INTERPRETER_SMS))
    assert kernels == {"_flash_forward_kernel", "_split_kv_kernel", "_split_kv_combine_kernel",
                       "_row_softmax_kernel", "_probs_matmul_kernel", "_score_tiles_kernel",
                       "_weighted_values_kernel", "_probs_matmul_kernel persistent"}


def _case_id(case):
    b, sq, sk, n, k, d, dtype, causal = case
    return f"b{b}-q{sq}-k{sk}-h{n}/{k}-d{d}-{dtype}{'-causal' if causal else ''}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(case):
    batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, causal = case
    (q, k, v), seed = random_inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype)
    out, lse = jt_attention.dot_product_attention(
        q, k, v, is_causal=causal, implementation=IMPL, return_residual=True)
    ref, ref_lse = attention_float64(q, k, v, 1 / np.sqrt(head_dim), causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, ref) < TOLERANCE[dtype], f"{seed=}"
    # lse comes back in the input dtype, as jax.nn returns it.
    lse = np.asarray(lse).astype(np.float64)
    assert lse.shape == (batch, seq_q, heads)
    np.testing.assert_allclose(lse, ref_lse, rtol=2 * TOLERANCE[dtype], atol=1e-3,
                               err_msg=f"{seed=}")


@pytest.mark.parametrize("head_dim", [64, 512])
def test_scale_and_jit(head_dim):
    (q, k, v), seed = random_inputs(2, 40, 50, 2, 2, head_dim, "float16")
    attend = jax.jit(lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, scale=0.3, is_causal=True, implementation=IMPL))
    ref, _ = attention_float64(q, k, v, 0.3, True)
    assert relative_error(attend(q, k, v), ref) < TOLERANCE["float16"], f"{seed=}"


@pytest.mark.parametrize("head_dim", [128, 768])
def test_heads_major_entry_point(head_dim):
    (q, k, v), seed = random_inputs(2, 37, 29, 3, 3, head_dim, "float16")
    to_heads_major = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    out = jt_attention.scaled_dot_product_attention(
        to_heads_major(q), to_heads_major(k), to_heads_major(v), is_causal=True,
        implementation=IMPL)
    ref, _ = attention_float64(q, k, v, 1 / np.sqrt(head_dim), True)
    assert out.shape == (2, 3, 37, head_dim)
    assert relative_error(out, ref.transpose(0, 2, 1, 3)) < TOLERANCE["float16"], f"{seed=}"


def test_unbatched_input():
    (q, k, v), seed = random_inputs(1, 20, 30, 2, 2, 64, "float16")
    out = jt_attention.dot_product_attention(q[0], k[0], v[0], implementation=IMPL)
    ref, _ = attention_float64(q, k, v, 1 / np.sqrt(64), False)
    assert out.shape == q.shape[1:]
    assert relative_error(out, ref[0]) < TOLERANCE["float16"], f"{seed=}"


@pytest.mark.skipif(IMPL != "interpret", reason="runs the GPU block sizes in the interpreter")
@pytest.mark.parametrize("head_dim,causal,seq_q,seq_k", [
    (64, True, 200, 300), (128, False, 200, 300), (512, True, 200, 300),
    (1024, False, 200, 300), (128, False, 7, 1100)])  # the last one: split-KV
def test_gpu_block_sizes_in_interpreter(head_dim, causal, seq_q, seq_k):
    """Every shipped H100 config, run by the interpreter on sequences that cross its blocks."""
    (q, k, v), seed = random_inputs(1, seq_q, seq_k, 2, 2, head_dim, "float16")
    problem = plan.Problem(1, seq_q, seq_k, 2, 2, head_dim, np.dtype(np.float16),
                           1 / np.sqrt(head_dim), causal)
    launches = plan.forward_plan(problem)
    ref, _ = attention_float64(q, k, v, problem.scale, causal)
    per_kernel = [tuning.fitting_configs(l.kernel, "9.0", problem.footprint) for l in launches]
    for i in range(max(map(len, per_kernel))):  # each config of each launch at least once
        blocks = {l.kernel.fn.__name__: configs[min(i, len(configs) - 1)].kwargs
                  for l, configs in zip(launches, per_kernel)}
        out = interpret.run_interpreted(launches, {"q": q, "k": k, "v": v, **plain_operands()},
                                        blocks)["out"]
        assert relative_error(out, ref) < TOLERANCE["float16"], f"{seed=} {blocks=}"


# (head_dim, dtype, causal, seq_q, seq_k): every kernel, dtype and mask on the GPU, at
# ragged lengths longer than the interpreter can afford. Each case compiles and autotunes.
GPU_SWEEP = [
    (64, "float16", True, 777, 1537), (96, "bfloat16", False, 1000, 1000),
    (128, "float16", False, 1, 4099), (200, "float16", True, 1537, 777),
    (256, "bfloat16", True, 1000, 1000), (64, "float32", False, 777, 1537),
    (320, "float16", True, 777, 1537), (512, "bfloat16", False, 1537, 777),
    (1024, "float16", True, 1000, 1000), (1024, "bfloat16", False, 1, 4099),
    (72, "float32", True, 1000, 1000), (640, "float32", False, 777, 1537),
    (128, "float16", False, 1, 32771), (64, "bfloat16", True, 16, 8193),  # split-KV, GQA
]


@pytest.mark.gpu
@pytest.mark.skipif(IMPL != "triton", reason="the slow sweep needs a CUDA GPU")
@pytest.mark.parametrize("head_dim,dtype,causal,seq_q,seq_k", GPU_SWEEP,
                         ids=lambda x: str(x))
def test_sweep_on_gpu(head_dim, dtype, causal, seq_q, seq_k):
    """Longer, ragged sequences with GQA, through the autotuned kernels."""
    (q, k, v), seed = random_inputs(2, seq_q, seq_k, 4, 2, head_dim, dtype)
    out = jt_attention.dot_product_attention(q, k, v, is_causal=causal, implementation=IMPL)
    ref, _ = attention_float64(q, k, v, 1 / np.sqrt(head_dim), causal)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"{seed=}"


def test_interpreter_rounds_bf16_to_nearest_even():
    """The interpreter's fp32 -> bf16 cast, as patched by interpret.py, rounds as the GPU
    does (ties to even, overflow to inf, NaN kept); Triton's own truncates."""
    from triton.runtime import interpreter
    import triton.language as tl

    interpret._round_bf16_casts()
    rng = np.random.default_rng()
    bits = np.concatenate([
        rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32),
        np.array([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x7F7FFFFF, 0x00008000, 0x80018000,
                  0x7F800000, 0xFF800000], np.uint32)])  # ties both ways, max, subnormals, infs
    values = bits.view(np.float32)
    handle = interpreter.TensorHandle(values, tl.float32)
    got = interpreter.interpreter_builder.create_fp_trunc(handle, tl.bfloat16).data
    numbers = ~np.isnan(values)
    want = values[numbers].astype(jax.numpy.bfloat16).view(np.uint16)  # ml_dtypes: RNE
    np.testing.assert_array_equal(got[numbers], want)
    assert np.isnan(got[~numbers].view(jax.numpy.bfloat16).astype(np.float32)).all()
