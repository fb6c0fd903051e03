"""How long a fresh process waits for its first attention call, jt_attention beside its peers.

    python examples/first_call.py --batch 8 --num_heads 16 --q_len 2048 --head_dim 128
    python examples/first_call.py --mode fwd_bwd --impls jt,cudnn,xla

Each line is one new Python process that builds the inputs, then times its first call
(trace, compile, first execution: for jt also the Triton compiles and the autotuner's
timing runs) and a second call. jt runs twice: with an empty compile cache ("new
shape": every kernel config is compiled) and again with the cache the first process
filled ("second process"), which is what a later run of the same program pays. The
peers compile nothing of that kind, so each runs once. Process start-up and imports
are not counted, for anyone.

On a machine without a CUDA GPU, jt runs in Triton's interpreter (needs torch) at a
small default shape: a check that the script runs, not a timing.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

# The parent only looks for a GPU; left to JAX's default it would hold 75% of the GPU's
# memory while the children run. The children get the environment as it was.
CHILD_ENV = dict(os.environ)
if not any(arg.startswith("--child") for arg in sys.argv[1:]):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

ON_GPU = any(getattr(d, "compute_capability", None) for d in jax.devices())

flags.DEFINE_integer("batch", 8 if ON_GPU else 1, "batch size")
flags.DEFINE_integer("num_heads", 16 if ON_GPU else 2, "heads")
flags.DEFINE_integer("q_len", 2048 if ON_GPU else 64, "sequence length (queries and keys)")
flags.DEFINE_integer("head_dim", 128 if ON_GPU else 32, "head dim")
flags.DEFINE_enum("dtype", "bfloat16" if ON_GPU else "float32",
                  ["float16", "bfloat16", "float32"], "input dtype")
flags.DEFINE_bool("causal", False, "causal mask")
flags.DEFINE_enum("mode", "fwd", ["fwd", "fwd_bwd"], "the forward, or forward and gradients")
flags.DEFINE_list("impls", ["jt", "cudnn", "xla"] if ON_GPU else ["jt", "xla"],
                  "jt, cudnn, xla")
flags.DEFINE_string("child", None, "internal: time one implementation in this process")
FLAGS = flags.FLAGS

IMPLS = ("jt", "cudnn", "xla")
SHAPE_FLAGS = ("batch", "num_heads", "q_len", "head_dim", "dtype", "causal", "mode")


def _attend(impl):
    import jt_attention

    if impl == "jt":
        implementation = "triton" if ON_GPU else "interpret"
        return lambda q, k, v: jt_attention.dot_product_attention(
            q, k, v, is_causal=FLAGS.causal, implementation=implementation)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=FLAGS.causal,
                                                        implementation=impl)


def time_here(impl):
    """{first_s, second_ms} of one implementation's first two calls in this process."""
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    shape = (FLAGS.batch, FLAGS.q_len, FLAGS.num_heads, FLAGS.head_dim)
    q, k, v, dout = (jax.random.normal(key, shape, jnp.dtype(FLAGS.dtype)) for key in keys)
    attend = _attend(impl)
    if FLAGS.mode == "fwd":
        step = jax.jit(attend)
        call = lambda: step(q, k, v)
    else:
        def grads(q, k, v, dout):
            out, vjp = jax.vjp(attend, q, k, v)
            return out, vjp(dout)
        step = jax.jit(grads)
        call = lambda: step(q, k, v, dout)
    jax.block_until_ready((q, k, v, dout))
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(call())
    return dict(first_s=first, second_ms=(time.perf_counter() - start) * 1e3)


def _in_new_process(impl, cache_dir):
    """time_here(impl) in a fresh interpreter, with the compile cache in `cache_dir`."""
    args = [sys.executable, __file__, f"--child={impl}"]
    args += [FLAGS[name].serialize() for name in SHAPE_FLAGS]
    env = {**CHILD_ENV, "JT_ATTENTION_CACHE_DIR": cache_dir,
           "TRITON_INTERPRET": "0" if ON_GPU else "1"}
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        return dict(error=(result.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(time_here(FLAGS.child)), flush=True)
        return
    unknown = sorted(set(FLAGS.impls) - set(IMPLS))
    if unknown:
        raise app.UsageError(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    print(f"B={FLAGS.batch} H={FLAGS.num_heads} S={FLAGS.q_len} D={FLAGS.head_dim} "
          f"{FLAGS.dtype}{' causal' if FLAGS.causal else ''} {FLAGS.mode}: first call of a "
          "new process (imports not counted)")
    with tempfile.TemporaryDirectory() as cache_dir:
        runs = [("jt", "new shape"), ("jt", "second process")] if "jt" in FLAGS.impls else []
        runs += [(impl, "") for impl in FLAGS.impls if impl != "jt"]
        for impl, label in runs:
            row = _in_new_process(impl, cache_dir)
            name = f"{impl} ({label})" if label else impl
            if "error" in row:
                print(f"  {name:<22} failed: {row['error'][:120]}")
            else:
                print(f"  {name:<22} first call {row['first_s']:6.2f} s   "
                      f"second {row['second_ms']:8.2f} ms", flush=True)


if __name__ == "__main__":
    app.run(main)
