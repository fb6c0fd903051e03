"""Sweep: random sharded calls of dot_product_attention under jax.jit (interpreted
kernels, 8 simulated CPU devices) against the unsharded call: meshes of 2 to 8, the
query sharded over batch, heads and sometimes the sequence, with every feature;
forward and gradients of q, k, v and the bias.

    TRITON_INTERPRET=1 python tests/sweeps/sharding.py FIRST_SEED COUNT
"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_platforms", "cpu")
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jt_attention

seed0, draws = int(sys.argv[1]), int(sys.argv[2])
for seed in range(seed0, seed0 + draws):
    rng = np.random.default_rng(seed)
    mesh_shape = [(2,), (4,), (2, 2), (2, 4)][rng.integers(4)]
    names = ("a", "b")[:len(mesh_shape)]
    devices = np.array(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
    mesh = Mesh(devices, names)
    B = int(rng.choice([1, 2, 4])); K = int(rng.choice([1, 2, 4])); N = K * int(rng.choice([1, 2]))
    T = int(rng.choice([1, 9, 20])); S = int(rng.choice([7, 20, 33])); D = int(rng.choice([16, 264]))
    causal = bool(rng.random() < 0.3)
    q = rng.standard_normal((B, T, N, D)).astype(np.float32)
    k = rng.standard_normal((B, S, K, D)).astype(np.float32); v = rng.standard_normal((B, S, K, D)).astype(np.float32)
    opts = {}
    bias = None
    if rng.random() < 0.5:
        bias = rng.standard_normal((int(rng.choice([1, B])), int(rng.choice([1, N])), T, S)).astype(np.float32)
    if rng.random() < 0.4: opts["mask"] = rng.random((int(rng.choice([1, B])), int(rng.choice([1, N])), T, S)) > 0.3
    if rng.random() < 0.4: opts["key_value_seq_lengths"] = rng.integers(1, S + 1, B).astype(np.int32)
    if rng.random() < 0.3:
        opts["query_segment_ids"] = np.sort(rng.integers(0, 3, (B, T)), 1).astype(np.int32)
        opts["key_value_segment_ids"] = np.sort(rng.integers(0, 3, (B, S)), 1).astype(np.int32)
    if rng.random() < 0.3: opts["local_window_size"] = (int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    if rng.random() < 0.3: opts["logits_soft_cap"] = 5.0
    if rng.random() < 0.5:
        opts.update(dropout_rate=0.25, dropout_rng=jax.random.key(seed), broadcast_dropout=bool(rng.random() < 0.3))
    # q spec: batch over one axis or none, heads over the other or none; sometimes a sequence axis
    choice = [None] + list(names)
    bax, hax = rng.choice(choice), rng.choice(choice)
    if hax == bax: hax = None
    sax = rng.choice(choice) if rng.random() < 0.2 else None
    if sax in (bax, hax): sax = None
    size = lambda ax: mesh.shape[ax] if ax else 1
    if B % size(bax): bax = None
    if N % size(hax): hax = None
    if T % size(sax): sax = None
    spec = P(bax, sax, hax)
    kspec = P(bax, None, hax)
    def loss(q, k, v, bias, dout):
        out = jt_attention.dot_product_attention(q, k, v, bias, is_causal=causal, implementation="interpret", **opts)
        return jnp.sum(out * dout), out
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) + ((3,) if bias is not None else ()), has_aux=True))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    (_, want), gwant = jax.block_until_ready(step(q, k, v, bias, dout))
    try:
        put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
        qs = put(q, spec)
        ks, vs = (put(x, kspec) if K % (mesh.shape[hax] if hax else 1) == 0 and B % (mesh.shape[bax] if bax else 1) == 0 else x for x in (k, v))
        (_, got), ggot = jax.block_until_ready(step(qs, ks, vs, bias, put(dout, spec)))
    except Exception as e:
        print(f"ERROR seed {seed} mesh {mesh_shape} spec {spec} B{B} N{N} K{K} T{T} S{S} D{D} causal={causal} bias={None if bias is None else bias.shape} opts={sorted(opts)}: {type(e).__name__}: {str(e)[-300:]}", flush=True); continue
    worst = max([float(np.abs(np.asarray(got) - np.asarray(want)).max())] +
                [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(ggot, gwant)])
    print(f"{'ok' if worst < 1e-4 else 'FAIL'} seed {seed} mesh {mesh_shape} spec {spec} B{B} N{N} K{K} T{T} S{S} D{D} "
          f"causal={causal} bias={None if bias is None else bias.shape} opts={sorted(opts)} worst {worst:.1e}", flush=True)
