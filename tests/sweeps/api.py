"""Sweep: random calls of dot_product_attention (interpreted kernels) against jax.nn's
xla path: several batch dims, bias and mask of every broadcastable rank, GQA, head dims
3 to 264, causal, windows, lengths; forward and gradients. Rows that see no key are
compared only for being 0 (jax.nn returns the values' mean there, by design).

    TRITON_INTERPRET=1 python tests/sweeps/api.py FIRST_SEED COUNT

Prints one line a draw: ok, DIFF or ERROR with the draw's shapes and errors.
"""
import sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_platforms", "cpu")
import jt_attention

seed0, draws = int(sys.argv[1]), int(sys.argv[2])
for seed in range(seed0, seed0 + draws):
    rng = np.random.default_rng(seed)
    batch_dims = [(), (2,), (3,), (2, 2)][rng.integers(4)]
    K = int(rng.choice([1, 2])); N = K * int(rng.choice([1, 2, 3]))
    T = int(rng.integers(1, 30)); S = int(rng.choice([int(rng.integers(1, 40)), 530])); D = int(rng.choice([3, 16, 40, 264]))
    bshape = batch_dims if batch_dims else ()
    q = rng.standard_normal((*bshape, T, N, D)).astype(np.float32)
    k = rng.standard_normal((*bshape, S, K, D)).astype(np.float32)
    v = rng.standard_normal((*bshape, S, K, D)).astype(np.float32)
    causal = bool(rng.random() < 0.3) and T <= S
    kw = {}
    def bcast_shape():
        # a shape broadcastable to [*batch, N, T, S] with random rank and size-1 dims
        dims = list(bshape) + [N, T, S]
        rank = int(rng.integers(2, len(dims) + 1))
        dims = dims[len(dims) - rank:]
        return tuple(d if rng.random() < 0.6 else 1 for d in dims)
    if rng.random() < 0.5: kw["bias"] = rng.standard_normal(bcast_shape()).astype(np.float32)
    if rng.random() < 0.5:
        m = rng.random(bcast_shape()) > 0.3
        kw["mask"] = m
    if rng.random() < 0.3 and len(bshape) == 1:
        kw["key_value_seq_lengths"] = rng.integers(1, S + 1, bshape).astype(np.int32)
        if rng.random() < 0.5: kw["query_seq_lengths"] = rng.integers(1, T + 1, bshape).astype(np.int32)
    if rng.random() < 0.3 and not causal:
        kw["local_window_size"] = (int(rng.integers(0, 8)), int(rng.integers(0, 8)))
        if "mask" not in kw:
            kw["mask"] = np.ones((T, S), bool)
    def jt(q, k, v, bias):
        return jt_attention.dot_product_attention(q, k, v, bias, is_causal=causal, implementation="interpret",
                                                  **{a: b for a, b in kw.items() if a != "bias"})
    lead = int(np.prod(bshape)) if bshape else None
    def ref(q, k, v, bias):
        if len(bshape) <= 1:
            return jax.nn.dot_product_attention(q, k, v, bias, is_causal=causal, implementation="xla",
                                                **{a: b for a, b in kw.items() if a != "bias"})
        full = lambda x: None if x is None else jnp.broadcast_to(x, (*bshape, N, T, S)).reshape(lead, N, T, S)
        fold = lambda x: x.reshape(lead, *x.shape[len(bshape):])
        extra = {a: b for a, b in kw.items() if a not in ("bias", "mask")}
        out = jax.nn.dot_product_attention(fold(q), fold(k), fold(v), full(bias), full(kw.get("mask")),
                                           is_causal=causal, implementation="xla", **extra)
        return out.reshape(q.shape)
    # which rows see a key (elsewhere jt returns 0 and jax.nn the values' mean, by design)
    vis = np.ones((*bshape, N, T, S), bool)
    if "mask" in kw: vis &= np.broadcast_to(kw["mask"], vis.shape)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    if causal: vis &= j <= i
    if "local_window_size" in kw:
        l, r = kw["local_window_size"]; vis &= (j >= i - l) & (j <= i + r)
    if "key_value_seq_lengths" in kw: vis &= (j[None, None] < kw["key_value_seq_lengths"][:, None, None, None])
    if "query_seq_lengths" in kw: vis &= (i[None, None] < kw["query_seq_lengths"][:, None, None, None])
    rows = np.moveaxis(vis.any(-1), -1, -2)[..., None]  # [*batch, T, N, 1]
    all_rows = bool(rows.all())
    bias = kw.get("bias")
    argn = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    try:
        got = jt(q, k, v, bias)
        want = ref(q, k, v, bias)
        dout = dout * rows  # rows that see no key carry no gradient in either
        gg = jax.grad(lambda *a: jnp.sum(jt(*a) * dout), argnums=argn)(q, k, v, bias)
        gw = jax.grad(lambda *a: jnp.sum(ref(*a) * dout), argnums=argn)(q, k, v, bias)
    except Exception as e:
        print(f"ERROR seed {seed} batch{batch_dims} N{N} K{K} T{T} S{S} D{D} causal={causal} "
              f"{ {a: np.shape(b) for a, b in kw.items()} }: {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
    err = float(np.abs((np.asarray(got) - np.asarray(want)) * rows).max())
    zero = float(np.abs(np.asarray(got) * ~rows).max()) if not all_rows else 0.0
    err = max(err, zero)
    gerr = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(gg, gw))
    status = "ok" if err < 1e-4 and gerr < 1e-3 else "DIFF"
    print(f"{status} seed {seed} batch{batch_dims} N{N} K{K} T{T} S{S} D{D} causal={causal} "
          f"{ {a: np.shape(b) for a, b in kw.items()} } err {err:.1e} grad {gerr:.1e}", flush=True)
