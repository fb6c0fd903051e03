"""The public op: scaled dot-product attention with the API of `jax.nn.dot_product_attention`."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jt_attention import batching, partitioning
from jt_attention import features as features_lib
from jt_attention.log import log_once
from jt_attention.plan import FEATURE_INPUTS, Problem, backward_inputs
from jt_attention.reference import attention_reference


IMPLEMENTATIONS = (None, "triton", "interpret", "xla")
SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 1024


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, return_residual=False,
                          logits_soft_cap=None, query_segment_ids=None,
                          key_value_segment_ids=None, dropout_rate=0.0, dropout_rng=None,
                          broadcast_dropout=False):
    """Scaled dot-product attention, a drop-in for `jax.nn.dot_product_attention`.

    out = softmax(scale * query . key^T + bias, masked) . value, per head.

    Args:
      query: [batch..., q_len, num_heads, head_dim]: one batch dim as in jax.nn, none
        ([q_len, num_heads, head_dim]), or several (folded into one for the kernels).
      key, value: [batch..., kv_len, num_kv_heads, head_dim]; num_heads must be a
        multiple of num_kv_heads (grouped-query attention when they differ).
      bias: added to the scaled logits; up to 4 dims (with several batch dims, up to
        3 more than their count) broadcastable to [batch, num_heads, q_len, kv_len],
        as in jax.nn; float16, bfloat16 or float32 are read as they are (other dtypes
        are cast to float32). Differentiable: its gradient comes back in its shape and
        dtype, summed over the dims it broadcasts along.
      mask: a boolean array broadcastable like `bias`; True where the key is visible.
      scale: logit scale; default 1/sqrt(head_dim).
      is_causal: query i sees keys 0..i, top-left aligned when q_len != kv_len, as in
        jax.nn.
      query_seq_lengths, key_value_seq_lengths: int32 [batch...]: query rows and keys
        at or past the length are padding. Padded query rows return 0.
      local_window_size: an int w or (left, right): query i sees keys i - left to
        i + right (w: both sides). Alone or with is_causal.
      implementation: None (Triton kernels on a CUDA GPU, else 'xla', logged once),
        'triton', 'interpret' (the same Triton kernels in Triton's CPU interpreter;
        needs torch) or 'xla' (jt_attention.attention_reference: pure jnp, fp32).
      return_residual: also return the row logsumexp of the scaled logits,
        [batch..., q_len, num_heads] in the input dtype, as jax.nn does.
      logits_soft_cap (keyword only, beyond jax.nn): logits become
        cap * tanh(logits / cap) after the scale and the bias (Gemma 2's soft-cap).
      query_segment_ids, key_value_segment_ids (keyword only, beyond jax.nn): int32
        [batch..., q_len] and [batch..., kv_len]; a query sees a key only where their
        ids are equal (packed sequences). Ids in runs (non-decreasing) let the kernels
        skip blocks; any other order is still exact, but slower.
      dropout_rate, dropout_rng, broadcast_dropout (keyword only, beyond jax.nn):
        attention dropout after the softmax, as Flax applies it: each probability is
        kept with probability 1 - dropout_rate and scaled by 1 / (1 - dropout_rate).
        dropout_rng is a jax.random key; the kernels draw the mask from it and each
        element's position (Philox), and the backward draws it again, so no mask is
        stored. broadcast_dropout: one mask for every batch element and head (Flax's
        default). The 'xla' path draws the same mask (features.dropout_keep).

    Every feature combines with every other, with grouped-query attention and with
    q_len != kv_len. One difference from jax.nn: a query row that sees no key at all
    (every key masked, or a padded row) returns 0, with a logsumexp of -inf and zero
    gradients, where jax.nn returns the mean of the values. The returned logsumexp is
    differentiable here (jax.nn stops its gradient).

    Supported: float16, bfloat16 and float32 (query, key and value alike); head_dim
    1 to 1024 (kernels: a flash online-softmax kernel up to 256, 64 for float32;
    above, two launches that write the probabilities once, taking the batch·heads in
    chunks whose [T, S] buffers stay within 2 GiB (tuning.SCORE_SCRATCH_BYTES), and,
    under jax.grad where kv_len <= head_dim and no soft-cap is given, the softmax kept
    for the backward); any q_len and kv_len >= 1.

    Differentiable in reverse mode (jax.grad, jax.vjp, also under jit and remat) with
    Triton backward kernels, for the output and for the returned logsumexp; the
    gradients come back in the input dtype. Forward mode (jax.jvp, jax.jacfwd) is
    not supported: JAX raises "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function"; use reverse mode. Works under jax.vmap: the mapped axis
    folds into the batch, or where the key and value are not mapped into the query
    heads, so one launch serves the whole map (jt_attention/batching.py). Under jax.jit
    with inputs sharded over a mesh along the batch or the heads (whole KV groups),
    each device runs the kernels on its own shard, with no collective, and the output
    stays sharded; other shardings are gathered and logged once
    (jt_attention/partitioning.py).
    """
    out, lse = attention_and_logsumexp(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, implementation=implementation,
        logits_soft_cap=logits_soft_cap, query_segment_ids=query_segment_ids,
        key_value_segment_ids=key_value_segment_ids, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, broadcast_dropout=broadcast_dropout)
    return (out, lse.astype(query.dtype)) if return_residual else out


def attention_and_logsumexp(query, key, value, bias=None, mask=None, *, scale=None,
                            is_causal=False, query_seq_lengths=None,
                            key_value_seq_lengths=None, local_window_size=None,
                            implementation=None, logits_soft_cap=None, query_segment_ids=None,
                            key_value_segment_ids=None, dropout_rate=0.0, dropout_rng=None,
                            broadcast_dropout=False):
    """dot_product_attention's arguments -> (out, logsumexp): the logsumexp in float32,
    [batch..., q_len, num_heads], differentiable like the output. For merging partial
    attentions over key blocks (ring attention), which the input dtype would blur."""
    query, key, value, batch_shape = _batched(query, key, value)
    problem = _validated_problem(query, key, value, scale, is_causal, heads_major=False)
    features, arguments = features_lib.prepare(
        batch_shape or (1,), problem.seq_q, problem.seq_k, problem.num_heads, bias, mask,
        query_seq_lengths, key_value_seq_lengths, local_window_size, logits_soft_cap,
        query_segment_ids, key_value_segment_ids, dropout_rate, dropout_rng, broadcast_dropout)
    problem = dataclasses.replace(problem, features=features)
    try:
        out, lse = _attention(query, key, value, arguments, problem,
                              resolve_implementation(implementation))
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise TypeError(FORWARD_MODE_MESSAGE) from error
    lse = jnp.transpose(lse, (0, 2, 1))  # [B, T, N], as jax.nn
    return (out.reshape(*batch_shape, *out.shape[1:]),
            lse.reshape(*batch_shape, *lse.shape[1:]))


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
    out, _ = _attention(query, key, value, features_lib.Arguments(), problem,
                        resolve_implementation(implementation))
    return out


def _check_array(name, array):
    if not isinstance(array, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got {type(array).__name__}")


def _batched(query, key, value):
    """(query, key, value with one batch dim, the leading batch dims given) after checking
    types and ranks: [seq, heads, head_dim] gains a batch of 1 (batch dims ()), and
    several batch dims fold into one."""
    for name, array in (("query", query), ("key", key), ("value", value)):
        _check_array(name, array)
    if not (query.ndim == key.ndim == value.ndim and query.ndim >= 3):
        raise ValueError(f"query, key and value must all be [batch..., seq, heads, head_dim] "
                         f"(3-D or more) with the same rank; got ndims {query.ndim}, "
                         f"{key.ndim}, {value.ndim}")
    batch_shape = tuple(query.shape[:-3])
    for name, array in (("key", key), ("value", value)):
        if tuple(array.shape[:-3]) != batch_shape:
            raise ValueError(f"{name}'s batch dims {tuple(array.shape[:-3])} must match "
                             f"query's {batch_shape}")
    batch = int(np.prod(batch_shape))
    return (*(x.reshape(batch, *x.shape[-3:]) for x in (query, key, value)), batch_shape)


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
    if num_kv_heads < 1 or num_heads % num_kv_heads:
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


FORWARD_MODE_MESSAGE = (
    "jt_attention.dot_product_attention is differentiable in reverse mode only (jax.grad, "
    "jax.vjp, jax.jacrev); forward mode (jax.jvp, jax.jacfwd, jax.hessian) is not supported. "
    "Use reverse mode, or implementation='xla' (pure jnp, every transformation).")
SECOND_ORDER_MESSAGE = (
    "jt_attention's backward kernels are not differentiable: grad-of-grad (and the Hessian) "
    "is not supported. Take first-order reverse-mode gradients (jax.grad, jax.vjp), or use "
    "implementation='xla' (pure jnp, every order).")


def _has_cuda_gpu():
    try:
        return any(getattr(d, "compute_capability", None) for d in jax.devices())
    except RuntimeError:
        return False


def resolve_implementation(implementation):
    """What a call runs: `implementation`, or for None the machine's default (logged once)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}: None picks 'triton' on a CUDA GPU, else 'xla'")
    if implementation == "triton" and not _has_cuda_gpu():
        raise RuntimeError(
            "implementation='triton' runs the Triton kernels on a CUDA GPU, and JAX sees "
            f"none (devices: {[d.platform for d in jax.devices()]}). On a CPU take "
            "implementation='interpret' (the same kernels in Triton's interpreter: start "
            "the process with TRITON_INTERPRET=1) or 'xla' (pure jnp); install a CUDA "
            "jaxlib (pip install 'jt_attention[cuda]') to run the kernels.")
    if implementation is not None:
        return implementation
    if not _has_cuda_gpu():
        log_once("jt_attention: no CUDA GPU, so implementation=None runs the XLA reference "
                 "(pure jnp), not the Triton kernels", logging.WARNING)
        return "xla"
    log_once("jt_attention: implementation=None runs the Triton kernels on the CUDA GPU")
    return "triton"


def _reference(query, key, value, arguments, problem):
    """The XLA reference in the problem's layout; lse is [B, H, Sq] fp32."""
    if problem.heads_major:
        query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    features = problem.features
    out, lse = attention_reference(
        query, key, value, arguments.bias, arguments.mask, scale=problem.scale,
        is_causal=problem.is_causal, query_seq_lengths=arguments.query_seq_lengths,
        key_value_seq_lengths=arguments.key_value_seq_lengths,
        local_window_size=None if features.window == (-1, -1) else features.window,
        logits_soft_cap=features.soft_cap or None,
        query_segment_ids=arguments.query_segment_ids,
        key_value_segment_ids=arguments.key_value_segment_ids,
        dropout_rate=features.dropout_rate, dropout_rng=arguments.dropout_rng,
        broadcast_dropout=features.dropout_broadcast)
    return (jnp.swapaxes(out, 1, 2) if problem.heads_major else out), lse


def _attention(query, key, value, arguments, problem, implementation):
    if implementation == "xla":
        return _reference(query, key, value, arguments, problem)
    features, operands = features_lib.kernel_operands(
        problem.features, arguments, (problem.batch, problem.num_heads, problem.seq_q,
                                      problem.seq_k))
    problem = dataclasses.replace(problem, features=features)
    bias, *others = operands.arrays()
    return _kernel_attention(query, key, value, bias, tuple(others), problem, implementation)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
    """A residual that is no array: the problem the backward runs."""
    problem: Problem


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel_attention(query, key, value, bias, others, problem, implementation):
    """(out, lse). bias: the bias or its placeholder; others: the other feature operands
    (features.Operands, after the bias), which are not differentiable."""
    return _kernel_forward(query, key, value, bias, others, problem, implementation,
                           for_backward=False)


FORWARD_INPUTS = ("q", "k", "v") + FEATURE_INPUTS


def _kernel_forward(query, key, value, bias, others, problem, implementation, for_backward):
    """(out, lse, *kept): `kept` are the buffers a backward pass reuses (plan.kept_buffers),
    written only `for_backward`."""
    return _forward_kernels(problem, implementation, for_backward, query, key, value, bias,
                            *others)


# The launches are custom_jvp functions only so that differentiating them (grad of grad,
# where JAX differentiates the custom_vjp's own rules) names the limit; JAX would blame
# a pure_callback or a kernel call.
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _forward_kernels(problem, implementation, for_backward, *arrays):
    kind = partitioning.FORWARD_FOR_BACKWARD if for_backward else partitioning.FORWARD
    return _varying_like(_vmappable(kind, problem, implementation)(*arrays), arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _backward_kernels(problem, implementation, *arrays):
    return _varying_like(_vmappable(partitioning.BACKWARD, problem, implementation)(*arrays),
                         arrays)


def _vmappable(kind, problem, implementation):
    """The launches of `kind` as a function of their arrays that works under jax.vmap."""
    return batching.foldable(_launcher(kind, implementation), problem, implementation,
                             *partitioning.array_names(kind, problem))


def _varying_like(outputs, inputs):
    """Inside jax.shard_map (check_vma=True) arrays carry the mesh axes they vary over;
    the kernel calls (jax-triton's, the interpreter's callback) return arrays without
    them, and JAX would then reject the custom VJP's gradients. Give the outputs the
    axes the inputs vary over."""
    axes = set().union(*(varying_axes(x) for x in inputs))
    return tuple(jax.lax.pcast(y, tuple(sorted(axes - varying_axes(y))), to="varying")
                 if axes - varying_axes(y) else y for y in outputs)


def varying_axes(x):
    """The manual mesh axes x's type says it varies over (none outside shard_map)."""
    aval = jax.typeof(x)
    if hasattr(aval, "mat"):  # the jax 0.10 spelling
        return frozenset(getattr(aval.mat, "varying", ()) or ())
    return frozenset(getattr(aval, "vma", ()) or ())


def _second_order(*_):
    raise NotImplementedError(SECOND_ORDER_MESSAGE)


_forward_kernels.defjvp(_second_order)
_backward_kernels.defjvp(_second_order)


def _launch(kind, problem, implementation, *arrays):
    """One launch of `kind` (partitioning.KINDS) on the plan's arrays, as a tuple."""
    if kind == partitioning.BACKWARD:
        return tuple(_launch_backward(problem, implementation, *arrays))
    return tuple(_launch_forward(problem, implementation, *arrays,
                                 for_backward=kind == partitioning.FORWARD_FOR_BACKWARD))


# Under jax.jit with sharded operands each device launches on its own shard
# (partitioning.py: the batch and heads partition, the rest is gathered).
_partitioned_launch = partitioning.partitioned(_launch)


def _launcher(kind, implementation):
    """`launch(problem, implementation, *arrays)` for `kind`: partitioned, except the
    interpreter off the CPU (its partitioned launch is a CPU custom call)."""
    if implementation == "interpret" and jax.default_backend() != "cpu":
        return functools.partial(_launch, kind)
    return functools.partial(_partitioned_launch, kind)


def _launch_forward(problem, implementation, *arrays, for_backward):
    buffers = dict(zip(FORWARD_INPUTS, arrays))
    if implementation == "triton":
        from jt_attention.launch import triton_forward
        return triton_forward(buffers, problem, for_backward)
    from jt_attention.interpret import interpret_forward
    return interpret_forward(buffers, problem, for_backward)


def _kernel_attention_fwd(query, key, value, bias, others, problem, implementation):
    # symbolic_zeros: the primals come wrapped, telling which are differentiated.
    bias_grad = bias.perturbed
    query, key, value, bias = (x.value for x in (query, key, value, bias))
    others = tuple(x.value for x in others)
    out, lse, *kept = _kernel_forward(query, key, value, bias, others, problem, implementation,
                                      for_backward=True)
    backward = dataclasses.replace(problem, features=dataclasses.replace(
        problem.features, bias_grad=bias_grad))
    # Residuals are O(B·H·S·D) and O(B·H·S): the backward recomputes the probabilities,
    # unless the forward could keep them no bigger than the output (Problem.keeps_probs).
    return (out, lse), (_Static(backward), query, key, value, bias, *others, out, lse, *kept)


def _kernel_attention_bwd(problem, implementation, residuals, cotangents):
    # The lse cotangent is zero unless the caller differentiates return_residual's
    # logsumexp; it folds into delta, so it costs one read per row.
    static, *residuals = residuals
    problem = static.problem
    dout, dlse = (jnp.zeros(c.aval.shape, c.aval.dtype) if isinstance(c, SymbolicZero) else c
                  for c in cotangents)
    cotangents = (dout.astype(problem.dtype), dlse.astype(jnp.float32))
    dq, dk, dv, *bias_grad = _backward_kernels(problem, implementation, *residuals,
                                               *cotangents)
    return dq, dk, dv, _bias_grad(bias_grad, residuals[3]), None


def _bias_grad(bias_grad, bias):
    """The backward's "dbias" output (a list of one, or none) as the bias's cotangent."""
    if not bias_grad:
        return None
    dbias = bias_grad[0]
    if dbias.shape != bias.shape:  # under jax.vmap a broadcast batch dim was widened
        dbias = dbias.sum(axis=0, keepdims=True)
    return dbias.astype(bias.dtype)


def _launch_backward(problem, implementation, *arrays):
    """arrays: plan.backward_inputs(problem), residuals then cotangents."""
    buffers = dict(zip(backward_inputs(problem), arrays))
    if implementation == "triton":
        from jt_attention.launch import triton_backward
        return triton_backward(buffers, problem)
    from jt_attention.interpret import interpret_backward
    return interpret_backward(buffers, problem)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd, symbolic_zeros=True)
