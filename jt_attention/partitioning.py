"""Partitioning of the kernel launches under `jax.jit` with sharded inputs.

Each launch of the forward or the backward (attention.py `_forward_kernels`,
`_backward_kernels`) is a `jax.experimental.custom_partitioning` op, so that XLA's
partitioner runs it per device on the device's shard instead of gathering every
operand onto one device:

- Batch: the mesh axes that shard the query's batch dim shard every operand's and
  result's batch dim (where it is not broadcast, size 1), and the kernels run on the
  local batch. No collective.
- Heads: the mesh axes that shard the query's heads dim shard the query heads and the
  KV heads alike, in whole KV groups: only where they divide num_kv_heads (q head n
  reads KV head n // group, so each shard keeps its groups whole and dK, dV need no
  sum). Otherwise the heads are gathered.
- Everything else (sequence dims, head_dim, and any operand sharded unlike the query)
  is gathered (replicated) before the launch; a log line (logger "jt_attention", once
  per message) names the mesh axis.
- Dropout reads each head's Philox key and stream from the [batch, heads, 2] seeds
  operand (features.dropout_seeds), which is sharded like the query: a shard draws
  its elements' mask as the unsharded call does.
- The bias gradient of a bias broadcast along the batch (or the heads) while the batch
  (or the heads) is sharded: each shard sums its own batch elements (heads) only, and
  the lowered function sums those partials over the sharding mesh axes (psum, in
  float32), so every device holds the whole, replicated gradient.

Inside `jax.shard_map` (every mesh axis manual) the arrays are already local and the
op runs as it is; on one device it is the plain launch. Shardy (JAX's default
partitioner) reads `_sharding_rule`; the GSPMD partitioner reads
`_infer_sharding_from_operands`. Both only steer propagation: `_partition` decides.
"""

import base64
import ctypes
import dataclasses
import functools
import math
import pickle

import jax
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jt_attention.log import log_once, logger
from jt_attention.plan import (FEATURE_INPUTS, backward_inputs, backward_outputs,
                               forward_outputs)


FORWARD, FORWARD_FOR_BACKWARD, BACKWARD = "forward", "forward_for_backward", "backward"
KINDS = (FORWARD, FORWARD_FOR_BACKWARD, BACKWARD)

# Dim roles: the sizes of Problem they stand for. "n" query heads, "k" KV heads.
_ROLE_SIZES = dict(b="batch", n="num_heads", k="num_kv_heads", t="seq_q", s="seq_k",
                   d="head_dim")
_ROLE_NAMES = dict(b="batch", n="heads", k="kv heads", t="q_len", s="kv_len", d="head_dim")
_QUERY_LIKE = ("q", "out", "dq", "dout")
_KEY_LIKE = ("k", "v", "dk", "dv")


def array_names(kind, problem):
    """(input names, output names) of a launch of `kind` (KINDS), as the plan names them."""
    if kind == BACKWARD:
        return backward_inputs(problem), backward_outputs(problem)
    return (("q", "k", "v") + FEATURE_INPUTS,
            forward_outputs(problem, kind == FORWARD_FOR_BACKWARD))


def problem_for_shapes(problem, shapes):
    """`problem` for operands of these shapes (name -> shape, at least q and k and the
    feature operands): the batch and heads from q and k, the bias, mask and span
    layouts from theirs. Sequence lengths and head_dim stay as they are."""
    heads_axis = 1 if problem.heads_major else 2
    features = problem.features
    features = dataclasses.replace(
        features,
        bias=tuple(shapes["bias"]) if features.bias else (),
        mask=tuple(shapes["mask"]) if features.mask else (),
        spans=tuple(shapes["key_spans"][:2]) if features.spans else ())
    return dataclasses.replace(problem, batch=shapes["q"][0],
                               num_heads=shapes["q"][heads_axis],
                               num_kv_heads=shapes["k"][heads_axis], features=features)


