"""The Flax adapter inside flax.linen.MultiHeadDotProductAttention."""

import jax
import numpy as np
import pytest

flax_linen = pytest.importorskip("flax.linen")

from jt_attention.flax_attention import make_attention_fn  # noqa: E402
from helpers import kernel_implementation  # noqa: E402


def test_multi_head_attention_matches_flax_default():
    x = np.random.default_rng().standard_normal((2, 19, 64)).astype(np.float32)

    def module(attention_fn=None):
        kwargs = {} if attention_fn is None else {"attention_fn": attention_fn}
        return flax_linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, **kwargs)

    params = module().init(jax.random.key(0), x)
    causal = flax_linen.make_causal_mask(np.ones((2, 19)))
    with jax.default_matmul_precision("highest"):  # the Dense projections too, on GPUs
        expected = module().apply(params, x, mask=causal)
        got = module(make_attention_fn(is_causal=True, implementation=kernel_implementation())
                     ).apply(params, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_padding_mask_matches_flax_default():
    """A Flax padding mask reaches the kernels as a mask."""
    x = np.random.default_rng().standard_normal((2, 13, 32)).astype(np.float32)
    mask = flax_linen.make_attention_mask(np.arange(13)[None] < np.array([[13], [6]]),
                                          np.arange(13)[None] < np.array([[13], [6]]))
    module = lambda **kw: flax_linen.MultiHeadDotProductAttention(num_heads=2, **kw)
    params = module().init(jax.random.key(0), x)
    with jax.default_matmul_precision("highest"):
        expected = module().apply(params, x, mask=mask)
        got = module(attention_fn=make_attention_fn(implementation=kernel_implementation())
                     ).apply(params, x, mask=mask)
    # Flax's padded query rows see no key: jt_attention returns 0 there (its one
    # difference from jax.nn), Flax the mean of the values.
    rows = np.arange(13)[None, :, None] < np.array([13, 6])[:, None, None]
    np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, expected, 0), rtol=1e-4,
                               atol=1e-4)


def test_dropout_raises():
    x = np.ones((1, 4, 16), np.float32)
    attention = flax_linen.MultiHeadDotProductAttention(
        num_heads=2, dropout_rate=0.1, deterministic=False, attention_fn=make_attention_fn())
    with pytest.raises(NotImplementedError, match="dropout"):
        attention.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
