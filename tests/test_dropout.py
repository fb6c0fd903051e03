"""Fused attention dropout: a mask drawn in the kernels from the seed and each position.

The forward and gradients against a reference that applies the same mask run in every
kernel family with the other features (tests/test_features.py); here: the mask is
reproducible and differs between keys, the generator is Philox-2x32-7 (Random123's
known answers), the keep rate is 1 - rate, neighbours (those of
one Philox block too) draw independently, the 'xla' path and the kernels draw the same
mask, and rate 0 is the plain path exactly.
"""

import jax
import numpy as np
import pytest

import jt_attention
from jt_attention import features, plan
from helpers import kernel_implementation, random_inputs

KERNELS = kernel_implementation()


def _attend(q, k, v, implementation=KERNELS, **kwargs):
    return np.asarray(jax.jit(lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, implementation=implementation, **kwargs))(q, k, v), np.float64)


def test_mask_is_reproducible_and_follows_the_key():
    (q, k, v), _ = random_inputs(2, 40, 48, 4, 2, 32, "float32")
    first = _attend(q, k, v, dropout_rate=0.25, dropout_rng=jax.random.key(7))
    again = _attend(q, k, v, dropout_rate=0.25, dropout_rng=jax.random.key(7))
    other = _attend(q, k, v, dropout_rate=0.25, dropout_rng=jax.random.key(8))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.1


@pytest.mark.parametrize("rounds,counter,key,words", [
    (7, (0, 0), 0, (0x257A3673, 0xCD26BE2A)),
    (7, (0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF, (0xAB302C4D, 0x3DC9D239)),
    (7, (0x243F6A88, 0x85A308D3), 0x13198A2E, (0xBEDBBE6B, 0xE4C770B3)),
    (10, (0, 0), 0, (0xFF1DAE59, 0x6CD10DF2)),
    (10, (0x243F6A88, 0x85A308D3), 0x13198A2E, (0xDD7CE038, 0xF62A4C12))])
def test_philox_known_answers(rounds, counter, key, words):
    """The jnp twin (which the kernels match) is Philox-2x32 with Random123's constants:
    its test vectors at the 7 rounds drawn, and at its default 10."""
    assert tuple(int(w) for w in features.philox(*counter, key, rounds)) == words


def test_rate_resolution():
    """Rates are drawn at 16 bits: any rate above 0 drops something; none drops all."""
    assert features.dropout_threshold(0.0) == 0
    assert features.dropout_threshold(1e-9) == 1
    assert features.dropout_threshold(0.1) == 6554
    assert features.dropout_threshold(1 - 1e-9) == 2**16 - 1


@pytest.mark.parametrize("rate,broadcast", [(0.1, False), (0.5, True), (0.9, False)])
def test_keep_rate(rate, broadcast):
    """With equal logits and values of 1, each output element is the kept fraction of its
    row over 1 - rate; over all rows it is 1 - rate, within 5 standard deviations."""
    batch, seq, heads = 2, 64, 2
    q = np.zeros((batch, seq, heads, 16), np.float32)
    v = np.ones((batch, seq, heads, 16), np.float32)
    out = _attend(q, q, v, dropout_rate=rate, dropout_rng=jax.random.key(3),
                  broadcast_dropout=broadcast)
    kept = out[..., 0] * (1 - rate)  # [batch, seq, heads]: each row's kept fraction
    draws = seq * seq * (1 if broadcast else batch * heads)
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / draws)
    if broadcast:  # one mask for every batch element and head
        np.testing.assert_allclose(kept, np.broadcast_to(kept[:1, :, :1], kept.shape),
                                   rtol=1e-5)
    seeds = features.dropout_seeds(rate, jax.random.key(3), batch, heads, broadcast)
    keep = features.dropout_keep(seeds, rate, seq, seq)
    np.testing.assert_allclose(kept.transpose(0, 2, 1),
                               np.broadcast_to(np.asarray(keep).mean(-1), (batch, heads, seq)),
                               rtol=1e-5)


