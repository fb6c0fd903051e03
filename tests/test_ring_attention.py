"""Ring attention (sequence sharded over devices, K/V rotating with ppermute) against
full attention in float64: output and gradients, causal and not, both layouts, at 2,
4 and 8 devices, with lengths, segment ids, grouped-query heads and the soft-cap, and
with a bias (and its gradient), a mask and a window; the backward's memory; the layout
helpers; argument errors (all under shard_map's default check_vma=True); the
interpreter under shard_map; the example app.

On a CPU machine conftest gives 8 simulated devices and the kernels run interpreted;
on a GPU machine the tests need that many GPUs, else they skip. Shapes are tiny: each
ring step is one interpreted launch per device, serialized by the interpreter's lock.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import jt_attention
from helpers import (DTYPES, TOLERANCE, attention_float64, attention_grads_float64,
                     feature_rng, kernel_implementation, random_inputs, relative_error)

KERNELS = kernel_implementation()
AXIS = "ring"
SEQUENCE = PartitionSpec(None, AXIS)
ROWS = PartitionSpec(None, None, AXIS)
# The global axes of each optional argument that the layout reorders: the sequence of
# the ids, the query rows and keys of a bias or mask (those of size > 1).
LAYOUT_AXES = {"query_segment_ids": (1,), "key_value_segment_ids": (1,),
               "query_seq_lengths": (), "key_value_seq_lengths": (), "bias": (2, 3),
               "mask": (2, 3)}
EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "sharded_attention.py"


def _mesh(num_devices, name=AXIS):
    devices = jax.devices()
    if len(devices) < num_devices:
        pytest.skip(f"needs {num_devices} devices of the default backend, "
                    f"found {len(devices)}")
    return Mesh(np.array(devices[:num_devices]), (name,))


def _spec(name, x):
    """How an optional argument is sharded: ids along the sequence, a bias or mask
    along its query rows (replicated where it has one row), lengths replicated."""
    if name in ("bias", "mask"):
        return ROWS if x.shape[2] > 1 else PartitionSpec()
    return SEQUENCE if LAYOUT_AXES[name] else PartitionSpec()


def ring_sharded(num_devices, layout, features, **options):
    """ring_attention under shard_map, as a function of (q, k, v, features) where
    `features` holds the optional arguments by name, all global arrays in the
    layout's order."""
    mesh = _mesh(num_devices)
    specs = {name: _spec(name, x) for name, x in features.items()}

    def body(q, k, v, features):
        return jt_attention.ring_attention(q, k, v, axis_name=AXIS, layout=layout,
                                           **features, **options)

    return jax.shard_map(body, mesh=mesh, in_specs=(SEQUENCE,) * 3 + (specs,),
                         out_specs=SEQUENCE)


def _relaid(x, axes, num_devices, layout, inverse=False):
    """x with each of `axes` of size > 1 in the layout's order (or back)."""
    move = jt_attention.ring_unlayout if inverse else jt_attention.ring_layout
    for axis in axes:
        if x.shape[axis] > 1:
            x = move(np.asarray(x), num_devices, axis=axis, layout=layout)
    return x


