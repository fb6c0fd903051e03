"""Attention over several devices, two ways, each checked against one device:

  (a) batch/head-sharded: jax.jit of jt_attention.dot_product_attention on inputs
      sharded over the batch and the heads (NamedSharding on a 2-D mesh). Attention
      is independent per batch element and head, so each device runs the kernels on
      its own shard.
  (b) sequence-sharded ring attention: jt_attention.ring_attention under
      jax.shard_map, the sequence split over every device in the zigzag layout,
      causal; the key/value blocks travel around the ring.

    python examples/sharded_attention.py                 # the GPUs if there are --devices
    python examples/sharded_attention.py --devices=4 --seq=128

With fewer accelerators than --devices, it runs on --devices simulated CPU devices
(XLA's --xla_force_host_platform_device_count, set here before jax starts) with the
Triton kernels interpreted (TRITON_INTERPRET=1, set before triton is imported), at a
small default shape. Prints each path's time per call and its relative error against
the single-device result; exits non-zero if any is above the dtype's tolerance.
"""

import math
import os
import re
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 8, "devices to shard over (simulated CPU devices if the "
                     "machine has fewer accelerators)")
flags.DEFINE_integer("batch", 2, "batch size")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_integer("seq", None, "global sequence length (default 8192 on GPUs; 64 "
                     "interpreted); ring attention needs a multiple of 2 * devices")
flags.DEFINE_integer("head_dim", None, "head dim (default 128 on GPUs; 32 interpreted)")
flags.DEFINE_enum("dtype", None, ["float16", "bfloat16", "float32"],
                  "input dtype (default bfloat16 on GPUs; float32 interpreted)")
flags.DEFINE_enum("implementation", None, ["triton", "interpret", "xla"],
                  "default: 'triton' on enough GPUs, else 'interpret' on CPU devices")
flags.DEFINE_integer("repeats", None, "timed calls per path after a first (compiling) "
                     "call (default 3 on GPUs; 1 interpreted)")

TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-4}


def simulate_cpu_devices(count):
    """Asks XLA for `count` CPU devices; takes effect only if jax has not started yet."""
    flag = f"--xla_force_host_platform_device_count={count}"
    current = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" in current:
        current = re.sub(r"--xla_force_host_platform_device_count=\d+", flag, current)
    else:
        current = f"{current} {flag}".strip()
    os.environ["XLA_FLAGS"] = current


def restart_with(env):
    """Runs this script again in a fresh process with `env` (for settings that must
    precede jax's or triton's start); never returns."""
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def choose_devices(count, implementation):
    """(devices, implementation): `count` GPUs where there are that many (the kernels,
    or 'xla' if asked), else `count` CPU devices with the kernels interpreted (or
    'xla' if asked)."""
    import jax

    gpus = [d for d in jax.devices() if getattr(d, "compute_capability", None)]
    if implementation != "interpret" and len(gpus) >= count:
        return gpus[:count], implementation or "triton"
    if implementation == "triton":
        sys.exit(f"--implementation=triton needs {count} CUDA GPUs; found {len(gpus)}")
    implementation = implementation or "interpret"
    if implementation == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:  # too late to switch the kernels to the interpreter
            restart_with({"TRITON_INTERPRET": "1"})
        os.environ["TRITON_INTERPRET"] = "1"
    cpus = jax.devices("cpu")
    if len(cpus) < count:  # jax started before the flag was set
        restart_with({"XLA_FLAGS": os.environ["XLA_FLAGS"]})
    return cpus[:count], implementation


def timed(function, *args, repeats):
    """(result, seconds of the first call, mean seconds of `repeats` later calls)."""
    import jax

    start = time.perf_counter()
    result = jax.block_until_ready(function(*args))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        result = jax.block_until_ready(function(*args))
    return result, first, (time.perf_counter() - start) / max(repeats, 1)


def relative_error(out, want):
    import numpy as np

    out, want = (np.asarray(x, np.float64) for x in (out, want))
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - want) / (np.linalg.norm(want) or 1.0))


def batch_head_mesh(devices, batch, heads):
    """A ('batch', 'heads') mesh over `devices` that divides batch and heads."""
    import numpy as np
    from jax.sharding import Mesh

    over_batch = math.gcd(batch, len(devices))
    over_heads = len(devices) // over_batch
    if heads % over_heads:
        sys.exit(f"cannot shard batch={batch} x heads={heads} over {len(devices)} devices: "
                 f"the batch takes {over_batch}, leaving {over_heads} for heads={heads}; "
                 "pick --heads as a multiple of that")
    return Mesh(np.array(devices).reshape(over_batch, over_heads), ("batch", "heads"))


