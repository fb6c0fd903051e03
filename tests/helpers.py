"""Float64 reference and input helpers for the tests."""

import jax
import jax.numpy as jnp
import numpy as np

import jt_attention
from jt_attention import features, plan
from jt_attention.interpret import interpreter_enabled
from jt_attention.reference import attention_reference

# ||out - ref|| / ||ref|| bounds: about 5x the errors measured on
# the H100 and in the interpreter.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-4}
DTYPES = {"float16": np.float16, "bfloat16": jnp.dtype("bfloat16"), "float32": np.float32}


def every_launch(problem, num_sms=0):
    """Each launch a problem can run: the forward for a backward pass, the launches
    that only an inference forward has, and the backward (num_sms as in plan)."""
    for_backward = plan.forward_plan(problem, for_backward=True, num_sms=num_sms)
    kernels = {launch.kernel for launch in for_backward}
    return (for_backward + [l for l in plan.forward_plan(problem, num_sms=num_sms)
                            if l.kernel not in kernels]
            + plan.backward_plan(problem, num_sms))


def launch_path(launch):
    """The kernel's name, marked where its grid is persistent: what the path tests count."""
    return launch.kernel.fn.__name__ + (" persistent" if launch.has_persistent_grid else "")


def kernel_implementation():
    """'interpret' on CPU machines (conftest turns the interpreter on), else 'triton'."""
    return "interpret" if interpreter_enabled() else "triton"


def new_seed():
    return np.random.SeedSequence().entropy % 2**32


def feature_rng(seed):
    """A generator for a test's masks and other feature operands: a stream apart from
    random_inputs' for the same seed, so that a failure's one printed seed remakes both."""
    return np.random.default_rng([1, seed])


def random_cotangent(shape, dtype, seed):
    """A cotangent (dO, dlse) for the inputs of `seed`, from a stream of its own:
    random_inputs' stream would give dO = Q."""
    return np.random.default_rng([2, seed]).standard_normal(shape).astype(DTYPES[dtype])


def random_inputs(batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim, dtype, seed=None):
    """Random q, k, v (from a new seed unless given); returns them and the seed."""
    seed = new_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq_q, num_heads, head_dim), (batch, seq_k, num_kv_heads, head_dim),
              (batch, seq_k, num_kv_heads, head_dim)]
    return [rng.standard_normal(s).astype(DTYPES[dtype]) for s in shapes], seed


def _float64(x):
    return None if x is None else jnp.asarray(np.asarray(x, np.float64))


def _reference64(q, k, v, scale, is_causal, bias=None, **options):
    """jt_attention.attention_reference run in float64: (out, lse [B, T, N]) as a jitted
    function of (q, k, v, bias), for jax.vjp (one compile, where op-by-op dispatch
    compiled each of the reference's ops)."""
    options = {name: _int_or_bool(x) for name, x in options.items()}

    @jax.jit
    def attend(q, k, v, bias):
        out, lse = attention_reference(q, k, v, bias, scale=scale, is_causal=is_causal,
                                       **options)
        return out, jnp.swapaxes(lse, 1, 2)
    return attend, (_float64(q), _float64(k), _float64(v), _float64(bias))


def _int_or_bool(x):
    """Array features as jax arrays (closed over by a jitted function); options as given."""
    return jnp.asarray(x) if isinstance(x, np.ndarray) else x


def attention_float64(q, k, v, scale, is_causal, **options):
    """[B, T, N, H] inputs and any features (attention_reference's keywords, bias too) ->
    (out [B, T, N, H], lse [B, T, N]) in float64, from the package's one reference."""
    with jax.enable_x64(True):
        attend, args = _reference64(q, k, v, scale, is_causal, **options)
        return tuple(np.asarray(x) for x in attend(*args))


def attention_grads_float64(q, k, v, dout, scale, is_causal, dlse=None, **options):
    """Gradients (dq, dk, dv) of <out, dout> + <lse, dlse> in float64, by jax.vjp of the
    reference run in float64; (dq, dk, dv, dbias) where a bias is given."""
    with jax.enable_x64(True):
        attend, args = _reference64(q, k, v, scale, is_causal, **options)
        out, vjp = jax.vjp(attend, *args)
        dlse = jnp.zeros(out[1].shape, jnp.float64) if dlse is None else _float64(dlse)
        grads = vjp((_float64(dout), dlse))
        return tuple(np.asarray(g) for g in grads if g is not None)


def relative_error(out, ref):
    """||out - ref|| / ||ref||, or ||out|| where ref is all zeros."""
    out = np.asarray(out).astype(np.float64)
    assert np.isfinite(out).all(), "output has NaN or Inf"
    return float(np.linalg.norm(out - ref) / (np.linalg.norm(ref) or 1.0))


def gradient_error(grad, want, zero_scale=1.0):
    """The larger of: the relative error over the rows (last axis) whose true gradient
    is not zero, and the root mean square over `zero_scale` of the rows where it is zero
    but for rounding (dq of a query that sees one key, dk of a key that such rows alone see):
    `zero_scale` is the size of the terms whose cancellation makes them zero. Judged
    apart, such rows' rounding cannot hide an error in the others, nor the others' size
    decide how much rounding passes."""
    grad, want = np.asarray(grad).astype(np.float64), np.asarray(want)
    assert np.isfinite(grad).all(), "gradient has NaN or Inf"
    zero = np.linalg.norm(want, axis=-1) <= 1e-9 * np.sqrt(want.shape[-1])
    error = relative_error(grad[~zero], want[~zero]) if not zero.all() else 0.0
    if zero.any():
        error = max(error, float(np.sqrt(np.mean(grad[zero] ** 2)) / zero_scale))
    return error


