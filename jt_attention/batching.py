"""jax.vmap of the kernel launches: jax-triton's kernel calls have no batching rule.

A mapped axis folds into the batch: one launch over axis_size x batch (every array has
its batch on axis 0). Arrays that are not mapped are broadcast to the whole batch
first, except the bias, mask and span operands of batch 1, which the kernels broadcast
(a bias whose gradient is taken is broadcast here, so that each element gets its own).
The dropout seeds, indexed by batch element and head in the kernels
(features.dropout_seeds), are broadcast like the query: each element of the map then
draws what a call of its own would.

A forward launch whose key and value are not mapped (several queries against one set
of keys and values: beams, candidates) may fold the mapped axis into the query heads
instead. Query head n of element a, which reads KV head k = n // group, becomes query
head (k * axis_size + a) * group + n % group of one launch, which still reads KV head
k: the key and value reach the kernels once, unbroadcast. The query, the outputs and
any mapped operand with a heads dim are transposed on the way (a copy each), and
unmapped operands with a heads dim are broadcast along the map: the launch takes the
fold that copies fewer bytes. A backward launch folds into the batch, as each element
needs dK and dV of its own.
"""

import math

import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from jt_attention import partitioning

# The operands whose size-1 dims the kernels broadcast (their features.layout codes);
# the kernels index every other array's batch and heads in full, a size of 1 included.
BROADCAST_OPERANDS = ("bias", "mask", "key_spans", "query_spans")


def foldable(launch, problem, implementation, names, output_names):
    """`launch(problem, implementation, *arrays)` as a function of the arrays (named
    `names`, returning `output_names`, as the plan names them) that works under
    jax.vmap."""
    @custom_vmap
    def call(*arrays):
        return launch(problem, implementation, *arrays)

    @call.def_vmap
    def fold(axis_size, in_batched, *arrays):
        mapped = dict(zip(names, in_batched))
        if _heads_bytes(problem, names, output_names, arrays, mapped, axis_size) < \
                _batch_bytes(problem, names, arrays, mapped, axis_size):
            fold_one, unfold_one = _into_heads, _out_of_heads
        else:
            fold_one, unfold_one = _into_batch, _out_of_batch
        folded = [fold_one(x, name, mapped[name], axis_size, problem)
                  for x, name in zip(arrays, names)]
        wider = partitioning.problem_for_shapes(  # the new batch or heads, operand shapes
            problem, {name: x.shape for name, x in zip(names, folded)})
        outs = foldable(launch, wider, implementation, names, output_names)(*folded)
        outs = tuple(unfold_one(y, name, axis_size, problem)
                     for y, name in zip(outs, output_names))
        return outs, (True,) * len(outs)

    return call


# --- into the batch --------------------------------------------------------------------

def _kept_as_is(x, name, mapped, problem):
    """Whether the batch fold passes x unchanged: an unmapped operand of batch 1 that the
    kernels broadcast (not a bias whose gradient is taken)."""
    if name == "bias" and problem.features.bias_grad:
        return False
    return not mapped and name in BROADCAST_OPERANDS and x.shape[0] == 1


def _into_batch(x, name, mapped, axis_size, problem):
    """x with the mapped axis folded into its batch (axis 0 of each element)."""
    if _kept_as_is(x, name, mapped, problem):
        return x
    shape = x.shape[1:] if mapped else x.shape  # an element's
    x = jnp.broadcast_to(x, (axis_size, problem.batch, *shape[1:]))
    return x.reshape(axis_size * problem.batch, *shape[1:])


def _out_of_batch(y, name, axis_size, problem):
    del name
    return y.reshape(axis_size, problem.batch, *y.shape[1:])


def _batch_bytes(problem, names, arrays, mapped, axis_size):
    """Bytes the batch fold copies: the unmapped arrays it broadcasts."""
    return sum(axis_size * _nbytes(x) for x, name in zip(arrays, names)
               if not mapped[name] and not _kept_as_is(x, name, False, problem))


# --- into the query heads --------------------------------------------------------------

def _heads_axis(name, ndim, problem):
    """The query-heads axis of an element of array `name` with `ndim` dims, or None where
    it has none (or is a one-element placeholder)."""
    expected = partitioning.expected_roles(name, problem)
    return expected.index("n") if len(expected) == ndim and "n" in expected else None


def _heads_bytes(problem, names, output_names, arrays, mapped, axis_size):
    """Bytes the heads fold copies (the transposed and broadcast arrays, and the output
    out, as large as the query), or infinity where it cannot serve: an output without
    query heads (dK, dV), or a mapped array without them (the key, the value, segment
    ids)."""
    if any("n" not in partitioning.expected_roles(name, problem) for name in output_names):
        return math.inf
    copied = 0
    for x, name in zip(arrays, names):
        ndim = x.ndim - mapped[name]
        axis = _heads_axis(name, ndim, problem)
        if mapped[name] and axis is None:
            return math.inf
        over_map = _nbytes(x) * (1 if mapped[name] else axis_size)
        if mapped[name] or (axis is not None and not _broadcast(x, name, axis)):
            copied += over_map
        if name == "q":
            copied += over_map  # the output, as large
    return copied


def _into_heads(x, name, mapped, axis_size, problem):
    """x with the mapped axis folded into its query heads: [.., K, A, G, ..] for an
    element's [.., K * G, ..] (KV heads K, group G, map A)."""
    axis = _heads_axis(name, x.ndim - mapped, problem)
    if axis is None or (not mapped and _broadcast(x, name, axis)):
        return x  # the same for every element of the map and head
    if not mapped:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    axis += 1  # behind the mapped axis
    kv_heads = problem.num_kv_heads
    shape = x.shape[:axis] + (problem.num_heads,) + x.shape[axis + 1:]
    x = jnp.broadcast_to(x, shape)  # a heads dim of 1 (mapped) to every head
    x = x.reshape(shape[:axis] + (kv_heads, problem.num_heads // kv_heads) + shape[axis + 1:])
    x = jnp.moveaxis(x, 0, axis)  # [.., K, A, G, ..]
    return x.reshape(shape[1:axis] + (axis_size * problem.num_heads,) + shape[axis + 1:])


def _out_of_heads(y, name, axis_size, problem):
    """An output of the heads fold, [.., K * A * G, ..], as [A, .., K * G, ..]."""
    axis = _heads_axis(name, y.ndim, problem)
    kv_heads = problem.num_kv_heads
    group = problem.num_heads // kv_heads
    y = y.reshape(y.shape[:axis] + (kv_heads, axis_size, group) + y.shape[axis + 1:])
    y = jnp.moveaxis(y, axis + 1, 0)
    return y.reshape(y.shape[:axis + 1] + (problem.num_heads,) + y.shape[axis + 3:])


def _broadcast(x, name, axis):
    """Whether the kernels broadcast x's dim `axis` (size 1 of a BROADCAST_OPERANDS one)."""
    return name in BROADCAST_OPERANDS and x.shape[axis] == 1


def _nbytes(x):
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