def batch_head_sharded(q, k, v, devices, implementation):
    """(a): a plain jax.jit on inputs sharded over the batch and the heads; the kernel
    launches are partitioned (jt_attention/partitioning.py), so each device runs
    them on its own batch elements and heads, with no collective."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    import jt_attention

    mesh = batch_head_mesh(devices, q.shape[0], q.shape[2])
    sharding = NamedSharding(mesh, PartitionSpec("batch", None, "heads", None))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    attend = jax.jit(lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation), out_shardings=sharding)
    return attend, (q, k, v), f"{dict(mesh.shape)}"


def ring_sharded(q, k, v, devices, implementation):
    """(b): the sequence over every device, zigzag, causal; returns the output in global
    order (the layout is undone outside the timed function, as data preparation)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import jt_attention

    count = len(devices)
    mesh = Mesh(np.array(devices), ("seq",))
    spec = PartitionSpec(None, "seq")
    laid = (jt_attention.ring_layout(x, count, layout="zigzag") for x in (q, k, v))
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in laid)
    attend = jax.jit(jax.shard_map(
        lambda q, k, v: jt_attention.ring_attention(
            q, k, v, axis_name="seq", is_causal=True, layout="zigzag",
            implementation=implementation),
        mesh=mesh, in_specs=spec, out_specs=spec))
    unlaid = lambda out: jt_attention.ring_unlayout(np.asarray(out), count, layout="zigzag")
    return attend, (q, k, v), f"{{'seq': {count}}} zigzag", unlaid


def main(argv):
    del argv
    simulate_cpu_devices(FLAGS.devices)  # before jax starts its CPU backend
    import jax
    import jax.numpy as jnp
    import numpy as np

    devices, implementation = choose_devices(FLAGS.devices, FLAGS.implementation)
    on_gpu = devices[0].platform == "gpu"
    seq = FLAGS.seq or (8192 if on_gpu else 64)
    head_dim = FLAGS.head_dim or (128 if on_gpu else 32)
    dtype = FLAGS.dtype or ("bfloat16" if on_gpu else "float32")
    repeats = FLAGS.repeats or (3 if on_gpu else 1)
    if seq % (2 * len(devices)):
        sys.exit(f"--seq={seq} must be divisible by 2 * devices = {2 * len(devices)} "
                 "(the zigzag layout's chunks)")
    import jt_attention  # after choose_devices: it sets TRITON_INTERPRET where needed

    shape = (FLAGS.batch, seq, FLAGS.heads, head_dim)
    keys = jax.random.split(jax.random.key(time.time_ns() % 2**31), 3)
    q, k, v = (np.asarray(jax.random.normal(key, shape, jnp.dtype(dtype))) for key in keys)
    print(f"{len(devices)} x {devices[0].device_kind}; implementation={implementation}; "
          f"shape {shape} {dtype}, causal")

    single = jax.jit(lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation))
    on_one = [jax.device_put(x, devices[0]) for x in (q, k, v)]
    want, first, per_call = timed(single, *on_one, repeats=repeats)
    print(f"single device:        {per_call * 1e3:9.2f} ms/call (first call {first:.2f} s)")

    attend, inputs, mesh = batch_head_sharded(q, k, v, devices, implementation)
    out, first, per_call = timed(attend, *inputs, repeats=repeats)
    errors = {"batch/head-sharded": relative_error(out, want)}
    print(f"batch/head-sharded:   {per_call * 1e3:9.2f} ms/call (first call {first:.2f} s), "
          f"mesh {mesh}, relative error vs single device "
          f"{errors['batch/head-sharded']:.2e}")

    attend, inputs, mesh, unlaid = ring_sharded(q, k, v, devices, implementation)
    out, first, per_call = timed(attend, *inputs, repeats=repeats)
    errors["ring"] = relative_error(unlaid(out), want)
    print(f"ring (sequence):      {per_call * 1e3:9.2f} ms/call (first call {first:.2f} s), "
          f"mesh {mesh}, relative error vs single device {errors['ring']:.2e}")

    bad = {name: error for name, error in errors.items() if not error < TOLERANCE[dtype]}
    if bad:
        sys.exit(f"above the {dtype} tolerance {TOLERANCE[dtype]}: {bad}")
    print(f"ok: both sharded paths agree with one device within {TOLERANCE[dtype]}")


if __name__ == "__main__":
    app.run(main)
