"""dot_product_attention under jax.jit with sharded inputs (jt_attention/partitioning.py).

Batch- and head-sharded calls run the kernels on each device's shard with no
collective and keep the output sharded; their results and gradients equal the
unsharded call's. Other shardings (head_dim, sequence), heads that do not split into
whole KV groups are gathered: still exact, logged.

On a CPU machine conftest gives 8 simulated devices and the kernels run interpreted
(one interpreted launch per device, serialized by the interpreter's lock), so the
shapes are tiny.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jt_attention
from helpers import kernel_implementation, relative_error

KERNELS = kernel_implementation()
# The sharded call runs the same kernels on slices: only sums over shards (the bias
# gradient of a broadcast bias) may round differently.
EXACT = 1e-5
COLLECTIVES = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce)"
                         r"(-start)?\(")


def _mesh(shape, names):
    count = int(np.prod(shape))
    devices = jax.devices()
    if len(devices) < count:
        pytest.skip(f"needs {count} devices, found {len(devices)}")
    return Mesh(np.array(devices[:count]).reshape(shape), names)


def _inputs(batch, seq, heads, kv_heads, head_dim, rng):
    q = rng.standard_normal((batch, seq, heads, head_dim), np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
    return q, k, v


def _loss_and_grads(options, with_bias):
    """jit(value_and_grad) of <out, dout> over q, k, v (and the bias)."""
    def loss(q, k, v, bias, dout):
        out = jt_attention.dot_product_attention(q, k, v, bias, implementation=KERNELS,
                                                 **options)
        return jnp.sum(out * dout), out

    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


def _check_same(got, want, what):
    for name, x, y in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert x.shape == y.shape, f"{what} {name}"
        assert relative_error(x, np.asarray(y, np.float64)) < EXACT, f"{what} {name}"


# The bias's gradient: summed over the batch shards where the bias has a batch of 1
# ("batch", "batch_x_heads"), over the heads shards where it has one head ("heads"),
# sharded like the query where it has both ("batch_x_heads_full_bias").
CASES = {
    # name: (mesh shape, mesh names, q spec, batch, heads, kv_heads, bias shape, features)
    "batch": ((4,), ("data",), P("data"), 4, 4, 2, (1, 4, 16, 16),
              dict(lengths=True, mask=(4, 1, 16, 16))),
    "heads": ((2,), ("model",), P(None, None, "model"), 2, 4, 2, (2, 1, 16, 16),
              dict(segments=True, is_causal=True)),
    "batch_x_heads": ((2, 4), ("data", "model"), P("data", None, "model"), 2, 8, 4,
                      (1, 8, 16, 16), dict(dropout="broadcast", window=(5, 3))),
    "batch_x_heads_full_bias": ((2, 2), ("data", "model"), P("data", None, "model"), 4, 4,
                                2, (4, 4, 16, 16), dict(lengths=True, mask=(1, 4, 16, 16))),
    "dropout_per_element": ((2, 2), ("data", "model"), P("data", None, "model"), 2, 4, 2,
                            (2, 1, 16, 16), dict(dropout="per_element", mask=(1, 4, 16, 16))),
    "one_kv_head": ((2,), ("data",), P("data"), 2, 4, 1, (1, 4, 16, 16),
                    dict(is_causal=True, dropout="per_element")),
}


def _options(batch, seq, features, rng):
    """dot_product_attention keywords for the case's features, on fresh random data."""
    options = {}
    if features.get("is_causal"):
        options["is_causal"] = True
    if "window" in features:
        options["local_window_size"] = features["window"]
    if features.get("lengths"):
        options["query_seq_lengths"] = jnp.asarray(rng.integers(1, seq + 1, batch), jnp.int32)
        options["key_value_seq_lengths"] = jnp.asarray(rng.integers(1, seq + 1, batch),
                                                       jnp.int32)
    if features.get("segments"):
        ids = np.sort(rng.integers(0, 3, (batch, seq)), axis=1).astype(np.int32)
        options["query_segment_ids"] = options["key_value_segment_ids"] = jnp.asarray(ids)
    if "mask" in features:
        mask = rng.random(features["mask"]) < 0.7
        mask[..., 0] = True
        options["mask"] = jnp.asarray(mask)
    if "dropout" in features:
        options.update(dropout_rate=0.3, dropout_rng=jax.random.key(int(rng.integers(1 << 30))),
                       broadcast_dropout=features["dropout"] == "broadcast")
    return options


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_equals_unsharded(case):
    mesh_shape, names, spec, batch, heads, kv_heads, bias_shape, features = CASES[case]
    mesh = _mesh(mesh_shape, names)
    rng = np.random.default_rng()
    seq, head_dim = 16, 16
    q, k, v = _inputs(batch, seq, heads, kv_heads, head_dim, rng)
    dout = rng.standard_normal(q.shape, np.float32)
    bias = rng.standard_normal(bias_shape, np.float32)
    options = _options(batch, seq, features, rng)
    step = _loss_and_grads(options, with_bias=True)

    (_, want_out), want_grads = step(q, k, v, bias, dout)
    sharding = NamedSharding(mesh, spec)
    bias_spec = P(*(entry if size > 1 else None for entry, size in
                    zip((spec[0] if len(spec) > 0 else None,
                         spec[2] if len(spec) > 2 else None), bias_shape[:2])))
    placed = [jax.device_put(x, sharding) for x in (q, k, v)]
    (_, out), grads = step(*placed, jax.device_put(bias, NamedSharding(mesh, bias_spec)),
                           jax.device_put(dout, sharding))

    assert relative_error(out, np.asarray(want_out, np.float64)) < EXACT
    _check_same(grads, want_grads, case)
    assert out.sharding.is_equivalent_to(sharding, out.ndim), out.sharding
    for grad, x in zip(grads[:3], placed):
        assert grad.sharding.is_equivalent_to(x.sharding, grad.ndim), grad.sharding


