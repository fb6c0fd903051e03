"""Trains a small decoder-only transformer (Flax nnx, optax) whose attention is jt_attention.

    python examples/train_lm.py                                     # 101M params, on a GPU
    python examples/train_lm.py --compare cudnn,xla --plot train.png
    python examples/train_lm.py --layers 2 --d_model 32 --heads 2 --kv_heads 1 \\
        --head_dim 16 --seq 32 --batch 4 --steps 30 --implementation interpret  # a CPU

Byte-level language model (vocabulary 256) on the text that ships with this repository
(its Markdown and Python files), or, where they are missing, a generated corpus. Each
layer: RMSNorm, causal grouped-query attention (optionally a sliding window, and
attention dropout fused in the kernels), RMSNorm, a GELU MLP; rotary position
embeddings; tied input and output embeddings. Every implementation in --compare trains
the same model from the same seed on the same batches. Prints the loss, step time and
tokens/s as it goes; at the end a table of the runs and, with --plot and matplotlib
installed (the `plots` extra), a PNG of the loss curves and step times. Exits non-zero
if the loss does not fall, or if another implementation's loss curve departs from the
first one's by more than the dtype allows.
"""

import glob
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 16, "transformer layers")
flags.DEFINE_integer("d_model", 768, "model width")
flags.DEFINE_integer("heads", 6, "query heads")
flags.DEFINE_integer("kv_heads", 2, "key/value heads (grouped-query attention)")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("seq", 2048, "sequence length")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("steps", 200, "training steps")
flags.DEFINE_integer("window", None, "sliding window: each token sees this many before it")
flags.DEFINE_float("dropout", 0.0, "attention dropout rate")
flags.DEFINE_float("learning_rate", 3e-4, "peak learning rate (warmup, then cosine decay)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "activations")
flags.DEFINE_enum("implementation", None, ["triton", "interpret", "xla"],
                  "jt_attention's implementation (default: Triton on a GPU, else xla)")
flags.DEFINE_list("compare", [], "also train with jax.nn.dot_product_attention: cudnn, xla")
flags.DEFINE_float("loss_tolerance", None, "largest gap allowed between the smoothed loss "
                   "curves (default by dtype)")
flags.DEFINE_string("plot", None, "write the loss curves and step times to this PNG")
flags.DEFINE_integer("seed", 0, "parameters, data order and dropout")

# Gap between two runs' smoothed losses that rounding explains, by dtype.
LOSS_TOLERANCE = {"float32": 0.02, "bfloat16": 0.1, "float16": 0.1}


def corpus():
    """Bytes of the repository's text, or a generated corpus where it is missing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "**", "*.md"), recursive=True)
                   + glob.glob(os.path.join(root, "jt_attention", "**", "*.py"), recursive=True))
    text = b"".join(open(f, "rb").read() for f in files if ".venv" not in f)
    if len(text) < 10_000:
        print("repository text not found: a generated corpus")
        words = [b"attention", b"kernel", b"block", b"query", b"key", b"value", b"softmax"]
        text = b" ".join(words[(i * 7 + i // 5) % len(words)] for i in range(200_000))
    return text


def main(argv):
    del argv
    if FLAGS.implementation == "interpret":  # must precede the first import of triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import jax
    import numpy as np

    runs = [("jt", FLAGS.implementation)] + [("jax.nn", name) for name in FLAGS.compare]
    data = np.frombuffer(corpus(), np.uint8)
    print(f"device: {jax.devices()[0].device_kind}; corpus {len(data):,} bytes; "
          f"{FLAGS.layers} layers, d_model {FLAGS.d_model}, {FLAGS.heads} heads "
          f"({FLAGS.kv_heads} kv) of {FLAGS.head_dim}, seq {FLAGS.seq}, batch {FLAGS.batch}, "
          f"{FLAGS.dtype}")
    results = [train(library, implementation, data) for library, implementation in runs]
    print("\nrun                     params   first loss  last loss  ms/step  tokens/s")
    for result in results:
        print(f"{result['name']:<22} {result['params'] / 1e6:6.1f}M {result['losses'][0]:11.3f} "
              f"{smooth(result['losses'])[-1]:10.3f} {result['ms']:8.1f} {result['tokens_s']:9,.0f}")
    if FLAGS.plot:
        plot(results, FLAGS.plot)
    sys.exit(check(results))


def train(library, implementation, data):
    """Trains one model from FLAGS.seed; returns its losses and median step time."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    name = f"{library} {implementation or 'default'}"
    attend = make_attention(library, implementation)
    model = Transformer(attend, nnx.Rngs(FLAGS.seed))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.learning_rate,
                                                  max(1, FLAGS.steps // 10), FLAGS.steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, key):
        def loss_fn(model):
            logits = model(tokens[:, :-1], key)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), tokens[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    batches = np.random.default_rng(FLAGS.seed)
    losses, times = [], []
    for i in range(FLAGS.steps):
        starts = batches.integers(0, len(data) - FLAGS.seq - 1, FLAGS.batch)
        tokens = jnp.asarray(np.stack([data[s:s + FLAGS.seq + 1] for s in starts]), jnp.int32)
        start = time.perf_counter()
        loss = float(step(model, optimizer, tokens, jax.random.key(FLAGS.seed * 1000 + i)))
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if i % max(1, FLAGS.steps // 20) == 0 or i == FLAGS.steps - 1:
            ms = 1e3 * np.median(times[1:] or times)
            print(f"[{name}] step {i + 1}/{FLAGS.steps} loss {loss:.3f} "
                  f"{ms:.1f} ms/step {FLAGS.batch * FLAGS.seq / ms * 1e3:,.0f} tokens/s",
                  flush=True)
    ms = 1e3 * float(np.median(times[1:] or times))  # the first step compiles
    return dict(name=name, params=params, losses=losses, ms=ms,
                tokens_s=FLAGS.batch * FLAGS.seq / ms * 1e3)


def make_attention(library, implementation):
    """attend(q, k, v, key) with the model's masks: jt_attention or jax.nn."""
    import jax
    import jt_attention

    window = None if FLAGS.window is None else (FLAGS.window, 0)
    if library == "jt":
        return lambda q, k, v, key: jt_attention.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=window, implementation=implementation,
            dropout_rate=FLAGS.dropout, dropout_rng=key if FLAGS.dropout else None)
    if FLAGS.dropout:
        raise app.UsageError("--dropout runs on jt_attention only: jax.nn has no dropout")
    return lambda q, k, v, key: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=window, implementation=implementation)


def _nnx():
    from flax import nnx
    return nnx


class Transformer(_nnx().Module):
    """Byte-level decoder: embeddings, FLAGS.layers blocks, final norm, tied output head."""

    def __init__(self, attend, rngs):
        nnx = _nnx()
        import jax.numpy as jnp
        dtype = jnp.dtype(FLAGS.dtype)
        self.embed = nnx.Embed(256, FLAGS.d_model, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(attend, dtype, rngs) for _ in range(FLAGS.layers)])
        self.norm = nnx.RMSNorm(FLAGS.d_model, dtype=dtype, rngs=rngs)

    def __call__(self, tokens, key):
        import jax
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, jax.random.fold_in(key, i))
        return self.embed.attend(self.norm(x))


