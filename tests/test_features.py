"""Masks and score modifiers in every kernel family, forward and gradients, against float64.

One battery, run for each implementation: the Triton kernels (in the interpreter on a
CPU machine, compiled on a GPU) and 'xla' (the reference path). Each feature runs
alone and with the others in each kernel family, on both sides of every dispatch
boundary; then the edges: broadcast bias and mask shapes and their gradients, rows
that see no key, lengths of 0 and of the full sequence, segment runs across block
boundaries, windows wider than the sequence, and keys in hidden blocks set to NaN
(which would show if a skipped block were read).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton

import jt_attention
from jt_attention import interpret, plan
from jt_attention.kernels import masking
from jt_attention.features import Features
from helpers import (DTYPES, TOLERANCE, attention_float64, attention_grads_float64,
                     check_against_float64, feature_rng, kernel_implementation,
                     new_seed, random_inputs, relative_error)

KERNELS = kernel_implementation()
IMPLEMENTATIONS = [KERNELS, "xla"]

# (batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim, dtype): one per kernel family
FAMILIES = {
    "flash": (2, 45, 53, 4, 2, 32, "float16"),
    "flash_tma": (2, 45, 53, 4, 2, 32, "float16"),        # the same kernels through TMA
    "flash_wide": (2, 33, 40, 4, 2, 160, "bfloat16"),     # the same at a 256-wide head tile
    "split_kv": (1, 5, 1100, 2, 1, 64, "bfloat16"),        # decoding: split-KV + combine
    "whole_rows": (1, 40, 50, 2, 2, 264, "float16"),       # two-pass, whole rows, P kept
    "tiled_kept": (1, 37, 60, 2, 1, 72, "float32"),        # two-pass tiles, P kept
    "recomputed": (1, 30, 300, 2, 1, 264, "bfloat16"),     # two-pass tiles, P recomputed
}


def _segments(rng, batch, length, runs):
    """Non-decreasing ids in `runs` runs of random lengths (crossing block edges)."""
    edges = np.sort(rng.choice(np.arange(1, length), size=runs - 1, replace=False))
    ids = np.zeros((batch, length), np.int32)
    for edge in edges:
        ids[:, edge:] += 1
    return ids


def feature_kwargs(name, shape, rng):
    """Keyword arguments of dot_product_attention for feature set `name`."""
    batch, seq_q, seq_k, heads, _, _, _ = shape
    lengths = lambda n, top: np.array([top, max(1, top // 2)][:n] + [top] * (n - 2), np.int32)
    if name == "bias":
        return dict(bias=rng.standard_normal((1, heads, seq_q, seq_k)).astype(np.float32))
    if name == "mask":
        return dict(mask=rng.random((batch, 1, seq_q, seq_k)) > 0.25)
    if name == "lengths":
        return dict(query_seq_lengths=lengths(batch, seq_q),
                    key_value_seq_lengths=lengths(batch, seq_k)[::-1].copy())
    if name == "window":
        return dict(local_window_size=(7, 3))
    if name == "soft_cap":
        return dict(logits_soft_cap=1.5, scale=3.0 / np.sqrt(shape[5]))
    if name == "segments":
        return dict(query_segment_ids=_segments(rng, batch, seq_q, 3),
                    key_value_segment_ids=_segments(rng, batch, seq_k, 3))
    if name == "dropout":
        return dict(dropout_rate=0.3, dropout_rng=jax.random.key(int(rng.integers(1 << 30))))
    if name == "everything":
        # Decoding shapes skip is_causal: top-left causal would leave each of a few
        # queries a handful of keys, where the true dq is near zero and bf16 rounding
        # of the output (in the backward's row sums) is all that a relative error sees.
        # Nor dropout, which would move them off split-KV (plan.Problem.kv_slices).
        decoding = seq_q * 8 < seq_k
        dropout = {} if decoding else dict(feature_kwargs("dropout", shape, rng),
                                           broadcast_dropout=True)
        return dict(feature_kwargs("bias", shape, rng), is_causal=not decoding,
                    mask=rng.random((1, heads, seq_q, seq_k)) > 0.1,
                    key_value_seq_lengths=lengths(batch, seq_k),
                    local_window_size=(600, 300) if decoding else (20, 0),
                    logits_soft_cap=20.0, **feature_kwargs("segments", shape, rng), **dropout)
    raise ValueError(name)


FEATURE_SETS = ["bias", "mask", "lengths", "window", "soft_cap", "segments", "dropout",
                "everything"]


# The kernels in every family; the 'xla' reference path has no families, so one shape.
# The two-pass families run each feature alone only where it changes their launches
# (a bias and its gradient; soft-cap and dropout stop the forward keeping P); the
# block skipping of the rest runs there in "everything" (and in the random shapes),
# which saves a third of this battery's interpreter time.
# Split-KV takes its own launches for a bias, lengths (decoding's padded caches)
# and soft-cap (dropout takes the flash kernels: plan.Problem.kv_slices). The 'xla'
# path is the reference itself, in float32: it runs
# through the API with everything at once, and with dropout (its own mask draw).
# The wide flash family runs the flash kernels at a 256-wide head tile with 33
# queries and grouped heads, where the key grads once outgrew shared memory.
TWO_PASS_SETS = ["bias", "soft_cap", "dropout", "everything"]
FAMILY_SETS = dict(flash=FEATURE_SETS, split_kv=["bias", "lengths", "soft_cap", "everything"],
                   flash_tma=["bias", "lengths", "everything"], flash_wide=["bias", "everything"])
BATTERY = [(KERNELS, family, feature) for family in FAMILIES
           for feature in FAMILY_SETS.get(family, TWO_PASS_SETS)]
BATTERY += [("xla", "flash", feature) for feature in ("dropout", "everything")]
# Every family with every feature keeps the interpreter's overflow checks (conftest.py).
BATTERY = [pytest.param(*case, marks=pytest.mark.int_overflow_checks)
           if case[2] == "everything" else case for case in BATTERY]


@pytest.mark.parametrize("implementation,family,feature", BATTERY, ids=str)
def test_feature_in_every_family(feature, family, implementation, monkeypatch):
    if family == "flash_tma":  # the interpreter runs the TMA variant where asked to
        monkeypatch.setenv(plan.TMA_ENVIRONMENT, "1")
    shape, seed = FAMILIES[family], new_seed()
    kwargs = feature_kwargs(feature, shape, feature_rng(seed))
    check_against_float64(shape, implementation, f"{feature=} {family=}", seed=seed, **kwargs)


def test_families_take_their_kernels():
    """Each family's features problem runs the kernels it is named for."""
    expected = {"flash": "_flash_forward_kernel", "flash_tma": "_flash_forward_kernel",
                "flash_wide": "_flash_key_grads_kernel", "split_kv": "_split_kv_kernel",
                "whole_rows": "_row_softmax_kernel",
                "tiled_kept": "_weighted_values_keeping_probs_kernel",
                "recomputed": "_score_grads_kernel"}  # without soft-cap or dropout
    for family, (b, sq, sk, n, k, d, dtype) in FAMILIES.items():
        problem = plan.Problem(b, sq, sk, n, k, d, np.dtype(DTYPES[dtype]), 0.1, True,
                               features=Features(window=(7, 3), bias=(1, n, sq, sk),
                                                 bias_grad=True))
        problem = plan.with_tma(problem, family == "flash_tma")
        launches = plan.forward_plan(problem, for_backward=True) + plan.backward_plan(problem)
        names = {l.kernel.fn.__name__ for l in launches}
        assert expected[family] in names, (family, names)
        tma = {l.metaparams["TMA"] for l in launches if "TMA" in l.metaparams}
        assert tma == ({True} if family == "flash_tma" else tma - {True}), (family, tma)


