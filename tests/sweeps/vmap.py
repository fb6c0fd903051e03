"""Sweep: random jax.vmap calls of dot_product_attention (interpreted kernels) against a
call per element: mapped or shared keys and values (the batch or the heads fold), bias,
mask, segment ids and dropout keys mapped or not, broadcast dims, lengths, windows,
soft-cap; forward and the gradients of the mapped loss.

    TRITON_INTERPRET=1 python tests/sweeps/vmap.py FIRST_SEED COUNT
"""
import sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_platforms", "cpu")
import jt_attention

seed0 = int(sys.argv[1]); draws = int(sys.argv[2])
for seed in range(seed0, seed0 + draws):
    rng = np.random.default_rng(seed)
    A = int(rng.integers(2, 5)); B = int(rng.integers(1, 3)); K = int(rng.choice([1, 2]))
    N = K * int(rng.choice([1, 2, 3])); T = int(rng.choice([1, 3, 17])); S = int(rng.choice([5, 40, 70]))
    D = int(rng.choice([16, 40, 264])); causal = bool(rng.random() < 0.3)
    kv_mapped = bool(rng.random() < 0.25)
    q = rng.standard_normal((A, B, T, N, D)).astype(np.float32)
    kshape = ((A,) if kv_mapped else ()) + (B, S, K, D)
    k = rng.standard_normal(kshape).astype(np.float32); v = rng.standard_normal(kshape).astype(np.float32)
    opts = {}; mapped_opts = {}
    if rng.random() < 0.5:
        hb = int(rng.choice([1, N])); bb = int(rng.choice([1, B]))
        bias = rng.standard_normal((bb, hb, T, S)).astype(np.float32)
        if rng.random() < 0.5: mapped_opts["bias"] = np.stack([bias + i for i in range(A)])
        else: opts["bias"] = bias
    if rng.random() < 0.5:
        hm = int(rng.choice([1, N]))
        mask = rng.random((A, B, hm, T, S)) > 0.3
        if rng.random() < 0.5: mapped_opts["mask"] = mask
        else: opts["mask"] = mask[0]
    if rng.random() < 0.4: opts["key_value_seq_lengths"] = rng.integers(1, S + 1, B).astype(np.int32)
    if rng.random() < 0.35:
        ids = lambda n: np.sort(rng.integers(0, 3, (A, B, n)), -1).astype(np.int32)
        qs, ks = ids(T), ids(S)
        if kv_mapped and rng.random() < 0.5:
            mapped_opts["query_segment_ids"], mapped_opts["key_value_segment_ids"] = qs, ks
        else:
            opts["query_segment_ids"], opts["key_value_segment_ids"] = qs[0], ks[0]
    if rng.random() < 0.3: opts["local_window_size"] = (int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    if rng.random() < 0.3: opts["logits_soft_cap"] = 5.0
    if rng.random() < 0.4:
        opts["dropout_rate"] = 0.25; opts["broadcast_dropout"] = bool(rng.random() < 0.3)
        if rng.random() < 0.5: mapped_opts["dropout_rng"] = jax.random.split(jax.random.key(seed), A)
        else: opts["dropout_rng"] = jax.random.key(seed)
    names = sorted(mapped_opts)
    def f(q, k, v, *mapped):
        return jt_attention.dot_product_attention(q, k, v, is_causal=causal, implementation="interpret",
                                                  **opts, **dict(zip(names, mapped)))
    in_axes = (0, 0 if kv_mapped else None, 0 if kv_mapped else None) + (0,) * len(names)
    out = jax.vmap(f, in_axes=in_axes)(q, k, v, *(mapped_opts[n] for n in names))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    g = jax.grad(lambda q, k, v: jnp.sum(jax.vmap(f, in_axes=in_axes)(q, k, v, *(mapped_opts[n] for n in names)) * dout), argnums=(0, 1, 2))(q, k, v)
    worst = 0.0
    gk = 0; gv = 0; gq = []
    for i in range(A):
        ki, vi = (k[i], v[i]) if kv_mapped else (k, v)
        args = [mapped_opts[n][i] for n in names]
        want = np.asarray(f(q[i], ki, vi, *args))
        worst = max(worst, float(np.abs(np.asarray(out[i]) - want).max()))
        gi = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, *args) * dout[i]), argnums=(0, 1, 2))(q[i], ki, vi)
        gq.append(gi[0])
        if kv_mapped:
            worst = max(worst, float(np.abs(np.asarray(g[1][i]) - gi[1]).max()))
        else:
            gk = gk + gi[1]; gv = gv + gi[2]
    worst = max(worst, float(np.abs(np.asarray(g[0]) - np.stack(gq)).max()))
    if not kv_mapped:
        worst = max(worst, float(np.abs(np.asarray(g[1]) - gk).max()), float(np.abs(np.asarray(g[2]) - gv).max()))
    status = "ok" if worst < 1e-4 and np.isfinite(worst) else "FAIL"
    print(f"{status} seed {seed} A{A} B{B} N{N} K{K} T{T} S{S} D{D} causal={causal} kv_mapped={kv_mapped} "
          f"opts={sorted(opts)} mapped={names} worst {worst:.2e}", flush=True)