def expected_roles(name, problem):
    """What each dim of the array `name` is (a _ROLE_SIZES key; None: none of the
    problem's dims), where it has every dim."""
    if name in _QUERY_LIKE:
        return ("b", "n", "t", "d") if problem.heads_major else ("b", "t", "n", "d")
    if name in _KEY_LIKE:
        return ("b", "k", "s", "d") if problem.heads_major else ("b", "s", "k", "d")
    return {"bias": ("b", "n", "t", "s"), "mask": ("b", "n", "t", "s"),
            "dbias": ("b", "n", "t", "s"), "query_segments": ("b", "t"),
            "key_segments": ("b", "s"), "key_spans": ("b", "n", None, "t"),
            "query_spans": ("b", "n", None, "s"), "dropout_seeds": ("b", "n", None),
            "lse": ("b", "n", "t"), "dlse": ("b", "n", "t"),
            "probs": ("b", "n", "t", None)}[name]


def roles(name, shape, problem):
    """What each dim of the array `name` of `shape` is (a _ROLE_SIZES key), or None where
    it is broadcast (size 1), a placeholder's, or none of the problem's dims."""
    expected = expected_roles(name, problem)
    if len(expected) != len(shape):  # a one-element placeholder
        return (None,) * len(shape)
    return tuple(role if role and size > 1 and size == getattr(problem, _ROLE_SIZES[role])
                 else None for role, size in zip(expected, shape))


# --- Shardy ------------------------------------------------------------------------

def _sharding_rule(kind, problem, implementation, mesh, operand_types, result_types):
    """The einsum-like Shardy rule: batch "b", KV heads "k" and query heads "n" (the
    same factor as k where each KV head serves one query head) pass through; every
    other factor needs replication. Grouped query heads are not the compound (k g):
    query heads sharded over more devices than there are KV heads would then have
    Shardy split the mesh axis into sub-axes for k, a sharding custom_partitioning
    cannot hand to _partition. _decide keeps the groups whole instead."""
    del implementation, mesh
    from jax._src.lib.mlir import ir

    inputs, outputs = array_names(kind, problem)
    heads = "k" if problem.num_heads == problem.num_kv_heads else "n"
    fresh = iter(f"x{i}" for i in range(10**6))
    used = {}  # factor -> None, in order of appearance (Shardy wants them sorted)

    def mapping(name, ir_type):
        shape = tuple(ir.RankedTensorType(ir_type).shape)
        factors = []
        for role in roles(name, shape, problem):
            if role is None:
                factor = next(fresh)
            elif role == "n":
                factor = heads
            else:
                factor = role
            used[factor] = None
            factors.append(factor)
        return " ".join(factors)

    operands = [mapping(n, t) for n, t in zip(inputs, operand_types)]
    results = [mapping(n, t) for n, t in zip(outputs, result_types)]
    rule = ", ".join(operands) + " -> " + ", ".join(results)
    options = dict(need_replication_factors=tuple(f for f in used if f not in ("b", "k", "n")))
    return rule, options


# --- the decision --------------------------------------------------------------------

