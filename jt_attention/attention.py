"""The public op: scaled dot-product attention with the API of `jax.nn.dot_product_attention`."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from jt_attention.plan import Problem
from jt_attention.reference import attention_reference

logger = logging.getLogger("jt_attention")

IMPLEMENTATIONS = (None, "triton", "interpret", "xla")
SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 1024


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, return_residual=False):
    """Scaled dot-product attention, a drop-in for `jax.nn.dot_product_attention`.

    out = softmax(scale * query . key^T) . value, per head.

    Args:
      query: [batch, q_len, num_heads, head_dim] (or [q_len, num_heads, head_dim]).
      key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads must be a
        multiple of num_kv_heads (grouped-query attention when they differ).
      bias, mask, query_seq_lengths, key_value_seq_lengths, local_window_size:
        not supported yet; anything but None raises NotImplementedError.
      scale: logit scale; default 1/sqrt(head_dim).
      is_causal: causal mask, top-left aligned when q_len != kv_len (query i sees
        keys 0..i), as in jax.nn.
      implementation: None (Triton kernels on a CUDA GPU, else 'xla', logged once),
        'triton', 'interpret' (the same Triton kernels in Triton's CPU interpreter;
        needs torch) or 'xla' (pure-jnp, fp32 accumulation).
      return_residual: also return the row logsumexp of the scaled logits,
        [batch, q_len, num_heads] in the input dtype, as jax.nn does.

    Supported: float16, bfloat16 and float32 (query, key and value alike); head_dim
    16 to 1024 (kernels: a flash online-softmax kernel up to 256, 64 for float32;
    above, two launches that write the probabilities once, taking the batch·heads in
    chunks whose [T, S] buffers stay within 2 GiB (tuning.SCORE_SCRATCH_BYTES), and,
    under jax.grad where kv_len <= head_dim, the softmax kept for the backward); any
    q_len and kv_len >= 1.

    Differentiable in reverse mode (jax.grad, jax.vjp, also under jit and remat) with
    Triton backward kernels, for the output and for the returned logsumexp; the
    gradients come back in the input dtype. Forward mode (jax.jvp, jax.jacfwd) is
    not supported: JAX raises "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function"; use reverse mode. Works under jax.vmap: the mapped axis
    folds into the batch, so one launch serves the whole map.
    """
    _reject_unsupported(bias=bias, mask=mask, query_seq_lengths=query_seq_lengths,
                        key_value_seq_lengths=key_value_seq_lengths,
                        local_window_size=local_window_size)
    query, key, value, unbatched = _as_batched(query, key, value)
    problem = _validated_problem(query, key, value, scale, is_causal, heads_major=False)
    out, lse = _attention(query, key, value, problem, resolve_implementation(implementation))
    lse = jnp.transpose(lse, (0, 2, 1)).astype(query.dtype)  # [B, T, N], as jax.nn
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out


def scaled_dot_product_attention(query, key, value, *, scale=None, is_causal=False,
                                 implementation=None):
    """The seed's layout, [batch, num_heads, seq, head_dim], like torch's function.

    Same kernels and rules as `dot_product_attention`; the head-major strides go to
    the kernels as they are, with no transpose.
    """
    for name, array in (("query", query), ("key", key), ("value", value)):
        _check_array(name, array)
        if array.ndim != 4:
            raise ValueError(f"{name}.ndim={array.ndim}; expected 4 "
                             "([batch, num_heads, seq, head_dim])")
    seq_major = [jax.ShapeDtypeStruct(x.shape[:1] + x.shape[2:3] + x.shape[1:2] + x.shape[3:],
                                      x.dtype) for x in (query, key, value)]
    problem = _validated_problem(*seq_major, scale, is_causal, heads_major=True)
    out, _ = _attention(query, key, value, problem, resolve_implementation(implementation))
    return out


def _reject_unsupported(**arguments):
    for name, argument in arguments.items():
        if argument is not None:
            raise NotImplementedError(f"jt_attention does not support {name} yet; pass "
                                      f"{name}=None or use jax.nn.dot_product_attention")


def _check_array(name, array):
    if not isinstance(array, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got {type(array).__name__}")


def _as_batched(query, key, value):
    """Checks types and ranks; adds the batch dim to [seq, heads, head_dim] inputs."""
    for name, array in (("query", query), ("key", key), ("value", value)):
        _check_array(name, array)
    if not (query.ndim == key.ndim == value.ndim and query.ndim in (3, 4)):
        raise ValueError(f"query, key and value must all be 4-D [batch, seq, heads, head_dim] "
                         f"or all 3-D; got ndims {query.ndim}, {key.ndim}, {value.ndim}")
    if query.ndim == 3:
        return query[None], key[None], value[None], True
    return query, key, value, False


def _validated_problem(query, key, value, scale, is_causal, heads_major):
    """Problem for the inputs' [B, S, H, D] shapes and dtypes, after checking them."""
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape; got {key.shape} and "
                         f"{value.shape}")
    batch, seq_q, num_heads, head_dim = query.shape
    _, seq_k, num_kv_heads, _ = key.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"key batch and head_dim must match query's {(batch, head_dim)}; "
                         f"got query {query.shape} and key {key.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} of query must be a multiple of {num_kv_heads=}")
    if seq_q < 1 or seq_k < 1 or batch < 1:
        raise ValueError(f"sequence lengths and batch must be >= 1; got {query.shape=}, "
                         f"{key.shape=}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{head_dim=} must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must share a dtype; got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype={query.dtype} is not supported; expected float16, bfloat16 "
                        "or float32")
    if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    scale = float(1.0 / np.sqrt(head_dim) if scale is None else scale)
    return Problem(batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim,
                   np.dtype(query.dtype), scale, bool(is_causal), heads_major)