def check_ring(num_devices, is_causal, layout, shape=(1, 2, 2, 16, "float32"), per_device=8,
               features_of=None, implementation=KERNELS, **options):
    """Ring attention on fresh random inputs against float64 full attention: output,
    then dq, dk, dv of <out, dout> (jitted). shape: (batch, heads, kv_heads, head_dim,
    dtype); features_of(rng, batch, seq) -> the optional arguments (global order).
    With a bias among the features, its gradient is checked too; with
    return_residual=True, the logsumexp and the gradients of <lse, dlse> too. Returns
    which rows see no key ([batch, seq, heads], global order)."""
    batch, heads, kv_heads, head_dim, dtype = shape
    seq = per_device * num_devices
    (q, k, v), seed = random_inputs(batch, seq, seq, heads, kv_heads, head_dim, dtype)
    rng = feature_rng(seed)  # apart from the inputs' stream
    features = features_of(rng, batch, seq) if features_of else {}
    where = f"{seed=} {num_devices=} {is_causal=} {layout=}"
    # The layout is data preparation, outside the jitted function: inside, it would be
    # a reshuffle of sharded arrays that XLA takes seconds to compile.
    lay = lambda x: jt_attention.ring_layout(x, num_devices, layout=layout)
    unlay = lambda x: jt_attention.ring_unlayout(np.asarray(x), num_devices, layout=layout)
    laid = {name: _relaid(x, LAYOUT_AXES[name], num_devices, layout)
            for name, x in features.items()}
    attend = jax.jit(ring_sharded(num_devices, layout, laid,
                                  is_causal=is_causal, implementation=implementation,
                                  **options))
    differentiated = {"bias": laid.pop("bias")} if "bias" in laid else {}
    result, vjp = jax.vjp(lambda q, k, v, bias: attend(q, k, v, {**laid, **bias}),
                          lay(q), lay(k), lay(v), differentiated)
    residual = options.get("return_residual", False)
    out = unlay(result[0] if residual else result)
    scale = options.get("scale") or 1 / np.sqrt(head_dim)
    reference = dict(features, logits_soft_cap=options.get("logits_soft_cap"),
                     local_window_size=options.get("local_window_size"))
    want, want_lse = attention_float64(q, k, v, scale, is_causal, **reference)
    tolerance = TOLERANCE[dtype]
    assert out.shape == q.shape and out.dtype == q.dtype, where
    assert relative_error(out, want) < tolerance, f"out {where}"
    blind = ~np.isfinite(want_lse)  # rows that see no key: exactly 0
    assert np.all(out[blind] == 0), f"rows that see no key {where}"
    dout = rng.standard_normal(q.shape).astype(DTYPES[dtype])
    cotangent, dlse = jnp.asarray(lay(dout)), None
    if residual:
        lse = unlay(result[1]).astype(np.float64)
        assert result[1].dtype == q.dtype and np.all(lse[blind] == -np.inf), where
        np.testing.assert_allclose(lse[~blind], want_lse[~blind], rtol=2 * TOLERANCE[dtype],
                                   atol=2e-2, err_msg=where)
        dlse = np.where(blind, 0, rng.standard_normal(want_lse.shape)).astype(DTYPES[dtype])
        cotangent = (cotangent, jnp.asarray(lay(dlse)))
    dq, dk, dv, dbias = vjp(cotangent)
    grads = [unlay(dq), unlay(dk), unlay(dv)]
    if dbias:
        assert dbias["bias"].dtype == features["bias"].dtype, where
        grads.append(_relaid(dbias["bias"], (2, 3), num_devices, layout, inverse=True))
    wanted = attention_grads_float64(q, k, v, dout, scale, is_causal, dlse=dlse, **reference)
    for name, grad, want in zip(("dq", "dk", "dv", "dbias")[:len(grads)], grads, wanted,
                                strict=True):
        assert relative_error(grad, want) < tolerance, f"{name} {where}"
    return blind


# One head at 8 devices: each step is a launch per device, and the interpreter's time
# grows with the programs of each launch (batch x heads).
RINGS = [(2, False, "contiguous", 2), (4, True, "contiguous", 2), (4, True, "zigzag", 2),
         (8, True, "zigzag", 1)]


@pytest.mark.parametrize("num_devices,is_causal,layout,heads", RINGS, ids=str)
def test_ring_equals_full_attention(num_devices, is_causal, layout, heads):
    check_ring(num_devices, is_causal, layout, shape=(1, heads, heads, 16, "float32"))


def _segments(rng, batch, seq):
    """Packed sequences: ids in runs with edges anywhere (across device blocks)."""
    edges = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
    return (np.arange(seq)[None, :] >= edges[:, None]).sum(0)[None].repeat(batch, 0)