def _axes(spec, dim):
    """Mesh axis names sharding `dim` in a PartitionSpec, as a tuple."""
    entry = spec[dim] if dim < len(spec) else None
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _size(mesh, axes):
    return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Mesh axes for the batch and the heads (both () where not partitioned)."""
    batch: tuple
    heads: tuple

    def spec(self, array_roles):
        by_role = dict(b=self.batch, n=self.heads, k=self.heads)
        return PartitionSpec(*(_spec_entry(by_role.get(r, ())) for r in array_roles))


def _decide(problem, mesh, names, arg_shapes):
    """The _Plan for these operands (ShapeDtypeStructs with NamedShardings), logging once
    what is gathered and why."""
    unsharded = NamedSharding(mesh, PartitionSpec())
    shardings = {n: s.sharding or unsharded for n, s in zip(names, arg_shapes)}
    q_roles = roles("q", arg_shapes[0].shape, problem)
    q_spec = shardings["q"].spec
    batch = _axes(q_spec, q_roles.index("b")) if "b" in q_roles else ()
    heads = _axes(q_spec, q_roles.index("n")) if "n" in q_roles else ()
    if batch and problem.batch % _size(mesh, batch):
        log_once(f"jt_attention: the batch ({problem.batch}) does not split evenly over "
                 f"mesh axes {batch}: the batch is gathered")
        batch = ()
    if heads and problem.num_kv_heads % _size(mesh, heads):
        log_once(f"jt_attention: heads sharded over mesh axes {heads} ({_size(mesh, heads)} "
                 f"shards) would split the {problem.num_kv_heads} KV heads' groups of "
                 f"{problem.num_heads // problem.num_kv_heads} query heads: the kernels "
                 "take whole KV groups, so the heads are gathered")
        heads = ()
    plan = _Plan(batch, heads)
    for name, shape in zip(names, arg_shapes):
        array_roles = roles(name, shape.shape, problem)
        spec = shardings[name].spec
        wanted = plan.spec(array_roles)
        for dim, role in enumerate(array_roles):
            extra = [a for a in _axes(spec, dim) if a not in _axes(wanted, dim)]
            if extra:
                what = _ROLE_NAMES[role] if role else f"dim {dim}"
                log_once(f"jt_attention: {name}'s {what} dim is sharded over mesh axis "
                         f"{', '.join(map(repr, extra))}; the attention kernels partition "
                         "only the batch and heads (as the query's), so that axis is "
                         "gathered there")
    return plan


def _named(mesh, arg_shapes):
    """Whether the partitioner gave the query a NamedSharding on a mesh (else everything
    is gathered). Other operands may have none yet (GSPMD's propagation): unsharded."""
    return (mesh is not None and not mesh.empty
            and isinstance(arg_shapes[0].sharding, NamedSharding)
            and all(isinstance(s.sharding, (NamedSharding, type(None))) for s in arg_shapes))


def _fallback_mesh(mesh, arg_shapes):
    """`mesh`, or where it is empty a one-axis mesh over the operands' devices: for
    replicated shardings."""
    if mesh is not None and not mesh.empty:
        return mesh
    sharding = next(s.sharding for s in arg_shapes if s.sharding is not None)
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return Mesh(np.array(devices), ("_jt_attention_devices",))


def _partition(run, kind, problem, implementation, mesh, arg_shapes, result_shape):
    inputs, outputs = array_names(kind, problem)
    if _named(mesh, arg_shapes):
        plan = _decide(problem, mesh, inputs, arg_shapes)
    else:
        log_once("jt_attention: the operands' shardings name no mesh axes: the attention "
                 "kernels run on gathered operands")
        mesh, plan = _fallback_mesh(mesh, arg_shapes), _Plan((), ())
    arg_shardings = tuple(NamedSharding(mesh, plan.spec(roles(n, s.shape, problem)))
                          for n, s in zip(inputs, arg_shapes))
    result_shardings = tuple(NamedSharding(mesh, plan.spec(roles(n, s.shape, problem)))
                             for n, s in zip(outputs, result_shape))
    # The bias gradient of a bias broadcast along a partitioned dim is a partial sum.
    dbias_sum = ()
    if "dbias" in outputs:
        bias_roles = roles("bias", arg_shapes[inputs.index("bias")].shape, problem)
        dbias_sum = ((() if "b" in bias_roles else plan.batch)
                     + (() if "n" in bias_roles else plan.heads))
        dbias_dtype = result_shape[outputs.index("dbias")].dtype

    def lower(*arrays):
        local = problem_for_shapes(problem, {n: x.shape for n, x in zip(inputs, arrays)})
        if implementation == "interpret":
            results = list(_interpreted_host_call(kind, local, arrays))
        else:
            results = list(run(kind, local, implementation, *arrays))
        if "dbias" in outputs:
            i = outputs.index("dbias")
            dbias = results[i]
            if dbias_sum:
                dbias = lax.psum(dbias.astype(np.float32), dbias_sum)
            results[i] = dbias.astype(dbias_dtype)
        return tuple(results)

    return mesh, lower, result_shardings, arg_shardings


def _infer_sharding_from_operands(kind, problem, implementation, mesh, arg_shapes,
                                  result_shape):
    """The GSPMD partitioner's result shardings (the same as _partition returns)."""
    del implementation
    inputs, outputs = array_names(kind, problem)
    if not _named(mesh, arg_shapes):
        mesh, plan = _fallback_mesh(mesh, arg_shapes), _Plan((), ())
    else:
        plan = _decide(problem, mesh, inputs, arg_shapes)
    return tuple(NamedSharding(mesh, plan.spec(roles(n, s.shape, problem)))
                 for n, s in zip(outputs, result_shape))


def partitioned(run):
    """`run(kind, problem, implementation, *arrays)` (a launch of kind KINDS on the
    plan's arrays, returning a tuple) as a custom_partitioning op with the rules of this
    module; kind, problem and implementation are static."""
    op = custom_partitioning(run, static_argnums=(0, 1, 2))
    op.def_partition(
        partition=functools.partial(_partition, run),
        infer_sharding_from_operands=_infer_sharding_from_operands,
        sharding_rule=_sharding_rule)
    return op


# --- the interpreter inside a partitioned launch ----------------------------------------
#
# A jax.pure_callback cannot run inside custom_partitioning's lowered function: that
# function is lowered into a temporary module while XLA compiles, and its host callback
# never reaches the executable (JAX's callbacks are looked up by index in the list given
# to the compile: a crash, jax-ml/jax#23620). So there the interpreter runs behind a CPU
# custom call target of its own (XLA's untyped custom call API, a ctypes function), whose
# backend config carries the launch (kind, problem, operand shapes) itself.

HOST_TARGET = "jt_attention_interpreted_launches"
_HOST_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def interpreted_launches(kind, problem):
    """The launches of `kind` that implementation='interpret' runs (interpret.py)."""
    from jt_attention import interpret

    if kind == BACKWARD:
        return interpret.backward_launches(problem)
    return interpret.forward_launches(problem, kind == FORWARD_FOR_BACKWARD)


def _host_launches(out, ins, opaque, opaque_len, status):
    """The custom call: XLA's untyped API with status (out, ins, opaque, opaque_len, status)."""
    del status
    try:
        kind, problem, in_specs, out_specs = pickle.loads(
            base64.b64decode(ctypes.string_at(opaque, opaque_len)))
    except Exception:  # noqa: BLE001 - nothing to write into without the specs
        logger.exception("jt_attention: unreadable interpreted launch")
        return
    pointers = ([out] if len(out_specs) == 1
                else [ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[i]
                      for i in range(len(out_specs))])
    try:
        from jt_attention.interpret import run_interpreted

        inputs, outputs = array_names(kind, problem)
        arrays = {name: _read(ins[i], shape, dtype)
                  for i, (name, (shape, dtype)) in enumerate(zip(inputs, in_specs))}
        buffers = run_interpreted(interpreted_launches(kind, problem), arrays)
        results = [np.ascontiguousarray(buffers[name], dtype=dtype)
                   for name, (_, dtype) in zip(outputs, out_specs)]
        for result, (shape, _) in zip(results, out_specs):
            if result.shape != tuple(shape):
                raise ValueError(f"interpreted launch wrote {result.shape}, expected {shape}")
    except Exception:  # noqa: BLE001 - a ctypes callback must not raise: NaN outputs
        logger.exception("jt_attention: the interpreted launch failed; its outputs are NaN")
        results = [np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype)
                   for shape, dtype in out_specs]
    for pointer, result in zip(pointers, results):
        ctypes.memmove(pointer, result.ctypes.data, result.nbytes)