@functools.cache
def _log_once(message, level=logging.INFO):
    logger.log(level, message)


def resolve_implementation(implementation):
    """What a call runs: `implementation`, or for None the machine's default (logged once)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{implementation=} must be one of {IMPLEMENTATIONS}")
    if implementation is not None:
        return implementation
    if getattr(jax.devices()[0], "compute_capability", None) is None:
        _log_once("jt_attention: no CUDA GPU, so implementation=None runs the XLA reference "
                  "(pure jnp), not the Triton kernels", logging.WARNING)
        return "xla"
    _log_once("jt_attention: implementation=None runs the Triton kernels on the CUDA GPU")
    return "triton"


def _reference(query, key, value, problem):
    """The XLA reference in the problem's layout; lse is [B, H, Sq] fp32."""
    if problem.heads_major:
        query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    out, lse = attention_reference(query, key, value, scale=problem.scale,
                                   is_causal=problem.is_causal)
    return (jnp.swapaxes(out, 1, 2) if problem.heads_major else out), lse


def _attention(query, key, value, problem, implementation):
    if implementation == "xla":
        return _reference(query, key, value, problem)
    return _kernel_attention(query, key, value, problem, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_attention(query, key, value, problem, implementation):
    return _kernel_forward(query, key, value, problem, implementation, for_backward=False)


def _kernel_forward(query, key, value, problem, implementation, for_backward):
    """(out, lse, *kept): `kept` are the buffers a backward pass reuses (plan.kept_buffers),
    written only `for_backward`."""
    launch = functools.partial(_launch_forward, for_backward=for_backward)
    return tuple(_foldable(launch, problem, implementation)(query, key, value))


def _launch_forward(problem, implementation, query, key, value, for_backward):
    if implementation == "triton":
        from jt_attention.launch import triton_forward
        return triton_forward(query, key, value, problem, for_backward)
    from jt_attention.interpret import interpret_forward
    return interpret_forward(query, key, value, problem, for_backward)


def _kernel_attention_fwd(query, key, value, problem, implementation):
    out, lse, *kept = _kernel_forward(query, key, value, problem, implementation,
                                      for_backward=True)
    # Residuals are O(B·H·S·D) and O(B·H·S): the backward recomputes the probabilities,
    # unless the forward could keep them no bigger than the output (Problem.keeps_probs).
    return (out, lse), (query, key, value, out, lse, *kept)


def _kernel_attention_bwd(problem, implementation, residuals, cotangents):
    # The lse cotangent is zero unless the caller differentiates return_residual's
    # logsumexp; it folds into delta, so it costs one read per row.
    dout, dlse = cotangents
    cotangents = (dout.astype(problem.dtype), dlse.astype(jnp.float32))
    return _foldable(_launch_backward, problem, implementation)(*residuals, *cotangents)


def _launch_backward(problem, implementation, *arrays):
    """arrays: plan.backward_inputs(problem), residuals then cotangents."""
    if implementation == "triton":
        from jt_attention.launch import triton_backward
        return triton_backward(arrays, problem)
    from jt_attention.interpret import interpret_backward
    return interpret_backward(arrays, problem)


def _foldable(launch, problem, implementation):
    """`launch(problem, implementation, *arrays)` as a function of the arrays that
    works under jax.vmap.

    jax-triton's kernel calls have no batching rule. Every array here has the batch
    on axis 0, so a mapped axis folds into it: one launch over axis_size x batch
    (arrays that are not mapped are broadcast first)."""
    @custom_vmap
    def call(*arrays):
        return launch(problem, implementation, *arrays)

    @call.def_vmap
    def fold_into_batch(axis_size, in_batched, *arrays):
        arrays = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                  for x, batched in zip(arrays, in_batched)]
        folded = [x.reshape(axis_size * problem.batch, *x.shape[2:]) for x in arrays]
        wider = dataclasses.replace(problem, batch=axis_size * problem.batch)
        outs = _foldable(launch, wider, implementation)(*folded)
        outs = jax.tree.map(lambda y: y.reshape(axis_size, problem.batch, *y.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return call


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)