# Bias shapes broadcast to [2, 4, 45, 53] (heads: 4 query heads, 2 KV heads).
BIAS_SHAPES = [(2, 4, 45, 53), (1, 4, 45, 53), (2, 1, 1, 53), (1, 1, 45, 1), (4, 45, 53),
               (45, 53), (1, 1, 1, 1), (2, 4, 45, 1)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
def test_bias_broadcast_and_its_gradient(bias_shape):
    """Every broadcast form reduces its gradient in the kernels (stored where the bias has
    every dim, fp32 atomic sums where it broadcasts); causal for half of them."""
    seed = new_seed()
    bias = feature_rng(seed).standard_normal(bias_shape).astype(np.float32)
    check_against_float64(FAMILIES["flash"], KERNELS, f"{bias_shape=}", seed=seed, bias=bias,
                          is_causal=BIAS_SHAPES.index(bias_shape) % 2 == 1)


@pytest.mark.parametrize("dtype,bias_dtype", [("float16", "float16"), ("bfloat16", "float32"),
                                               ("float32", "bfloat16")])
def test_bias_dtypes(dtype, bias_dtype):
    """A bias in the input dtype or another: its gradient comes back in its own dtype."""
    shape, seed = (1, 30, 35, 2, 2, 40, dtype), new_seed()
    bias = feature_rng(seed).standard_normal((1, 2, 30, 35)).astype(DTYPES[bias_dtype])
    check_against_float64(shape, KERNELS, f"{bias_dtype=}", seed=seed, bias=bias)


@pytest.mark.parametrize("mask_shape", [(2, 1, 45, 53), (1, 4, 45, 53), (2, 1, 1, 53),
                                        (1, 1, 45, 1), (45, 53)], ids=str)
def test_mask_broadcast(mask_shape):
    seed = new_seed()
    mask = feature_rng(seed).random(mask_shape) > 0.3
    check_against_float64(FAMILIES["flash"], KERNELS, f"{mask_shape=}", seed=seed, mask=mask)


@pytest.mark.parametrize("family", ["flash", "split_kv", "whole_rows", "recomputed"])
def test_rows_that_see_no_key(family):
    """Whole rows masked (and whole batch elements with kv length 0): 0 out, lse -inf,
    zero gradients, no NaN anywhere."""
    shape = (2,) + FAMILIES[family][1:]
    batch, seq_q, seq_k, heads = shape[:4]
    seed = new_seed()
    mask = feature_rng(seed).random((batch, heads, seq_q, seq_k)) > 0.5
    mask[:, :, ::3] = False
    check_against_float64(shape, KERNELS, family, seed=seed, mask=mask,
                          key_value_seq_lengths=np.array([0] + [seq_k] * (batch - 1), np.int32))


@pytest.mark.parametrize("family", ["flash", "whole_rows"])
def test_lengths_of_zero_and_full(family):
    """Batch 0: no query rows; batch 1: no keys; batch 2: every row and key."""
    shape = (3,) + FAMILIES[family][1:]
    check_against_float64(shape, KERNELS, family,
                          query_seq_lengths=np.array([0, shape[1], shape[1]], np.int32),
                          key_value_seq_lengths=np.array([shape[2], 0, shape[2]], np.int32))


@pytest.mark.parametrize("window", [(0, 0), (500, 500), (60, 0), (0, 70), 2])
def test_windows(window):
    """Windows of one key, wider than the sequence, one-sided either way, symmetric."""
    check_against_float64(FAMILIES["flash"], KERNELS, f"{window=}", local_window_size=window)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_soft_cap_with_logits_beyond_the_cap(dtype):
    """Gemma 2's cap of 50 on logits whose spread is the cap's (many of them past it).
    Compiled, the flash kernels take the special-function unit's tanh for 16-bit inputs
    (masking._tanh): its error must stay inside the dtype's tolerance like the exact
    one's (the interpreter runs the exact one)."""
    shape = (1, 70, 90, 2, 1, 64, dtype)
    check_against_float64(shape, KERNELS, "cap 50", logits_soft_cap=50.0, scale=50.0 / 8)


def test_unordered_segment_ids():
    """Ids that are not in runs: no block is skipped, but the result is exact."""
    shape, seed = FAMILIES["flash"], new_seed()
    rng = feature_rng(seed)
    check_against_float64(shape, KERNELS, "unordered", seed=seed,
                          query_segment_ids=rng.integers(0, 3, (2, 45)).astype(np.int32),
                          key_value_segment_ids=rng.integers(0, 3, (2, 53)).astype(np.int32))


@pytest.mark.skipif(KERNELS != "interpret", reason="the interpreter's block sizes")
@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_blocks_are_never_read(family):
    """Keys that no query sees, in whole blocks of the interpreter's sizes: past a length
    in batch 0, in a segment no query has in batch 1. They are NaN, so a kernel that read
    a skipped block would return NaN."""
    _, seq_q, _, heads, kv_heads, head_dim, dtype = FAMILIES[family]
    # keys, and a multiple of every key block of the family's kernels in the interpreter
    seq_k, edge = {"split_kv": (1280, 64), "tiled_kept": (64, 32),
                   "recomputed": (320, 64)}.get(family, (128, 64))
    shape = (2, seq_q, seq_k, heads, kv_heads, head_dim, dtype)
    keys = np.arange(seq_k)
    kv_segments = np.stack([np.zeros(seq_k), keys >= edge]).astype(np.int32)
    kwargs = dict(query_segment_ids=np.zeros((2, seq_q), np.int32),
                  key_value_segment_ids=kv_segments,
                  key_value_seq_lengths=np.array([seq_k - edge, seq_k], np.int32))
    hidden = np.stack([keys >= seq_k - edge, keys >= edge])
    (q, k, v), seed = random_inputs(*shape)
    k, v = (np.where(hidden[:, :, None, None], np.nan, x).astype(x.dtype) for x in (k, v))
    attend = lambda q, k, v: jt_attention.dot_product_attention(q, k, v, implementation=KERNELS,
                                                                **kwargs)
    out, vjp = jax.vjp(attend, q, k, v)
    clean = lambda x: np.where(hidden[:, :, None, None], 0, x).astype(x.dtype)
    ref, _ = attention_float64(q, clean(k), clean(v), 1 / np.sqrt(head_dim), False, **kwargs)
    assert relative_error(out, ref) < TOLERANCE[dtype], f"{seed=}"
    dq, dk, dv = vjp(jnp.ones_like(out))
    assert np.isfinite(np.asarray(dq, np.float32)).all(), f"{seed=}"
    for grad in (dk, dv):
        assert np.isfinite(np.asarray(grad, np.float32)[~hidden]).all(), f"{seed=}"


@pytest.mark.parametrize("is_causal,window", [(True, (-1, -1)), (False, (40, 9)),
                                              (True, (256, 0)), (False, (0, 300)),
                                              (True, (0, 0))])
def test_tile_slots_cover_the_band(is_causal, window):
    """The tile kernels start masking.tile_slots programs per row block, each taking the
    row block's visible key block of its index: enough for every block the band lets
    a row block see (counted from the band's definition), and no more than all."""
    left, right = window
    for seq_q, seq_k, block_m, block_n in [(300, 700, 64, 256), (1000, 900, 128, 64),
                                           (77, 2048, 16, 32)]:
        slots = masking.tile_slots(seq_k, block_m, block_n, is_causal, left, right)
        most = 0
        for first in range(0, seq_q, block_m):
            rows = np.arange(first, first + block_m)[:, None]
            keys = np.arange(seq_k)[None, :]
            seen = np.ones((block_m, seq_k), bool)
            if left >= 0:
                seen &= keys >= rows - left
            if is_causal or right >= 0:
                seen &= keys <= rows + (0 if is_causal else right)
            blocks = np.nonzero(seen.any(0))[0] // block_n
            most = max(most, blocks.max() - blocks.min() + 1 if blocks.size else 0)
        assert most <= slots <= triton.cdiv(seq_k, block_n), (seq_q, seq_k, most, slots)


def test_matches_jax_nn_on_every_argument():
    """The same call through jax.nn (xla, float32 at HIGHEST) and through jt: bias, mask,
    lengths, window and causal together, grouped heads, q_len != kv_len."""
    rng = np.random.default_rng()
    (q, k, v), seed = random_inputs(2, 33, 41, 4, 2, 48, "float32")
    kwargs = dict(bias=rng.standard_normal((1, 4, 33, 41)).astype(np.float32),
                  mask=rng.random((2, 1, 33, 41)) > 0.2, is_causal=True,
                  query_seq_lengths=np.array([33, 20], np.int32),
                  key_value_seq_lengths=np.array([30, 41], np.int32),
                  local_window_size=(12, 2))
    with jax.default_matmul_precision("highest"):
        theirs = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    # The one intended difference: a row that sees no key is 0 here, the mean of the
    # values in jax.nn.
    _, lse = attention_float64(q, k, v, 1 / np.sqrt(48), **kwargs)
    theirs = np.where(np.isfinite(lse)[..., None], theirs, 0.0)
    assert np.isfinite(lse).any() and not np.isfinite(lse).all()
    for implementation in IMPLEMENTATIONS:
        ours = jt_attention.dot_product_attention(q, k, v, implementation=implementation,
                                                  **kwargs)
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5,
                                   err_msg=f"{seed=} {implementation=}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_keeps_a_shared_bias_unbroadcast(implementation, monkeypatch):
    """Under jax.vmap, a bias and mask of batch 1 that are not mapped reach the kernels
    as they are (no copy per mapped element); a mapped bias with batch 1 gets its own
    gradient per element."""
    rng = np.random.default_rng()
    (q, k, v), seed = random_inputs(6, 20, 24, 2, 2, 32, "float32")
    bias = rng.standard_normal((1, 2, 20, 24)).astype(np.float32)
    mask = rng.random((1, 1, 20, 24)) > 0.2
    split = lambda x: x.reshape(3, 2, *x.shape[1:])
    seen = []
    if implementation == "interpret":
        run = interpret.run_interpreted
        monkeypatch.setattr(interpret, "run_interpreted",
                            lambda launches, arrays, *a: seen.append(
                                (arrays["bias"].shape, arrays["mask"].shape)) or run(
                                launches, arrays, *a))
    attend = lambda q, k, v, bias: jt_attention.dot_product_attention(
        q, k, v, bias, mask, implementation=implementation)
    out = jax.vmap(attend, in_axes=(0, 0, 0, None))(*map(split, (q, k, v)), bias)
    ref, _ = attention_float64(q, k, v, 1 / np.sqrt(32), False, bias=bias, mask=mask)
    assert relative_error(out.reshape(q.shape), ref) < TOLERANCE["float32"], f"{seed=}"
    assert all(shapes == ((1, 2, 20, 24), (1, 1, 20, 24)) for shapes in seen), seen

    biases = rng.standard_normal((3, 1, 2, 20, 24)).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    loss = lambda q, k, v, bias, dout: jnp.sum(attend(q, k, v, bias) * dout)
    grads = jax.vmap(jax.grad(loss, argnums=3))(*map(split, (q, k, v)), biases, split(dout))
    for i in range(3):
        part = lambda x: split(x)[i]
        want = attention_grads_float64(part(q), part(k), part(v), part(dout), 1 / np.sqrt(32),
                                       False, bias=biases[i], mask=mask)[3]
        assert grads[i].shape == biases[i].shape
        assert relative_error(grads[i], want) < TOLERANCE["float32"], f"{seed=} {i=}"


@pytest.mark.parametrize("head_dim", [32, 288])
def test_vmap_over_queries_with_shared_keys_folds_into_heads(head_dim, monkeypatch):
    """Queries mapped by jax.vmap against one key and value (beams): the forward folds
    the map into the query heads, so the kernels read the key and value once,
    unbroadcast; a mapped mask of one head, a per-head bias, key lengths and dropout
    come along. Forward and gradients (the backward folds into the batch, each element
    having its own dK and dV) equal a call per element."""
    rng = np.random.default_rng(new_seed())
    batch, seq_q, seq_k, heads, kv_heads, maps = 2, 3, 40, 4, 2, 2
    (q, k, v), seed = random_inputs(maps * batch, seq_q, seq_k, heads, kv_heads, head_dim,
                                    "float32")
    q = q.reshape(maps, batch, *q.shape[1:])
    k, v = k[:batch], v[:batch]
    masks = rng.random((maps, batch, 1, seq_q, seq_k)) > 0.3
    bias = rng.standard_normal((1, heads, seq_q, seq_k)).astype(np.float32)
    options = dict(bias=bias, key_value_seq_lengths=np.array([seq_k, 29], np.int32),
                   dropout_rate=0.2, dropout_rng=jax.random.key(int(rng.integers(1 << 30))),
                   implementation=KERNELS)
    attend = lambda q, k, v, mask: jt_attention.dot_product_attention(q, k, v, mask=mask,
                                                                      **options)
    seen = []
    if KERNELS == "interpret":
        run = interpret.run_interpreted
        monkeypatch.setattr(interpret, "run_interpreted", lambda launches, arrays, *a: seen.append(
            (arrays["q"].shape, arrays["k"].shape)) or run(launches, arrays, *a))
    mapped = jax.vmap(attend, in_axes=(0, None, None, 0))(q, k, v, masks)
    for i in range(maps):
        want = attend(q[i], k, v, masks[i])
        assert relative_error(mapped[i], np.asarray(want, np.float64)) < 1e-5, f"{seed=} {i=}"
    if KERNELS == "interpret":
        assert (batch, seq_q, maps * heads, head_dim) in [shapes[0] for shapes in seen], seen
        assert all(shapes[1] == k.shape for shapes in seen), seen

    dout = rng.standard_normal(q.shape).astype(np.float32)
    loss = lambda q, k, v, mask, dout: jnp.sum(attend(q, k, v, mask) * dout)
    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None, 0, 0))(
        q, k, v, masks, dout)
    summed = jax.grad(lambda q, k, v: jnp.sum(
        jax.vmap(attend, in_axes=(0, None, None, 0))(q, k, v, masks) * dout),
        argnums=(0, 1, 2))(q, k, v)
    per_element = [jax.grad(loss, argnums=(0, 1, 2))(q[i], k, v, masks[i], dout[i])
                   for i in range(maps)]
    for name, got, total, want in zip("qkv", grads, summed, zip(*per_element)):
        want = np.stack([np.asarray(w, np.float64) for w in want])
        assert relative_error(got, want) < 1e-5, f"d{name} {seed=}"
        want = want if name == "q" else want.sum(0)
        assert relative_error(total, want) < 1e-5, f"d{name} summed {seed=}"


