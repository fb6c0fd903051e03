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


def test_dropout_and_mask_raise():
    x = np.ones((1, 4, 16), np.float32)
    attention = flax_linen.MultiHeadDotProductAttention(
        num_heads=2, dropout_rate=0.1, deterministic=False, attention_fn=make_attention_fn())
    with pytest.raises(NotImplementedError, match="dropout"):
        attention.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    masked = flax_linen.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn())
    with pytest.raises(NotImplementedError, match="mask"):
        masked.init(jax.random.key(0), x, mask=np.ones((1, 2, 4, 4), bool))