def _collectives(compiled_text):
    return sorted(set(m.group(1) for m in COLLECTIVES.finditer(compiled_text)))


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("spec", [P("data"), P(None, None, "data")], ids=["batch", "heads"])
def test_no_collective_and_the_output_stays_sharded(spec, dropout):
    """Dropout too: each shard reads its own heads' Philox streams (features.dropout_seeds)."""
    mesh = _mesh((4,), ("data",))
    rng = np.random.default_rng()
    q, k, v = _inputs(4, 16, 8, 4, 16, rng)
    sharding = NamedSharding(mesh, spec)
    placed = [jax.device_put(x, sharding) for x in (q, k, v)]
    options = dict(dropout_rate=0.3, dropout_rng=jax.random.key(7)) if dropout else {}

    attend = jax.jit(lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, implementation=KERNELS, is_causal=True, **options))
    compiled = attend.lower(*placed).compile()
    assert _collectives(compiled.as_text()) == []
    assert compiled.output_shardings.is_equivalent_to(sharding, 4)

    step = _loss_and_grads(options, with_bias=False)
    compiled = step.lower(*placed, None, jax.device_put(q, sharding)).compile()
    # The loss itself is summed over the shards (an all-reduce of a scalar): the
    # attention's forward and backward add nothing.
    text = compiled.as_text()
    assert not [c for c in _collectives(text) if c != "all-reduce"]
    assert all("f32[]" in line for line in text.splitlines() if "all-reduce(" in line)
    (_, out_sharding), grad_shardings = compiled.output_shardings
    assert out_sharding.is_equivalent_to(sharding, 4)
    for grad_sharding in grad_shardings:
        assert grad_sharding.is_equivalent_to(sharding, 4)

    out = attend(*placed)
    want = attend(q, k, v)
    assert relative_error(out, np.asarray(want, np.float64)) < EXACT


def _gathered_case(spec, heads, kv_heads, mesh_shape, names, caplog):
    mesh = _mesh(mesh_shape, names)
    rng = np.random.default_rng()
    q, k, v = _inputs(2, 16, heads, kv_heads, 16, rng)
    dout = rng.standard_normal(q.shape, np.float32)
    step = _loss_and_grads({"is_causal": True}, with_bias=False)
    (_, want_out), want_grads = step(q, k, v, None, dout)
    sharding = NamedSharding(mesh, spec)
    # Key and value as the query where their shape allows, else replicated.
    kv_sharding = sharding if kv_heads % mesh.size == 0 else NamedSharding(mesh, P())
    jt_attention.log.log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="jt_attention"):
        (_, out), grads = step(jax.device_put(q, sharding), jax.device_put(k, kv_sharding),
                               jax.device_put(v, kv_sharding), None,
                               jax.device_put(dout, sharding))
    assert relative_error(out, np.asarray(want_out, np.float64)) < EXACT
    _check_same(grads, want_grads, str(spec))
    return caplog.text


def test_head_dim_sharding_is_gathered_and_logged(caplog):
    log = _gathered_case(P(None, None, None, "hd"), 4, 2, (2,), ("hd",), caplog)
    assert re.search(r"q's head_dim dim is sharded over mesh axis 'hd'", log), log


def test_sequence_sharding_is_gathered_and_logged(caplog):
    log = _gathered_case(P(None, "seq"), 4, 2, (4,), ("seq",), caplog)
    assert re.search(r"q's q_len dim is sharded over mesh axis 'seq'", log), log


@pytest.mark.parametrize("heads,kv_heads,shards", [(6, 3, 2), (4, 2, 4)])
def test_heads_not_in_whole_kv_groups_are_gathered(heads, kv_heads, shards, caplog):
    """A shard would split a KV group: 6 query heads over 2 shards with 3 KV heads; 4
    over 4 with 2, where the KV heads would need a part of the mesh axis each."""
    log = _gathered_case(P(None, None, "model"), heads, kv_heads, (shards,), ("model",),
                         caplog)
    assert "whole KV groups" in log and "'model'" in log, log


def test_inside_shard_map_the_arrays_are_local():
    mesh = _mesh((4,), ("data",))
    rng = np.random.default_rng()
    q, k, v = _inputs(4, 16, 4, 2, 16, rng)
    bias = rng.standard_normal((4, 4, 16, 16), np.float32)
    attend = lambda q, k, v, bias: jt_attention.dot_product_attention(
        q, k, v, bias, implementation=KERNELS, is_causal=True)
    want = jax.jit(attend)(q, k, v, bias)
    local = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                  check_vma=False))
    assert relative_error(local(q, k, v, bias), np.asarray(want, np.float64)) < EXACT


def test_head_major_entry_under_batch_sharding():
    mesh = _mesh((2,), ("data",))
    rng = np.random.default_rng()
    q, k, v = (np.swapaxes(x, 1, 2) for x in _inputs(2, 16, 4, 2, 16, rng))
    attend = jax.jit(lambda q, k, v: jt_attention.scaled_dot_product_attention(
        q, k, v, implementation=KERNELS, is_causal=True))
    want = attend(q, k, v)
    sharding = NamedSharding(mesh, P("data"))
    out = attend(*(jax.device_put(x, sharding) for x in (q, k, v)))
    assert relative_error(out, np.asarray(want, np.float64)) < EXACT
    assert out.sharding.is_equivalent_to(sharding, 4)
