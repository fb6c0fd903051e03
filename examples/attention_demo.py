"""One attention call and its gradient on whatever backend is here; checks both against
the fp32 reference.

    python examples/attention_demo.py     # Triton kernels: compiled on a CUDA GPU, else interpreted
    python examples/attention_demo.py --implementation=interpret --head_dim=512

On a machine without a CUDA GPU the default is the same kernels in Triton's CPU
interpreter (needs torch: pip install 'jt_attention[test]'), at a small shape.
"""

import logging
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 2, "batch size")
flags.DEFINE_integer("seq", None, "query and key/value length (default 256; 48 interpreted)")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_integer("head_dim", None, "head dim, 1 to 1024 (default 128; 64 interpreted)")
flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "input dtype")
flags.DEFINE_bool("causal", True, "causal mask")
flags.DEFINE_enum("implementation", None, ["triton", "interpret", "xla"],
                  "backend; default: 'triton' on a CUDA GPU, else 'interpret'")

TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-4}


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    implementation = FLAGS.implementation
    if implementation is None:
        on_gpu = any(getattr(d, "compute_capability", None) for d in jax.devices())
        implementation = "triton" if on_gpu else "interpret"
    if implementation == "interpret":  # must precede the first import of triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    interpreted = implementation == "interpret"
    seq = FLAGS.seq or (48 if interpreted else 256)
    head_dim = FLAGS.head_dim or (64 if interpreted else 128)
    logging.getLogger("jt_attention").setLevel(logging.INFO)
    import jt_attention

    keys = jax.random.split(jax.random.key(time.time_ns() % 2**31), 3)
    shape = (FLAGS.batch, seq, FLAGS.heads, head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.dtype(FLAGS.dtype)) for key in keys)
    attend = jax.jit(lambda q, k, v: jt_attention.dot_product_attention(
        q, k, v, is_causal=FLAGS.causal, implementation=implementation))

    start = time.perf_counter()
    out = jax.block_until_ready(attend(q, k, v))
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(attend(q, k, v))
    second_call = time.perf_counter() - start

    ref, _ = jt_attention.attention_reference(q, k, v, is_causal=FLAGS.causal)
    ref = np.asarray(ref, np.float64)
    error = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    print(f"device: {jax.devices()[0].device_kind}; path: {implementation}; shape {shape} "
          f"{FLAGS.dtype}"
          f"{' causal' if FLAGS.causal else ''}")
    print(f"first call (trace, compile, autotune): {first_call:.2f} s; "
          f"second call: {second_call * 1e3:.3f} ms; relative error vs fp32 reference: {error:.2e}")

    # The backward kernels: gradients of <out, dout> for a random dout.
    dout = jax.random.normal(keys[0], shape, jnp.dtype(FLAGS.dtype))
    grads = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](dout))(q, k, v)
    reference_attend = lambda q, k, v: jt_attention.attention_reference(
        q, k, v, is_causal=FLAGS.causal)[0]
    upcast = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    expected = jax.vjp(reference_attend, *upcast[:3])[1](upcast[3])
    grad_error = max(np.linalg.norm(np.asarray(g, np.float64) - np.asarray(e, np.float64))
                     / np.linalg.norm(np.asarray(e, np.float64)) for g, e in zip(grads, expected))
    print(f"gradients (dq, dk, dv): worst relative error vs fp32 reference: {grad_error:.2e}")
    for name, value in (("output", error), ("gradient", grad_error)):
        if not value < TOLERANCE[FLAGS.dtype]:
            sys.exit(f"{name} error {value:.2e} is above the {FLAGS.dtype} tolerance "
                     f"{TOLERANCE[FLAGS.dtype]}")


if __name__ == "__main__":
    app.run(main)
