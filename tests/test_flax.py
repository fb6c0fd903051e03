"""The Flax adapter inside flax.linen.MultiHeadDotProductAttention and
flax.nnx.MultiHeadAttention.

The checks of Flax's own attention tests (tests/linen/linen_attention_test.py and
tests/nnx/nn/attention_test.py in google/flax), run with jt_attention's adapter as the
modules' attention_fn and, where they compare values, against Flax's default attention
(its own dot_product_attention) on the same parameters. float32 throughout, with the
matmul precision at "highest" around both applies (Flax's projections and einsums would
use TF32 on GPUs otherwise). Small shapes: on CPU machines the kernels run in Triton's
interpreter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

from jt_attention.flax_attention import make_attention_fn  # noqa: E402
from helpers import kernel_implementation  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)

# (num_heads, qkv_features): head dims 1 (nnx's sow test, linen's receptive field
# test), 2 (most linen tests: 8 heads of 16 features), 3 (nnx's tests: 2 heads of 6),
# 4 (linen's decoding test), and the common larger ones.
HEAD_DIMS = {1: (8, 8), 2: (8, 16), 3: (2, 6), 4: (3, 12), 8: (4, 32), 16: (2, 32),
             32: (2, 64), 64: (1, 64)}


def jt(**options):
    """The adapter on this machine's kernels (Triton's interpreter on CPU machines)."""
    return make_attention_fn(implementation=kernel_implementation(), **options)


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def linen_mha(attention_fn=None, **kwargs):
    """nn.MultiHeadDotProductAttention with Flax's default attention (attention_fn None)
    or the given one."""
    if attention_fn is not None:
        kwargs["attention_fn"] = attention_fn
    return nn.MultiHeadDotProductAttention(**kwargs)


def linen_apply(module, variables, *inputs, **kwargs):
    """module.apply, jitted (one compile, where op-by-op dispatch compiles each op), at
    the "highest" matmul precision."""
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda v, *xs: module.apply(v, *xs, **kwargs))(variables, *inputs)


def random_like(path, leaf, rng):
    """A parameter of the leaf's shape: kernels normal / sqrt(fan-in), biases and
    LayerNorm scales near 0 and 1; other collections (the decode cache) zeros."""
    names = [str(getattr(p, "key", p)) for p in path]
    if names[0] != "params":
        return np.zeros(leaf.shape, leaf.dtype)
    if names[-1] == "kernel":
        fan_in = int(np.prod(leaf.shape[:2 if names[-2] == "out" else 1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return ((names[-1] == "scale") + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)


def linen_init(module, *inputs, seed=0, **kwargs):
    """Variables for module(*inputs, **kwargs) without running it (on CPU machines each
    jitted Flax init costs more than the test's attention): the shapes from
    jax.eval_shape, random parameters, a zero cache."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: random_like(path, leaf, rng),
                                            shapes)


def linen_pair(variables, inputs, jt_fn=None, flax_kwargs=None, jt_kwargs=None, **module):
    """(Flax default's output, jt's output) of the same module and variables; the call
    keywords are flax_kwargs for Flax's and jt_kwargs (default: the same) for jt's."""
    flax_kwargs = flax_kwargs or {}
    jt_kwargs = flax_kwargs if jt_kwargs is None else jt_kwargs
    want = linen_apply(linen_mha(**module), variables, *inputs, **flax_kwargs)
    got = linen_apply(linen_mha(jt_fn or jt(), **module), variables, *inputs, **jt_kwargs)
    return np.asarray(want), np.asarray(got)


def lengths_mask(lengths, length, make_mask):
    """Flax padding mask [batch, 1, length, length] from per-example lengths (queries and
    keys alike), and the rows that see at least one key [batch, length]."""
    valid = np.arange(length)[None] < np.asarray(lengths)[:, None]
    return make_mask(valid, valid), valid


# ----------------------------------------------------------------------------- linen


@pytest.mark.parametrize("head_dim", sorted(HEAD_DIMS))
def test_linen_self_attention_matches_flax_default(head_dim):
    """linen's test_multihead_self_attention: shape and dtype kept; values as Flax's."""
    num_heads, qkv_features = HEAD_DIMS[head_dim]
    x = normal((2, 6, 5), seed=head_dim)
    module = dict(num_heads=num_heads, qkv_features=qkv_features)
    variables = linen_init(linen_mha(**module), x, seed=head_dim)
    want, got = linen_pair(variables, (x,), **module)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **TOL)


def test_linen_causal_adapter_and_causal_mask_match_flax_default():
    """make_attention_fn(is_causal=True) with no mask, and the adapter given Flax's
    nn.make_causal_mask, both equal Flax's default with the causal mask."""
    x = normal((2, 13, 64), seed=1)
    module = dict(num_heads=4, qkv_features=64)
    variables = linen_init(linen_mha(**module), x, seed=0)
    causal = nn.make_causal_mask(np.ones((2, 13)))
    want, got_mask = linen_pair(variables, (x,), flax_kwargs=dict(mask=causal), **module)
    _, got_causal = linen_pair(variables, (x,), jt(is_causal=True),
                               flax_kwargs=dict(mask=causal), jt_kwargs={}, **module)
    np.testing.assert_allclose(got_mask, want, **TOL)
    np.testing.assert_allclose(got_causal, want, **TOL)