class Block(_nnx().Module):
    def __init__(self, attend, dtype, rngs):
        nnx = _nnx()
        dense = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype,
                                               rngs=rngs)
        self.attend = attend
        self.norm1 = nnx.RMSNorm(FLAGS.d_model, dtype=dtype, rngs=rngs)
        self.query = dense(FLAGS.d_model, FLAGS.heads * FLAGS.head_dim)
        self.key_value = dense(FLAGS.d_model, 2 * FLAGS.kv_heads * FLAGS.head_dim)
        self.out = dense(FLAGS.heads * FLAGS.head_dim, FLAGS.d_model)
        self.norm2 = nnx.RMSNorm(FLAGS.d_model, dtype=dtype, rngs=rngs)
        self.up = dense(FLAGS.d_model, 4 * FLAGS.d_model)
        self.down = dense(4 * FLAGS.d_model, FLAGS.d_model)

    def __call__(self, x, key):
        import jax
        batch, seq, _ = x.shape
        h = self.norm1(x)
        q = rotary(self.query(h).reshape(batch, seq, FLAGS.heads, FLAGS.head_dim))
        kv = self.key_value(h).reshape(batch, seq, 2, FLAGS.kv_heads, FLAGS.head_dim)
        k, v = rotary(kv[:, :, 0]), kv[:, :, 1]
        x = x + self.out(self.attend(q, k, v, key).reshape(batch, seq, -1))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


def rotary(x):
    """Rotary position embeddings on [batch, seq, heads, head_dim] (pairs of halves)."""
    import jax.numpy as jnp
    seq, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    frequencies = 10_000.0 ** (-jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * frequencies[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:2 * half].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]],
                              axis=-1)
    return rotated.astype(x.dtype)


def smooth(losses, window=10):
    """Moving average of the last `window` losses at each step."""
    import numpy as np
    losses = np.asarray(losses, np.float64)
    cumulative = np.cumsum(np.insert(losses, 0, 0.0))
    counts = np.minimum(np.arange(1, len(losses) + 1), window)
    ends = np.arange(1, len(losses) + 1)
    return (cumulative[ends] - cumulative[ends - counts]) / counts


def check(results):
    """0 if every run's loss fell and every curve stays within the tolerance of the first
    run's; else 1, with the reason."""
    import numpy as np
    tolerance = FLAGS.loss_tolerance or LOSS_TOLERANCE[FLAGS.dtype]
    status = 0
    for result in results:
        curve = smooth(result["losses"])
        if not curve[-1] < 0.9 * result["losses"][0]:
            print(f"FAIL {result['name']}: the loss did not fall ({result['losses'][0]:.3f} -> "
                  f"{curve[-1]:.3f})")
            status = 1
    first = smooth(results[0]["losses"])
    for result in results[1:]:
        gap = float(np.max(np.abs(smooth(result["losses"]) - first)))
        verdict = "ok" if gap <= tolerance else "FAIL"
        print(f"{verdict} {result['name']} vs {results[0]['name']}: largest gap between the "
              f"smoothed losses {gap:.4f} (tolerance {tolerance})")
        status |= verdict == "FAIL"
    return status


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install 'jt_attention[plots]'): no {path}")
        return
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        curves.plot(smooth(result["losses"]), label=result["name"])
    curves.set(xlabel="step", ylabel="loss (moving average of 10)", title="training loss")
    curves.legend()
    bars.bar([r["name"] for r in results], [r["ms"] for r in results])
    bars.set(ylabel="ms per step (median)", title="step time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
