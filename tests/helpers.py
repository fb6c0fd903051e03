"""Float64 reference and input helpers for the tests."""

import jax.numpy as jnp
import numpy as np
from jt_attention import plan
from jt_attention.interpret import interpreter_enabled

# ||out - ref|| / ||ref|| bounds: about 5x the errors measured (GUIDE.md 5).
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


def random_inputs(batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim, dtype):
    """Fresh random q, k, v (a new seed per call); returns them and the seed."""
    seed = np.random.SeedSequence().entropy % 2**32
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq_q, num_heads, head_dim), (batch, seq_k, num_kv_heads, head_dim),
              (batch, seq_k, num_kv_heads, head_dim)]
    return [rng.standard_normal(s).astype(DTYPES[dtype]) for s in shapes], seed


def attention_float64(q, k, v, scale, is_causal):
    """[B, T, N, H] inputs -> (out [B, T, N, H], lse [B, T, N]) in float64."""
    group = q.shape[2] // k.shape[2]
    q = q.astype(np.float64)
    k = np.repeat(k.astype(np.float64), group, axis=2)
    v = np.repeat(v.astype(np.float64), group, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k, optimize=True) * scale
    if is_causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    probs = np.exp(logits - row_max)
    row_sum = probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", probs / row_sum, v, optimize=True)
    lse = (np.log(row_sum) + row_max)[..., 0].transpose(0, 2, 1)
    return out, lse


def relative_error(out, ref):
    out = np.asarray(out).astype(np.float64)
    assert np.isfinite(out).all(), "output has NaN or Inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def gradient_error(grad, want):
    """Relative error; absolute where the true gradient is zero (dq and dk with one key)."""
    if not np.any(want):
        grad = np.asarray(grad).astype(np.float64)
        assert np.isfinite(grad).all(), "gradient has NaN or Inf"
        return float(np.abs(grad).max())
    return relative_error(grad, want)


def attention_grads_float64(q, k, v, dout, scale, is_causal, dlse=None):
    """Gradients (dq, dk, dv) of <out, dout> + <lse, dlse> in float64, by the closed form.

    dP = dO.V^T, dS = P * (dP - rowsum(P * dP) + dlse); dq = scale dS.K,
    dk = scale dS^T.Q, dv = P^T.dO, summed over the query heads of a KV group."""
    batch, seq_q, heads, _ = q.shape
    group = heads // k.shape[2]
    q, dout = q.astype(np.float64), dout.astype(np.float64)
    k = np.repeat(k.astype(np.float64), group, axis=2)
    v = np.repeat(v.astype(np.float64), group, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k, optimize=True) * scale
    if is_causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dprobs = np.einsum("btnh,bsnh->bnts", dout, v, optimize=True)
    row_term = (probs * dprobs).sum(-1, keepdims=True)
    if dlse is not None:  # [B, T, N]
        row_term -= dlse.astype(np.float64).transpose(0, 2, 1)[..., None]
    dscores = probs * (dprobs - row_term)
    dq = scale * np.einsum("bnts,bsnh->btnh", dscores, k, optimize=True)
    dk = scale * np.einsum("bnts,btnh->bsnh", dscores, q, optimize=True)
    dv = np.einsum("bnts,btnh->bsnh", probs, dout, optimize=True)
    fold = lambda x: x.reshape(x.shape[0], x.shape[1], -1, group, x.shape[3]).sum(3)
    return dq, fold(dk), fold(dv)