def test_linen_padding_mask_matches_flax_default_where_rows_see_keys():
    """A padding mask built from lengths for queries and keys: padded query rows see no
    key. There jt's attention returns 0 (so the output is the out projection's bias)
    where Flax's returns the mean of the values; elsewhere they agree."""
    x = normal((3, 13, 32), seed=2)
    mask, rows = lengths_mask([13, 6, 1], 13, nn.make_attention_mask)
    module = dict(num_heads=2)
    variables = linen_init(linen_mha(**module), x, seed=0)
    want, got = linen_pair(variables, (x,), flax_kwargs=dict(mask=mask), **module)
    np.testing.assert_allclose(got[rows], want[rows], **TOL)
    out_bias = variables["params"]["out"]["bias"]  # the out projection of a zero row
    np.testing.assert_array_equal(got[~rows], np.broadcast_to(out_bias, got[~rows].shape))
    assert np.all(np.abs(want[~rows] - out_bias).max(-1) > 1e-3)  # Flax: mean of values


def test_linen_several_batch_dims_with_causal_and_padding_masks():
    """linen's test_multihead_encoder_decoder_attention and test_decoding's [2, 6, 5]
    inputs: [2, 3, length, features] inputs and masks with two batch dims."""
    x = normal((2, 3, 7, 12), seed=3)
    module = dict(num_heads=3, qkv_features=12)
    variables = linen_init(linen_mha(**module), x, seed=0)
    want, got = linen_pair(variables, (x,), **module)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, **TOL)
    key_lengths = np.array([[7, 3, 1], [5, 7, 2]])
    keys = np.arange(7) < key_lengths[..., None]  # [2, 3, 7]
    mask = nn.combine_masks(nn.make_causal_mask(np.ones((2, 3, 7))),
                            nn.make_attention_mask(np.ones((2, 3, 7)), keys))
    want, got = linen_pair(variables, (x,), flax_kwargs=dict(mask=mask), **module)
    np.testing.assert_allclose(got, want, **TOL)


def test_linen_cross_attention_different_lengths():
    """linen's test_multihead_kv_args: q and kv of different lengths (here with and
    without batch dims, and with a mask on the keys); inputs_k alone means value = key."""
    module = dict(num_heads=8, qkv_features=16)
    q, kv = normal((3, 5), seed=4), normal((9, 5), seed=5)  # no batch dims, as Flax's
    variables = linen_init(linen_mha(**module), q, kv, seed=0)
    want, got = linen_pair(variables, (q, kv, kv), **module)
    _, got_k_only = linen_pair(variables, (q, kv), **module)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_array_equal(got_k_only, got)

    q, kv = normal((2, 5, 5), seed=6), normal((2, 11, 7), seed=7)
    variables = linen_init(linen_mha(**module), q, kv, seed=1)
    mask = nn.make_attention_mask(np.ones((2, 5)), np.arange(11) < np.array([[11], [4]]))
    want, got = linen_pair(variables, (q, kv), flax_kwargs=dict(mask=mask), **module)
    np.testing.assert_allclose(got, want, **TOL)


def decode_linen(module, params, inputs):
    """Feed inputs [batch..., length, features] one position at a time through a
    decode=True module (as linen's test_decoding does); the outputs stacked."""
    cache = linen_init(module, inputs)["cache"]

    @jax.jit
    def step(cache, x):
        y, state = module.apply({"params": params, "cache": cache}, x, mutable=["cache"])
        return state["cache"], y

    outputs = []
    for i in range(inputs.shape[-2]):
        cache, y = step(cache, inputs[..., i:i + 1, :])
        outputs.append(y)
    return np.concatenate(outputs, axis=-2)


@pytest.mark.parametrize("batch_shape", [(2,), (2, 3)])
def test_linen_decode_matches_causal(batch_shape):
    """linen's test_decoding: 3 heads of 4 features, step by step through the KV cache,
    equals the non-cached causal attention (Flax's default with a causal mask)."""
    x = normal((*batch_shape, 5, 12), seed=8)
    module = dict(num_heads=3, qkv_features=12)
    params = linen_init(linen_mha(**module), x, seed=0)["params"]
    causal = nn.make_causal_mask(np.ones(x.shape[:-1]))
    want, _ = linen_pair({"params": params}, (x,), flax_kwargs=dict(mask=causal), **module)
    with jax.default_matmul_precision("highest"):
        got = decode_linen(linen_mha(jt(), decode=True, **module), params, x)
    np.testing.assert_allclose(got, want, **TOL)