def _rms(x):
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _row_constant_bias_error(grad, want, zero_scale, q_shape, bias_shape):
    """gradient_error for a bias that is the same for every key of a row: its gradient
    sums the row's dS, which cancels to 0 (to a small value under a soft-cap, which bends
    the shifted logits), so the rounding left scales with the cancelled terms
    (`zero_scale`), and grows as the root of the rows a broadcast bias sums into each
    of its elements."""
    rows_summed = q_shape[0] * q_shape[1] * q_shape[2] / np.prod(bias_shape[:-1])
    scale = max(_rms(want), zero_scale * np.sqrt(rows_summed))
    return _rms(np.asarray(grad, np.float64) - np.asarray(want, np.float64)) / scale


def _cancelled_scales(q, k, dout, out, scale):
    """{dq, dk, dbias: the root-mean-square size of the terms P * dP (times key or query
    and scale for dq and dk) that the row term delta = rowsum(dO * O) cancels}. Where a
    row sees one key, its dq and dbias are exactly 0 (dk where every row that sees the
    key sees only it), and what is left is the rounding of O (in the kernels' dtype) in
    delta: 2**-8 of these terms in bf16, as in FlashAttention. Never below 1."""
    delta = np.sum(np.asarray(dout, np.float64) * out, axis=-1)  # [B, T, N]
    rows_per_key = q.shape[1] * q.shape[2] / k.shape[2]  # rows that reach each key
    return dict(dq=max(1.0, scale * _rms(delta) * _rms(k)),
                dk=max(1.0, scale * _rms(delta) * _rms(q) * np.sqrt(rows_per_key)),
                dbias=max(1.0, _rms(delta)))


def plain_operands():
    """The feature operands of a call with no masks or score modifiers, by plan name."""
    return {name: np.asarray(x) for name, x in features.no_operands().items()}


def check_against_float64(shape, implementation, seed_note="", with_grads=True, seed=None,
                          **kwargs):
    """One call of jt_attention.dot_product_attention (jitted) with the keyword arguments
    `kwargs` on fresh random inputs of `shape` (batch, seq_q, seq_k, heads, kv_heads,
    head_dim, dtype; from `seed` if given): output, logsumexp and gradients (q, k, v and a
    bias if given) against float64. Rows that see no key must give 0 and lse -inf.
    Each gradient must match float64's either exactly or at the output as returned: a
    FlashAttention-style backward takes delta = rowsum(dO * O) from the output rounded
    to its dtype, and where a row's terms cancel (a few visible keys) that rounding is
    most of the row's gradient."""
    batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype = shape
    (q, k, v), seed = random_inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype,
                                    seed)
    where = f"{seed=} {seed_note}"
    bias = kwargs.pop("bias", None)
    scale = kwargs.pop("scale", None) or 1 / np.sqrt(head_dim)
    is_causal = kwargs.pop("is_causal", False)

    @jax.jit
    def attend(q, k, v, bias):
        return jt_attention.dot_product_attention(
            q, k, v, bias, scale=scale, is_causal=is_causal, implementation=implementation,
            return_residual=True, **kwargs)

    (out, lse), vjp = jax.vjp(attend, q, k, v, bias)
    want_out, want_lse = attention_float64(q, k, v, scale, is_causal, bias=bias, **kwargs)
    tolerance = TOLERANCE[dtype]
    # the bias gradient is rounded to the bias's dtype
    bias_tolerance = tolerance if bias is None else max(tolerance,
                                                        TOLERANCE[np.dtype(bias.dtype).name])
    assert out.shape == q.shape and out.dtype == q.dtype, where
    assert relative_error(out, want_out) < tolerance, f"out {where}"
    seen = np.isfinite(want_lse)
    lse = np.asarray(lse, np.float64)
    assert np.all(lse[~seen] == -np.inf), f"lse of rows that see no key {where}"
    np.testing.assert_allclose(lse[seen], want_lse[seen], rtol=2 * tolerance, atol=2e-2,
                               err_msg=where)
    assert np.all(np.asarray(out)[~seen] == 0), f"rows that see no key must be 0 {where}"
    if not with_grads:
        return
    dout = random_cotangent(q.shape, dtype, seed)
    grads = vjp((jnp.asarray(dout), jnp.zeros_like(lse, dtype=q.dtype)))
    wanted = attention_grads_float64(q, k, v, dout, scale, is_causal, bias=bias, **kwargs)
    # delta's shift from the rounded output enters the gradients as an lse cotangent would
    dout64 = np.asarray(dout, np.float64)
    shift = np.sum(dout64 * np.asarray(out, np.float64), -1) - np.sum(dout64 * want_out, -1)
    wanted_at_output = attention_grads_float64(q, k, v, dout, scale, is_causal, dlse=-shift,
                                               bias=bias, **kwargs)
    cancelled = _cancelled_scales(q, k, dout, want_out, scale)
    for name, grad, x, *targets in zip(("dq", "dk", "dv", "dbias"), grads, (q, k, v, bias),
                                       wanted, wanted_at_output):
        assert grad.shape == x.shape and grad.dtype == x.dtype, f"{name} {where}"
        limit = bias_tolerance if name == "dbias" else tolerance
        if name == "dbias" and x.shape[-1] == 1:
            error = min(_row_constant_bias_error(grad, want, cancelled[name], q.shape, x.shape)
                        for want in targets)
        else:
            error = min(gradient_error(grad, want, cancelled.get(name, 1.0)) for want in targets)
        assert error < limit, f"{name} {where}"