@pytest.mark.parametrize("offset", [(0, 1), (0, 8), (8, 0), (8, 8), (1, 0)])
def test_neighbours_draw_independently(offset):
    """Elements that share a Philox block ((i, j), (i, j + 8), (i + 8, j), (i + 8, j + 8))
    or sit side by side agree as often as independent draws would: p**2 + (1 - p)**2,
    within 5 standard deviations (features.dropout_keep, which the kernels match)."""
    rate, (di, dj) = 0.5, offset
    seeds = features.dropout_seeds(rate, jax.random.key(5), 2, 2, False)
    keep = np.asarray(features.dropout_keep(seeds, rate, 96, 112))
    agree = keep[..., :keep.shape[2] - di, :keep.shape[3] - dj] == keep[..., di:, dj:]
    expected = rate ** 2 + (1 - rate) ** 2
    assert abs(agree.mean() - expected) < 5 * np.sqrt(expected * (1 - expected) / agree.size)


def test_decoding_with_dropout_takes_the_flash_kernels():
    """Split-KV packs several heads' queries into a tile's rows, which the per-block draw
    cannot serve: a decoding shape with dropout takes the flash kernels instead."""
    decoding = plan.Problem(1, 1, 4096, 8, 1, 64, np.dtype(np.float16), 0.125, False)
    names = lambda p: {l.kernel.fn.__name__ for l in plan.forward_plan(p)}
    assert "_split_kv_kernel" in names(decoding)
    with_dropout = plan.Problem(1, 1, 4096, 8, 1, 64, np.dtype(np.float16), 0.125, False,
                                features=features.Features(dropout_rate=0.1))
    assert names(with_dropout) == {"_flash_forward_kernel"}


def test_xla_path_draws_the_kernels_mask():
    (q, k, v), _ = random_inputs(1, 33, 47, 2, 1, 24, "float32")
    kwargs = dict(dropout_rate=0.4, dropout_rng=jax.random.key(11), is_causal=True)
    np.testing.assert_allclose(_attend(q, k, v, **kwargs), _attend(q, k, v, "xla", **kwargs),
                               rtol=1e-5, atol=1e-5)


def test_rate_zero_is_the_plain_path():
    (q, k, v), _ = random_inputs(2, 30, 30, 2, 2, 32, "float16")
    np.testing.assert_array_equal(_attend(q, k, v, dropout_rate=0.0,
                                          dropout_rng=jax.random.key(1)), _attend(q, k, v))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dropout_rate=0.1), ValueError, "needs a dropout_rng"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, r"dropout_rate=1.0"),
    (dict(dropout_rate="0.1", dropout_rng=jax.random.key(0)), TypeError, "dropout_rate"),
])
def test_bad_dropout_arguments_raise(kwargs, error, match):
    (q, k, v), _ = random_inputs(1, 4, 4, 1, 1, 16, "float32")
    with pytest.raises(error, match=match):
        jt_attention.dot_product_attention(q, k, v, implementation="xla", **kwargs)


@pytest.mark.parametrize("batch,broadcast", [(2, False), (1, True)])
def test_vmap_over_keys_draws_what_single_calls_draw(batch, broadcast):
    """A key mapped by jax.vmap: each element of the map gets the mask a call with its
    own key gets (the seeds operand folds into the batch like the inputs), and so does
    an unmapped key; also with one batch element per call, and broadcast dropout."""
    (q, k, v), _ = random_inputs(3 * batch, 20, 24, 2, 2, 16, "float32")
    split = lambda x: x.reshape(3, batch, *x.shape[1:])
    keys = jax.random.split(jax.random.key(5), 3)
    attend = lambda q, k, v, key: jt_attention.dot_product_attention(
        q, k, v, implementation=KERNELS, dropout_rate=0.3, dropout_rng=key,
        broadcast_dropout=broadcast)
    mapped = np.asarray(jax.vmap(attend)(*map(split, (q, k, v)), keys))
    shared = np.asarray(jax.vmap(attend, in_axes=(0, 0, 0, None))(*map(split, (q, k, v)),
                                                                   keys[0]))
    for i in range(3):
        part = lambda x: split(x)[i]
        np.testing.assert_allclose(mapped[i], attend(part(q), part(k), part(v), keys[i]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(shared[i], attend(part(q), part(k), part(v), keys[0]),
                                   rtol=1e-5, atol=1e-6)