def test_linen_decode_with_causal_adapter():
    """A decoder built with make_attention_fn(is_causal=True) (causal in training), run
    with decode=True, should still equal the non-cached causal result: the cache mask
    already hides the keys not yet written."""
    x = normal((2, 5, 12), seed=8)
    module = dict(num_heads=3, qkv_features=12)
    params = linen_init(linen_mha(**module), x)["params"]
    want = linen_apply(linen_mha(jt(is_causal=True), **module), {"params": params}, x)
    with jax.default_matmul_precision("highest"):
        got = decode_linen(linen_mha(jt(is_causal=True), decode=True, **module), params, x)
    np.testing.assert_allclose(got, want, **TOL)


def test_linen_decode_with_x64():
    """linen's test_autoregressive_decode_with_x64: decoding with x64 on (an int64 cache
    index) works; float32 inputs, as jt_attention has no float64 (see
    test_unsupported_arguments_raise)."""
    with jax.enable_x64(True):
        x = normal((1, 4, 4), seed=9)
        module = dict(num_heads=2, qkv_features=4)
        params = linen_init(linen_mha(**module), x, seed=0)["params"]
        want = linen_apply(linen_mha(**module), {"params": params}, x,
                           mask=nn.make_causal_mask(np.ones((1, 4))))
        with jax.default_matmul_precision("highest"):
            got = decode_linen(linen_mha(jt(), decode=True, **module), params, x)
    assert got.shape == (1, 4, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, **TOL)


def test_linen_autoregressive_receptive_field():
    """linen's test_autoregresive_receptive_field_1d: one head of one feature; position
    i's output depends on inputs 0..i and on no later ones (gradients through jt's
    backward kernels, by jax.jacrev), and the gradients equal Flax's."""
    length = 10
    x = normal((1, length, 1), seed=10)
    module = dict(num_heads=1)
    variables = linen_init(linen_mha(**module), x, seed=0)
    causal = nn.make_causal_mask(np.ones((1, length)))

    def jacobian(attention_fn, **kwargs):
        def outputs(x):
            return linen_mha(attention_fn, **module).apply(variables, x, **kwargs)[0, :, 0]
        with jax.default_matmul_precision("highest"):
            return np.asarray(jax.jit(jax.jacrev(outputs))(x))[:, 0, :, 0]  # [out, in]

    want = jacobian(None, mask=causal)
    for got in (jacobian(jt(is_causal=True)), jacobian(jt(), mask=causal)):
        depends = np.abs(got) > 1e-5
        assert np.all(depends[np.tril_indices(length, -1)]), "an earlier position unreachable"
        assert not np.any(depends[np.triu_indices(length, 1)]), "a later position reachable"
        np.testing.assert_allclose(got, want, **TOL)


class _ThreeLayers(nn.Module):
    """linen's sow test model: three attention layers, the 1st and 3rd sowing."""
    attention_kwargs: dict

    @nn.compact
    def __call__(self, x, mask=None, sow_weights=False):
        x = nn.MultiHeadDotProductAttention(**self.attention_kwargs)(
            x, mask=mask, sow_weights=sow_weights)
        x = nn.MultiHeadDotProductAttention(**self.attention_kwargs)(x, mask=mask)
        return nn.MultiHeadDotProductAttention(**self.attention_kwargs)(
            x, mask=mask, sow_weights=sow_weights)


def test_linen_sow_weights_match_flax_default():
    """linen's test_multihead_sow_attention_weights: the 1st and 3rd layers sow
    'attention_weights' [batch, heads, q_len, kv_len] (Flax's weights where rows see a
    key, 0 in padded rows), the 2nd none, and sow_weights=False sows nothing."""
    x = normal((2, 6, 8), seed=11)
    mask, rows = lengths_mask([6, 4], 6, nn.make_attention_mask)
    attention = dict(num_heads=4, qkv_features=16)
    variables = linen_init(_ThreeLayers(attention), x)
    kwargs = dict(mask=mask, sow_weights=True, mutable=["intermediates"])
    _, want = linen_apply(_ThreeLayers(attention), variables, x, **kwargs)
    _, got = linen_apply(_ThreeLayers(dict(attention, attention_fn=jt())), variables, x,
                         **kwargs)
    got, want = got["intermediates"], want["intermediates"]
    assert set(got) == {"MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_2"}
    for name in got:
        (weights,), (flax_weights,) = (got[name]["attention_weights"],
                                       want[name]["attention_weights"])
        assert weights.shape == (2, 4, 6, 6) and weights.dtype == np.float32
        seen = np.broadcast_to(rows[:, None, :, None], weights.shape)
        np.testing.assert_allclose(np.asarray(weights)[seen], np.asarray(flax_weights)[seen],
                                   **TOL)
        assert np.all(np.asarray(weights)[~seen] == 0)
    _, state = linen_apply(_ThreeLayers(dict(attention, attention_fn=jt())), variables, x,
                           mask=mask, mutable=["intermediates"])
    assert "intermediates" not in state