def _read(pointer, shape, dtype):
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * nbytes).from_address(pointer)
    return np.frombuffer(raw, np.dtype(dtype)).reshape(shape).copy()


@functools.cache
def _host_target():
    """Registers the CPU custom call target once; the ctypes function stays alive here."""
    handler = _HOST_SIGNATURE(_host_launches)
    jax.ffi.register_ffi_target(HOST_TARGET, jax.ffi.pycapsule(handler), platform="cpu",
                                api_version=0)
    return handler


def _interpreted_host_call(kind, problem, arrays):
    """The interpreted launch of `kind` on these (local) arrays, as a custom call."""
    from jt_attention.interpret import _require_interpreter

    _require_interpreter()
    _host_target()
    inputs, outputs = array_names(kind, problem)
    written = {b.name: b for launch in interpreted_launches(kind, problem)
               for b in launch.outputs}
    out_specs = [(tuple(written[n].shape), np.dtype(written[n].dtype)) for n in outputs]
    in_specs = [(tuple(x.shape), np.dtype(x.dtype)) for x in arrays]
    config = base64.b64encode(pickle.dumps((kind, problem, in_specs, out_specs))).decode()
    call = jax.ffi.ffi_call(HOST_TARGET, [jax.ShapeDtypeStruct(s, d) for s, d in out_specs],
                            custom_call_api_version=3, legacy_backend_config=config)
    return call(*arrays)