@pytest.mark.parametrize("kv_mapped", [True, False], ids=["into_batch", "into_heads"])
def test_vmap_indexes_segments_and_dropout_streams_in_full(kv_mapped):
    """Operands the kernels index by batch and head in full, a size of 1 included (segment
    ids, the dropout seeds), are broadcast along the map, unlike a bias or mask of batch
    1: with one batch element and one head per call, under either fold."""
    rng = np.random.default_rng(new_seed())
    maps, seq_q, seq_k = 3, 20, 24
    (q, k, v), seed = random_inputs(maps, seq_q, seq_k, 1, 1, 16, "float32")
    q, k, v = (x.reshape(maps, 1, *x.shape[1:]) for x in (q, k, v))
    if not kv_mapped:
        k, v = k[0], v[0]
    ids = lambda n: np.sort(rng.integers(0, 3, (1, n)), axis=1).astype(np.int32)
    options = dict(query_segment_ids=ids(seq_q), key_value_segment_ids=ids(seq_k),
                   dropout_rate=0.3, dropout_rng=jax.random.key(int(rng.integers(1 << 30))),
                   implementation=KERNELS)
    attend = lambda q, k, v: jt_attention.dot_product_attention(q, k, v, **options)
    kv_axis = 0 if kv_mapped else None
    mapped = jax.vmap(attend, in_axes=(0, kv_axis, kv_axis))(q, k, v)
    for i in range(maps):
        want = attend(q[i], k[i] if kv_mapped else k, v[i] if kv_mapped else v)
        assert relative_error(mapped[i], np.asarray(want, np.float64)) < 1e-5, f"{seed=} {i=}"


def test_several_batch_dims_and_small_head_dims():
    """[batch, batch2, seq, heads, head_dim] inputs with a bias over the batch dims, and
    head dims below 16 (padded in the kernels)."""
    rng = np.random.default_rng()
    for head_dim in (1, 3, 15):
        (q, k, v), seed = random_inputs(6, 17, 19, 2, 1, head_dim, "float32")
        bias = rng.standard_normal((3, 1, 2, 17, 19)).astype(np.float32)
        lengths = np.array([[19, 4], [7, 19], [1, 0]], np.int32)
        fold = lambda x: x.reshape(3, 2, *x.shape[1:])
        out = jt_attention.dot_product_attention(
            *map(fold, (q, k, v)), bias, key_value_seq_lengths=lengths, is_causal=True,
            implementation=KERNELS)
        ref, _ = attention_float64(q, k, v, 1 / np.sqrt(head_dim), True,
                                   bias=np.repeat(bias, 2, axis=1).reshape(6, 2, 17, 19),
                                   key_value_seq_lengths=lengths.reshape(6))
        assert out.shape == (3, 2, 17, 2, head_dim)
        assert relative_error(out.reshape(ref.shape), ref) < TOLERANCE["float32"], (
            f"{seed=} {head_dim=}")