@pytest.mark.parametrize("force_fp32", [False, True])
def test_linen_sow_weights_dtype_follows_flax(force_fp32):
    """A bf16 module sows float32 weights under force_fp32_for_softmax and bf16 ones
    otherwise, as Flax's own attention does."""
    x = normal((2, 5, 8), seed=12)
    attention = dict(num_heads=2, qkv_features=8, dtype=jnp.bfloat16,
                     force_fp32_for_softmax=force_fp32)
    variables = linen_init(_ThreeLayers(attention), x)
    kwargs = dict(sow_weights=True, mutable=["intermediates"])
    _, want = linen_apply(_ThreeLayers(attention), variables, x, **kwargs)
    _, got = linen_apply(_ThreeLayers(dict(attention, attention_fn=jt())), variables, x,
                         **kwargs)
    name = "MultiHeadDotProductAttention_0"
    (weights,), (flax_weights,) = (got["intermediates"][name]["attention_weights"],
                                   want["intermediates"][name]["attention_weights"])
    assert weights.dtype == flax_weights.dtype == (jnp.float32 if force_fp32 else jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(weights, np.float32),
                               np.asarray(flax_weights, np.float32), rtol=2e-2, atol=2e-2)


def test_linen_sow_weights_several_batch_dims():
    """Sown weights with two batch dims: [2, 3, heads, q_len, kv_len], as Flax's."""
    x = normal((2, 3, 5, 8), seed=12)
    module = dict(num_heads=2, qkv_features=8)
    variables = linen_init(linen_mha(**module), x, seed=0)
    causal = nn.make_causal_mask(np.ones((2, 3, 5)))
    kwargs = dict(mask=causal, sow_weights=True, mutable=["intermediates"])
    _, want = linen_apply(linen_mha(**module), variables, x, **kwargs)
    _, got = linen_apply(linen_mha(jt(), **module), variables, x, **kwargs)
    (weights,) = got["intermediates"]["attention_weights"]
    assert weights.shape == (2, 3, 2, 5, 5)
    np.testing.assert_allclose(weights, want["intermediates"]["attention_weights"][0], **TOL)


class _TwoLayers(nn.Module):
    """linen's explicit-dropout test model: two layers given the same dropout_rng."""
    attention_kwargs: dict

    @nn.compact
    def __call__(self, x, dropout_rng=None):
        a = nn.MultiHeadDotProductAttention(**self.attention_kwargs)(
            x, x, dropout_rng=dropout_rng)
        b = nn.MultiHeadDotProductAttention(**self.attention_kwargs)(
            x, x, dropout_rng=dropout_rng)
        return a, b