def _lengths_and_segments(rng, batch, seq):
    """Batch 0: a ragged length for queries and keys, packed segments, and every fifth
    query in a segment that no key has (those rows see nothing, on every device);
    batch 1: no key at all (every row sees nothing: 0 out, 0 gradients)."""
    segments = _segments(rng, batch, seq).astype(np.int32)
    orphans = np.where(np.arange(seq) % 5 == 0, 9, segments)
    return dict(query_seq_lengths=np.array([seq - 5, seq], np.int32)[:batch],
                key_value_seq_lengths=np.array([seq - 3, 0], np.int32)[:batch],
                query_segment_ids=orphans, key_value_segment_ids=segments)


@pytest.mark.parametrize("num_devices,is_causal,layout",
                         [(4, True, "zigzag"), (2, True, "contiguous"), (2, False, "zigzag")],
                         ids=str)
def test_lengths_segments_grouped_heads_soft_cap(num_devices, is_causal, layout):
    """Global lengths cut per block (zigzag: per chunk), key segment ids rotating with
    the keys, 2 query heads on 1 KV head, a soft-cap; float16; the logsumexp returned
    and differentiated too."""
    blind = check_ring(num_devices, is_causal, layout, shape=(2, 2, 1, 16, "float16"),
                       features_of=_lengths_and_segments, logits_soft_cap=2.0, scale=0.5,
                       return_residual=True)
    assert blind[1].all() and blind[0].any() and not blind[0].all()


def _scores(rows):
    """A float32 bias [1, heads, rows, seq] and a mask [batch, 1, seq, seq] of random
    keys (about 1 in 5 hidden)."""
    def features_of(rng, batch, seq):
        return dict(bias=rng.standard_normal((1, 2, rows or seq, seq)).astype(np.float32),
                    mask=rng.random((batch, 1, seq, seq)) < 0.8)
    return features_of


@pytest.mark.parametrize("num_devices,is_causal,layout,window,rows", [
    (4, True, "zigzag", (5, 0), None), (2, False, "contiguous", (3, 2), None),
    (4, False, "zigzag", None, 1)], ids=str)
def test_bias_mask_window(num_devices, is_causal, layout, window, rows):
    """A bias (with its gradient) and a mask given as the local query rows against the
    whole sequence, sharded along the rows (or replicated: one row for every query),
    and a window in global positions, with and without causal."""
    check_ring(num_devices, is_causal, layout, features_of=_scores(rows),
               local_window_size=window)


def test_backward_memory_does_not_grow_with_devices():
    """The gradient's scratch memory per device, at a fixed block per device, is the
    same at 4 and 8 devices: the backward sends K/V around again rather than keeping
    every visiting block (autodiff of the forward kept 27 and 54 blocks here)."""
    def scratch_blocks(num_devices, block=256, heads=2, head_dim=32):
        x = jax.ShapeDtypeStruct((1, block * num_devices, heads, head_dim), jnp.float32)
        sharded = ring_sharded(num_devices, "zigzag", {}, is_causal=True,
                               implementation=KERNELS)
        grad = jax.jit(jax.grad(lambda q, k, v: sharded(q, k, v, {}).sum(), (0, 1, 2)))
        memory = grad.lower(x, x, x).compile().memory_analysis()
        return memory.temp_size_in_bytes / (block * heads * head_dim * 4)

    at_4, at_8 = scratch_blocks(4), scratch_blocks(8)
    assert at_8 <= 1.05 * at_4, (at_4, at_8)


def test_layout_round_trip():
    x = np.arange(3 * 16).reshape(3, 16)
    laid = jt_attention.ring_layout(x, 4)
    chunks = laid[0].reshape(8, 2)[:, 0] // 2  # 2P = 8 chunks of 2
    assert chunks.tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
    np.testing.assert_array_equal(jt_attention.ring_unlayout(laid, 4), x)
    on_axis_0 = jt_attention.ring_layout(jnp.asarray(x.T), 4, axis=0)
    np.testing.assert_array_equal(np.asarray(on_axis_0), laid.T)
    assert jt_attention.ring_layout(x, 4, layout="contiguous") is x
    with pytest.raises(ValueError, match="divisible by 8"):
        jt_attention.ring_layout(x[:, :12], 4)