def test_linen_dropout_rngs():
    """linen's test_multihead_self_attention_explicit_dropout: with deterministic=False
    the dropout is drawn from the 'dropout' stream (each layer its own, so two layers of
    equal parameters differ), the same rng gives the same output, another rng another;
    an explicit dropout_rng gives both layers the same mask."""
    x = normal((2, 8, 5), seed=13)
    module = _TwoLayers(dict(num_heads=2, qkv_features=16, dropout_rate=0.5,
                             deterministic=False, attention_fn=jt()))
    variables = linen_init(module, x)
    params = variables["params"]  # both layers alike, as Flax's kernel_init=ones makes them
    params["MultiHeadDotProductAttention_1"] = params["MultiHeadDotProductAttention_0"]
    key2, key3, key4 = jax.random.split(jax.random.key(0), 3)
    apply = jax.jit(lambda rng, dropout_rng=None: module.apply(
        variables, x, rngs={"dropout": rng}, dropout_rng=dropout_rng))
    a, b = apply(key2)
    c, d = apply(key2)
    e, f = apply(key3)
    assert a.shape == b.shape == x.shape
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)
    assert not np.array_equal(a, e) and not np.array_equal(b, f)
    a, b = apply(key2, key4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_linen_dropout_disabled():
    """linen's test_multihead_self_attention_w_dropout_disabled: deterministic=True (at
    construction or call) with dropout_rate 0.5 equals dropout_rate 0, whatever the rng,
    and both equal Flax's default."""
    x = normal((2, 6, 5), seed=14)
    module = dict(num_heads=8, qkv_features=16)
    variables = linen_init(linen_mha(**module), x, seed=0)
    want = linen_apply(linen_mha(**module), variables, x)
    outputs = [
        linen_apply(linen_mha(jt(), dropout_rate=0.0, deterministic=True, **module),
                    variables, x, rngs={"dropout": jax.random.key(1)}),
        linen_apply(linen_mha(jt(), dropout_rate=0.5, deterministic=True, **module),
                    variables, x, rngs={"dropout": jax.random.key(2)}),
        linen_apply(linen_mha(jt(), dropout_rate=0.5, **module), variables, x,
                    deterministic=True, rngs={"dropout": jax.random.key(3)}),
    ]
    dropped = linen_apply(linen_mha(jt(), dropout_rate=0.5, **module), variables, x,
                          deterministic=False, rngs={"dropout": jax.random.key(3)})
    for got in outputs:
        np.testing.assert_array_equal(got, outputs[0])
    np.testing.assert_allclose(outputs[0], want, **TOL)
    assert not np.allclose(dropped, want, **TOL)


# ------------------------------------------------------------ the attention function


def test_attention_fn_bias_mask_and_batch_dims_match_flax():
    """The adapter called as Flax calls it, with a bias (which neither module passes) and
    a padding mask, two batch dims, q_len != kv_len: Flax's dot_product_attention where
    rows see a key, 0 where they see none."""
    q, k, v = (normal((2, 3, n, 2, 16), seed) for n, seed in ((5, 15), (9, 16), (9, 17)))
    bias = normal((2, 3, 2, 5, 9), 18)
    query_valid = np.arange(5) < np.array([[5, 2, 0], [3, 5, 1]])[..., None]
    key_valid = np.arange(9) < np.array([[9, 4, 9], [1, 9, 6]])[..., None]
    mask = nn.make_attention_mask(query_valid, key_valid)  # [2, 3, 1, 5, 9] float
    with jax.default_matmul_precision("highest"):
        want = np.asarray(jax.jit(nn.dot_product_attention)(q, k, v, bias, mask))
        got = np.asarray(jax.jit(jt())(q, k, v, bias, mask))
    rows = np.broadcast_to(query_valid[..., None, None], got.shape)  # every key count >= 1
    np.testing.assert_allclose(got[rows], want[rows], **TOL)
    assert np.all(got[~rows] == 0)


def test_dropout_follows_flax_definition():
    """Flax's attention dropout: each weight kept with probability 1 - rate and scaled
    by 1 / (1 - rate), before the weighted sum of the values; broadcast_dropout=True
    draws one mask for every batch element and head. With one-hot values (value j =
    e_j) the output row is the dropped weight row itself, so the mask and the scaling
    can be read off and compared with Flax's softmax weights."""
    rate, seq = 0.3, 16
    q, k = normal((2, seq, 4, 8), 19), normal((2, seq, 4, 8), 20)
    one_hot = np.broadcast_to(np.eye(seq, dtype=np.float32)[None, :, None, :], (2, seq, 4, seq))
    # q and k padded with zeros to the values' head dim (16, one-hot over the keys)
    pad = lambda x: np.concatenate([x, np.zeros_like(x)], axis=-1)
    with jax.default_matmul_precision("highest"):
        weights = jax.jit(nn.dot_product_attention_weights)(pad(q), pad(k))  # [B, N, T, S]
    weights = np.asarray(weights).swapaxes(1, 2)  # [B, T, N, S] like the output
    keep_fractions = []
    for broadcast in (True, False):
        attend = jax.jit(lambda q, k, v, rng: jt()(
            q, k, v, dropout_rng=rng, dropout_rate=rate, broadcast_dropout=broadcast,
            deterministic=False))
        out = np.asarray(attend(pad(q), pad(k), one_hot, jax.random.key(7)))
        kept = out != 0
        np.testing.assert_allclose(out[kept], weights[kept] / (1 - rate), **TOL)
        keep_fractions.append(kept.mean())
        same_mask = all(np.array_equal(kept[b, :, n], kept[0, :, 0])
                        for b in range(2) for n in range(4))
        assert same_mask == broadcast
    # 256 (broadcast) and 2048 draws: the fractions kept within about 4 sigma of 0.7
    assert abs(keep_fractions[0] - (1 - rate)) < 0.12
    assert abs(keep_fractions[1] - (1 - rate)) < 0.045


def test_dropout_kernels_match_xla_path():
    """The kernels' dropout (Philox from dropout_rng) equals the adapter's XLA path
    (implementation='xla', which draws the same mask), through the module."""
    if kernel_implementation() == "xla":
        pytest.skip("the kernels are the XLA path here")
    x = normal((2, 7, 16), seed=21)
    module = dict(num_heads=2, dropout_rate=0.4)
    variables = linen_init(linen_mha(**module), x, deterministic=True)
    kwargs = dict(deterministic=False, rngs={"dropout": jax.random.key(5)})
    want = linen_apply(linen_mha(make_attention_fn(is_causal=True, implementation="xla"),
                                 **module), variables, x, **kwargs)
    got = linen_apply(linen_mha(jt(is_causal=True), **module), variables, x, **kwargs)
    plain = linen_apply(linen_mha(jt(is_causal=True), **module), variables, x,
                        deterministic=True)
    np.testing.assert_allclose(got, want, **TOL)
    assert not np.allclose(got, plain, **TOL)


def test_unsupported_arguments_raise():
    """AQT's einsums raise NotImplementedError naming the argument; dtypes jt_attention
    has no kernels for (Flax's complex64 and float64 tests) raise TypeError."""
    x = normal((2, 4, 8), seed=22)
    module = linen_mha(jt(), num_heads=2, qk_attn_weights_einsum_cls=lambda: jnp.einsum,
                       attn_weights_value_einsum_cls=lambda: jnp.einsum)
    with pytest.raises(NotImplementedError, match="qk_attn_weights_einsum"):
        module.init(jax.random.key(0), x)
    q = normal((2, 4, 2, 8), seed=23)
    with pytest.raises(NotImplementedError, match="attn_weights_value_einsum"):
        jt()(q, q, q, attn_weights_value_einsum=jnp.einsum)
    with pytest.raises(TypeError, match="complex64"):
        jt()(*(q.astype(np.complex64),) * 3)
    with jax.enable_x64(True), pytest.raises(TypeError, match="float64"):
        jt()(*(jnp.asarray(q, jnp.float64),) * 3)


# ------------------------------------------------------------------------------- nnx


def nnx_mha(attention_fn=None, seed=0, dropout_seed=0, **kwargs):
    """nnx.MultiHeadAttention with Flax's default attention or the given one; the same
    seed gives the same parameters (drawn by numpy: random_like's), dropout_seed the
    module's dropout stream."""
    rng = np.random.default_rng(seed)

    def init(scale_by_fan_in, fan_in_dims):
        def draw(key, shape, dtype=jnp.float32):
            scale = 1 / np.sqrt(np.prod(shape[:fan_in_dims])) if scale_by_fan_in else 0.1
            return jnp.asarray(rng.standard_normal(shape) * scale, dtype)
        return draw

    if attention_fn is not None:
        kwargs["attention_fn"] = attention_fn
    kwargs.setdefault("decode", False)
    return nnx.MultiHeadAttention(
        rngs=nnx.Rngs(seed, dropout=dropout_seed), kernel_init=init(True, 1),
        out_kernel_init=init(True, -1), bias_init=init(False, 0), **kwargs)


def nnx_call(model, *inputs, **kwargs):
    """model(*inputs, **kwargs) under nnx.jit (its state updates kept: cache, sown
    weights, rng counts), at the "highest" matmul precision."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(nnx.jit(lambda m, *xs: m(*xs, **kwargs))(model, *inputs))


def nnx_pair(inputs, jt_fn=None, flax_kwargs=None, jt_kwargs=None, **module):
    """(Flax default's output, jt's output) of two nnx modules with the same parameters."""
    flax_kwargs = flax_kwargs or {}
    jt_kwargs = flax_kwargs if jt_kwargs is None else jt_kwargs
    want = nnx_call(nnx_mha(**module), *inputs, **flax_kwargs)
    got = nnx_call(nnx_mha(jt_fn or jt(), **module), *inputs, **jt_kwargs)
    return want, got


@pytest.mark.parametrize("head_dim", [1, 3, 16])
def test_nnx_matches_flax_default(head_dim):
    """nnx's test_basic: shape [1, 7, out_features], and values as Flax's default."""
    num_heads, qkv_features = HEAD_DIMS[head_dim]
    x = normal((2, 7, 3), seed=24 + head_dim)
    module = dict(num_heads=num_heads, in_features=3, qkv_features=qkv_features,
                  out_features=6)
    want, got = nnx_pair((x,), **module)
    assert got.shape == (2, 7, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, **TOL)


def test_nnx_causal_adapter_and_is_causal():
    """nnx always passes is_causal (False unless the call says True):
    make_attention_fn(is_causal=True) stays causal all the same; nnx's is_causal=True
    call argument is causal with the plain adapter; both as Flax's default with
    nnx.make_causal_mask, and with a key padding mask added."""
    x = normal((2, 11, 16), seed=30)
    module = dict(num_heads=2, in_features=16, qkv_features=16)
    causal = nnx.make_causal_mask(np.ones((2, 11)))
    want, got = nnx_pair((x,), jt(is_causal=True), flax_kwargs=dict(mask=causal),
                         jt_kwargs={}, **module)
    np.testing.assert_allclose(got, want, **TOL)
    _, got = nnx_pair((x,), flax_kwargs=dict(mask=causal), jt_kwargs=dict(is_causal=True),
                      **module)
    np.testing.assert_allclose(got, want, **TOL)
    keys = nnx.make_attention_mask(np.ones((2, 11)), np.arange(11) < np.array([[11], [5]]))
    want, got = nnx_pair((x,), flax_kwargs=dict(mask=nnx.combine_masks(causal, keys)),
                         jt_kwargs=dict(mask=keys, is_causal=True), **module)
    np.testing.assert_allclose(got, want, **TOL)
    non_causal = nnx_call(nnx_mha(jt(), **module), x)
    assert not np.allclose(non_causal, want, **TOL)


def test_nnx_padding_mask_rows_that_see_no_key():
    """A padding mask from lengths for queries and keys: Flax's default where rows see a
    key; in the padded rows jt's attention is 0, so the output is the out projection's
    bias (Flax's default: the mean of the values)."""
    x = normal((2, 9, 8), seed=31)
    mask, rows = lengths_mask([9, 4], 9, nnx.make_attention_mask)
    module = dict(num_heads=2, in_features=8)
    want, got = nnx_pair((x,), flax_kwargs=dict(mask=mask), **module)
    np.testing.assert_allclose(got[rows], want[rows], **TOL)
    out_bias = np.asarray(nnx_mha(**module).out.bias[...])  # the out projection of 0
    np.testing.assert_array_equal(got[~rows], np.broadcast_to(out_bias, got[~rows].shape))
    assert np.all(np.abs(want[~rows] - out_bias).max(-1) > 1e-3)


def test_nnx_cross_attention_kv_features_and_grouped_heads():
    """nnx's TestKVFeatures: in_kv_features != in_features; here with kv_len != q_len,
    two batch dims, and grouped-query attention (num_kv_heads < num_heads)."""
    q, kv = normal((2, 3, 5, 3), seed=32), normal((2, 3, 9, 4), seed=33)
    module = dict(num_heads=4, num_kv_heads=2, in_features=3, in_kv_features=4,
                  qkv_features=16, out_features=6)
    want, got = nnx_pair((q, kv), **module)
    assert got.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(got, want, **TOL)


def decode_nnx(module, inputs):
    """init_cache, then inputs [batch..., length, features] one position at a time."""
    module.init_cache(inputs[..., :1, :].shape[:-2] + inputs.shape[-2:], dtype=jnp.float32)
    step = nnx.jit(lambda module, x: module(x))
    with jax.default_matmul_precision("highest"):
        outputs = [step(module, inputs[..., i:i + 1, :]) for i in range(inputs.shape[-2])]
    return np.concatenate(outputs, axis=-2)


@pytest.mark.parametrize("batch_shape,causal_adapter", [((2,), False), ((2, 3), False),
                                                        ((2,), True)])
def test_nnx_decode_matches_causal(batch_shape, causal_adapter):
    """nnx's test_autoregressive_decode: init_cache, then one position a call, equals
    the non-cached causal attention (Flax's default with a causal mask), also with a
    decoder built with make_attention_fn(is_causal=True)."""
    x = normal((*batch_shape, 5, 12), seed=34)
    module = dict(num_heads=3, in_features=12)
    want = nnx_call(nnx_mha(**module), x, mask=nnx.make_causal_mask(np.ones(x.shape[:-1])))
    got = decode_nnx(nnx_mha(jt(is_causal=causal_adapter), **dict(module, decode=True)), x)
    np.testing.assert_allclose(got, want, **TOL)


def test_nnx_decode_with_x64():
    """nnx's test_autoregressive_decode_with_x64: the cache shapes, and decoding with x64
    on (float32 inputs) equals the non-cached causal result."""
    with jax.enable_x64(True):
        x = normal((1, 4, 4), seed=35)
        module = dict(in_features=4, num_heads=2, qkv_features=4)
        decoder = nnx_mha(jt(), decode=True, **module)
        decoder.init_cache(x.shape, dtype=jnp.float32)
        assert decoder.cached_key.shape == (1, 4, 2, 2)
        assert decoder.cached_value.shape == (1, 4, 2, 2)
        step = nnx.jit(lambda m, x: m(x))
        with jax.default_matmul_precision("highest"):
            got = np.concatenate([step(decoder, x[:, i:i + 1]) for i in range(4)], axis=1)
        want = nnx_call(nnx_mha(**module), x, mask=nnx.make_causal_mask(np.ones((1, 4))))
    assert got.shape == (1, 4, 4)
    np.testing.assert_allclose(got, want, **TOL)


class _NnxThreeLayers(nnx.Module):
    """nnx's sow test model: three layers, the 1st and 3rd sowing."""

    def __init__(self, attention_kwargs):
        self.layers = nnx.List([nnx_mha(seed=i, **attention_kwargs) for i in range(3)])

    def __call__(self, x, mask=None, sow_weights=False):
        x = self.layers[0](x, mask=mask, sow_weights=sow_weights)
        x = self.layers[1](x, mask=mask)
        return self.layers[2](x, mask=mask, sow_weights=sow_weights)


def _sown(module):
    """{layer index: sown attention weights} popped from an nnx module."""
    state = nnx.pop(module, nnx.Intermediate)
    layers = state["layers"] if "layers" in state else {}
    return {i: np.asarray(layers[i]["attention_weights"].get_value()[0]) for i in layers}


# Flax's own test sows outside nnx.capture, as Flax 0.12 deprecates (Flax's default
# attention warns as the adapter does); test_nnx_sow_weights_grouped_heads_causal
# uses nnx.capture.
@pytest.mark.filterwarnings(r"ignore:Using 'Module.sow\(\)' outside:DeprecationWarning")
def test_nnx_sow_weights_match_flax_default():
    """nnx's test_multihead_sow_attention_weights: nnx.Intermediate 'attention_weights'
    [batch, heads, q_len, kv_len] in the 1st and 3rd layers only (Flax's weights where
    rows see a key, 0 in padded rows), and nothing without sow_weights."""
    x = normal((2, 6, 4), seed=36)
    mask, rows = lengths_mask([6, 3], 6, nnx.make_attention_mask)
    attention = dict(in_features=4, num_heads=4)  # head dim 1, as nnx's test
    flax_model = _NnxThreeLayers(attention)
    jt_model = _NnxThreeLayers(dict(attention, attention_fn=jt()))
    nnx_call(flax_model, x, mask=mask, sow_weights=True)
    nnx_call(jt_model, x, mask=mask, sow_weights=True)
    want, got = _sown(flax_model), _sown(jt_model)
    assert set(got) == {0, 2}
    for i in got:
        assert got[i].shape == (2, 4, 6, 6)
        seen = np.broadcast_to(rows[:, None, :, None], got[i].shape)
        np.testing.assert_allclose(got[i][seen], want[i][seen], **TOL)
        assert np.all(got[i][~seen] == 0)
    nnx_call(jt_model, x, mask=mask)
    assert not _sown(jt_model)


def test_nnx_sow_weights_grouped_heads_causal():
    """Sown weights, captured by nnx.capture, with grouped-query heads and nnx's
    is_causal=True: [batch, heads, q_len, kv_len], as Flax's; the outputs as Flax's."""
    x = normal((2, 5, 8), seed=37)
    module = dict(num_heads=4, num_kv_heads=2, in_features=8)
    forward = nnx.jit(lambda model, x: nnx.capture(model, nnx.Intermediate)(
        x, sow_weights=True, is_causal=True))
    with jax.default_matmul_precision("highest"):
        want, flax_state = forward(nnx_mha(**module), x)
        got, jt_state = forward(nnx_mha(jt(), **module), x)
    weights = np.asarray(jt_state["attention_weights"].get_value()[0])
    assert weights.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(weights, flax_state["attention_weights"].get_value()[0], **TOL)
    assert np.all(np.triu(weights, 1) == 0)
    np.testing.assert_allclose(got, want, **TOL)


def test_nnx_dropout_rngs():
    """Dropout with rngs: the module's own 'dropout' stream (each call a new mask), the
    same seed reproduces, another seed differs, rngs given to the call take precedence
    (and are required with keep_rngs=False), and deterministic=True equals dropout_rate
    0 and Flax's default."""
    x = normal((2, 8, 8), seed=38)
    module = dict(num_heads=2, in_features=8, dropout_rate=0.5)
    dropped = nnx.jit(lambda model, rngs: model(x, deterministic=False, rngs=rngs))

    def outputs(dropout_seed, rngs=None, calls=1):
        model = nnx_mha(jt(), dropout_seed=dropout_seed, **module)
        return [np.asarray(dropped(model, rngs)) for _ in range(calls)]

    first, second = outputs(1, calls=2)
    (again,), (other,) = outputs(1), outputs(2)
    (given,), (given_again,) = outputs(3, nnx.Rngs(dropout=1)), outputs(4, nnx.Rngs(dropout=1))
    assert np.all(np.isfinite(first)) and first.shape == (2, 8, 8)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(given, given_again)
    assert not np.array_equal(given, outputs(3)[0])

    want = nnx_call(nnx_mha(**module), x, deterministic=True)
    off = nnx_call(nnx_mha(jt(), **module), x, deterministic=True)
    zero = nnx_call(nnx_mha(jt(), **dict(module, dropout_rate=0.0)), x)
    np.testing.assert_array_equal(off, zero)
    np.testing.assert_allclose(off, want, **TOL)
    assert not np.allclose(first, want, **TOL)

    model = nnx_mha(jt(), keep_rngs=False, **module)
    with pytest.raises(ValueError, match="rngs"):
        model(x, deterministic=False)
    a, b = (dropped(model, nnx.Rngs(dropout=5)) for _ in range(2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("use_bias,normalize_qk,decode", [
    (True, False, False), (False, True, False), (True, True, True)])
def test_nnx_linen_consistency(use_bias, normalize_qk, decode):
    """nnx's TestLinenConsistency: nnx and linen modules with the same parameters and
    the adapter give the same output (an input of one position, no batch dims)."""
    module = dict(num_heads=2, qkv_features=6, out_features=6, use_bias=use_bias,
                  normalize_qk=normalize_qk, decode=decode)
    x = normal((1, 3), seed=39)
    linen_module = linen_mha(jt(), **module)
    variables = linen_init(linen_module, x, seed=42)
    nnx_module = nnx_mha(jt(), in_features=3, **module)
    for name in ("query", "key", "value", "out"):
        getattr(nnx_module, name).kernel[...] = variables["params"][name]["kernel"]
        if use_bias:
            getattr(nnx_module, name).bias[...] = variables["params"][name]["bias"]
    if normalize_qk:
        nnx_module.query_ln.scale[...] = variables["params"]["query_ln"]["scale"]
        nnx_module.key_ln.scale[...] = variables["params"]["key_ln"]["scale"]
    if decode:
        nnx_module.init_cache(x.shape, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = nnx_module(x)
        want, _ = linen_module.apply(variables, x, mutable=["cache"])
        flax_default, _ = linen_mha(**module).apply(variables, x, mutable=["cache"])
    assert got.shape == (1, 6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, flax_default, **TOL)