def _trace(body, num_devices=2, seq=8, kv_seq=None, heads=2):
    """Traces `body(q, k, v)` under shard_map (no kernel runs)."""
    mesh = _mesh(num_devices)
    q = jax.ShapeDtypeStruct((1, seq, heads, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, kv_seq or seq, heads, 16), jnp.float32)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=SEQUENCE, out_specs=SEQUENCE,
                            check_vma=False)
    return jax.eval_shape(sharded, q, kv, kv)


def test_argument_errors():
    ring = lambda **kw: lambda q, k, v: jt_attention.ring_attention(q, k, v, axis_name=AXIS,
                                                                   **kw)
    with pytest.raises(ValueError, match=r"divisible by 4 .*shape\[1\]=3 per device"):
        _trace(ring(is_causal=True), seq=6)
    with pytest.raises(ValueError, match="one length"):
        _trace(ring(is_causal=True, layout="contiguous"), kv_seq=12)
    with pytest.raises(ValueError, match="does not support dropout_rate.*return_residual"):
        _trace(ring(dropout_rate=0.1))
    with pytest.raises(ValueError, match=r"bias.shape=\(1, 1, 4, 4\) does not broadcast.*its "
                       r"kv_len dim is 4, expected 1 or 8.*every key of the sequence"):
        _trace(ring(bias=jnp.zeros((1, 1, 4, 4))))
    with pytest.raises(TypeError, match="mask.dtype=float32; expected bool"):
        _trace(ring(mask=jnp.zeros((1, 1, 4, 8))))
    with pytest.raises(ValueError, match="must not be negative"):
        _trace(ring(local_window_size=(-1, 2)))
    with pytest.raises(TypeError, match="unexpected keyword argument 'biass'"):
        _trace(ring(biass=1))
    with pytest.raises(ValueError, match="layout='diagonal' must be one of"):
        _trace(ring(layout="diagonal"))
    with pytest.raises(ValueError, match=r"key_value_segment_ids.shape=\(1, 8\); expected"):
        _trace(ring(query_segment_ids=jnp.zeros((1, 4), jnp.int32),
                    key_value_segment_ids=jnp.zeros((1, 8), jnp.int32)))
    with pytest.raises(NameError, match="inside jax.shard_map"):
        jt_attention.ring_attention(*(jnp.zeros((1, 4, 2, 16)),) * 3, axis_name=AXIS)


def test_interpreter_under_shard_map_50_calls():
    """dot_product_attention batch-sharded over 8 devices, 50 calls on fresh inputs: the
    8 devices' launches (interpreted on a CPU, concurrently called back) all come out
    right."""
    num_devices, calls = 8, 50
    mesh = _mesh(num_devices, "batch")
    batch = PartitionSpec("batch")
    attend = jax.jit(jax.shard_map(
        lambda q, k, v: jt_attention.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation=KERNELS),
        mesh=mesh, in_specs=batch, out_specs=batch, check_vma=False))
    (q, k, v), seed = random_inputs(calls * num_devices, 8, 16, 1, 1, 16, "float32")
    outs = [attend(*(x[i * num_devices:(i + 1) * num_devices] for x in (q, k, v)))
            for i in range(calls)]
    want, _ = attention_float64(q, k, v, 1 / np.sqrt(16), True)
    for i, out in enumerate(outs):
        part = slice(i * num_devices, (i + 1) * num_devices)
        assert relative_error(out, want[part]) < TOLERANCE["float32"], f"call {i} {seed=}"


def test_example_runs():
    """examples/sharded_attention.py at a small shape: both sharded runs agree with one
    device, and it says so (exit code 0)."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if KERNELS == "interpret" else "0"}
    env.pop("XLA_FLAGS", None)  # the example sets its own device count
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--devices=4", "--batch=2", "--heads=2",
         "--seq=32", "--head_dim=16", "--repeats=1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "batch/head-sharded" in result.stdout and "ring" in result.stdout, result.stdout
