"""Times jt_attention side by side with the attention a JAX user already has.

    python examples/benchmark.py --batch 32 --num_heads 32 --q_len 512 --head_dim 1024
    python examples/benchmark.py --preset forward --json results.json
    python examples/benchmark.py --preset common_heads --dtype bfloat16
    python examples/benchmark.py --preset training --mode fwd_bwd
    python examples/benchmark.py --batch 8 --num_heads 16 --q_len 2048 --head_dim 128 \
        --dtype bfloat16 --bias heads --window 256,0 --causal
    python examples/benchmark.py --preset features --mode fwd_bwd --dtype bfloat16

On a machine without a CUDA GPU, jt runs the same kernels in Triton's interpreter
(needs torch), the default peers are xla and unfused, and the default shape is small
(B=1 H=2 S=128 D=64): a check that the benchmark and the kernels run, not a timing.

Implementations (--impls):
  jt          jt_attention.dot_product_attention (Triton kernels; interpreted on a CPU)
  xla         jax.nn.dot_product_attention(implementation='xla')
  cudnn       jax.nn.dot_product_attention(implementation='cudnn'), head_dim <= 256
  unfused     einsum, softmax, einsum, all in the input dtype, under jit
  torch_bmm   torch baddbmm + softmax + bmm in the input dtype (cuBLAS), if torch is there
  mgpu        JAX's Pallas Mosaic GPU kernel (jax.experimental.pallas.ops.gpu.attention_mgpu):
              TMA and warp specialization; sm_90, float16, head dims 64 and 128, no features,
              no causal backward; blocks 64 x 128 forward, 64 x 64 backward; it applies no
              scale, so its time includes scaling q

Features (each peer gets the same where it supports it, else it records the reason):
  --bias heads|full|keys   a bias of shape [1, H, Sq, Sk], [B, H, Sq, Sk] or [B, 1, 1, Sk]:
                           float32, or the inputs' dtype with --bias_dtype input
  --mask causal|random     a dense boolean mask [1, 1, Sq, Sk] (lower triangle) or [B, 1, Sq, Sk]
  --kv_lengths half        key_value_seq_lengths: half of each row's keys are padding
  --window L,R             local_window_size
  --soft_cap C             logits_soft_cap (jt and unfused only)
  --segments N             N packed documents of equal length per row (segment ids; the jax.nn
                           peers get the equivalent dense mask)
The preset `features` runs each feature next to its baseline (the same shape without it).

--mode fwd times the forward; bwd the backward alone (jax.vjp's function, residuals
already computed); fwd_bwd both, as a training step runs them, returning the output
and the gradients (so that XLA cannot drop the launches that only compute the output).
Backward FLOPs count as 2.5x the forward's.

Each row gives the median ms, TFLOP/s (4*B*H*Sq*Sk*D, halved for causal), GB/s (the
bytes of q, k, v and the output, each moved once: the memory floor of decoding) and the
relative error against an fp32 reference (the worst of the arrays a mode returns).
For fwd_bwd, temp_mb is XLA's count of the compiled step's scratch memory: what it
allocates beyond its inputs (q, k, v, dout) and outputs (out and the gradients). An
implementation that fails is recorded as NaN with its reason.
"""

import functools
import json
import math
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

ON_GPU = any(getattr(d, "compute_capability", None) for d in jax.devices())
if not ON_GPU:  # Triton's interpreter is chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jt_attention  # noqa: E402
from jt_attention.plan import Problem  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32 if ON_GPU else 1, "batch size")
flags.DEFINE_integer("num_heads", 32 if ON_GPU else 2, "query heads")
flags.DEFINE_integer("num_kv_heads", None, "key/value heads (default: num_heads)")
flags.DEFINE_integer("q_len", 512 if ON_GPU else 128, "query length")
flags.DEFINE_integer("kv_len", None, "key/value length (default: q_len)")
flags.DEFINE_integer("head_dim", 1024 if ON_GPU else 64, "head dim")
flags.DEFINE_enum("dtype", "float16" if ON_GPU else "float32",  # jax.nn's xla: no fp16 on CPU
                  ["float16", "bfloat16", "float32"], "input dtype")
flags.DEFINE_bool("causal", False, "causal mask (top-left aligned)")
IMPLS = ["jt", "xla", "cudnn", "unfused", "torch_bmm", "mgpu"]
flags.DEFINE_list("impls", IMPLS[:-1] if ON_GPU else ["jt", "xla", "unfused"],
                  f"implementations, of {IMPLS}")
flags.DEFINE_enum("preset", None, ["forward", "large_heads", "common_heads", "training", "decode",
                                   "features"], "run a list of shapes instead of one")
flags.DEFINE_enum("bias", None, ["heads", "full", "keys"], "add a bias of this shape")
flags.DEFINE_enum("bias_dtype", "float32", ["float32", "input"],
                  "the bias's dtype: float32, or the inputs' dtype")
flags.DEFINE_enum("mask", None, ["causal", "random"], "add a dense boolean mask")
flags.DEFINE_enum("kv_lengths", None, ["half"], "pad half of each row's keys")
flags.DEFINE_list("window", None, "local_window_size as left,right")
flags.DEFINE_float("soft_cap", None, "logits_soft_cap")
flags.DEFINE_integer("segments", None, "packed documents per row, as segment ids")
flags.DEFINE_float("dropout", None, "attention dropout rate (jt only: jax.nn has none)")
flags.DEFINE_list("head_dims", None, "with --preset: only the rows of these head dims")
flags.DEFINE_string("plot", None, "draw TFLOP/s per implementation and shape to this PNG "
                    "(needs matplotlib: the `plots` extra)")
flags.DEFINE_enum("mode", "fwd", ["fwd", "bwd", "fwd_bwd"], "what to time")
flags.DEFINE_integer("repeats", 7, "timed repeats; the median is reported")
flags.DEFINE_float("min_repeat_ms", 50.0, "each repeat runs enough calls to last this long")
flags.DEFINE_string("json", None, "write the rows here")

# (batch, heads, q_len, kv_len, head_dim, causal[, kv_heads])
PRESETS = {
    "forward": [
        (32, 32, 512, 512, 1024, False),   # the seed workload (KernelBench L1-97)
        (16, 16, 2048, 2048, 128, False),
        (16, 16, 2048, 2048, 128, True),
        (16, 16, 2048, 2048, 64, False),
        (8, 16, 2048, 2048, 256, False),
        (4, 32, 2048, 2048, 512, False),
        (4, 32, 2048, 2048, 1024, False),
    ],
    "large_heads": [  # head dims no fused peer supports; S=8192 at a similar FLOP count
        (32, 32, 512, 512, 1024, False),
        *[(b, h, s, s, d, c) for b, h, s in ((4, 32, 2048), (1, 16, 8192))
          for d in (512, 1024) for c in (False, True)],
    ],
    "common_heads": [  # head dims cuDNN supports
        *[(b, 16, s, s, d, c) for s, d, b in ((2048, 64, 16), (2048, 128, 16), (2048, 256, 8),
                                             (8192, 64, 4), (8192, 128, 4), (8192, 256, 2))
          for c in (False, True)],
    ],
    "training": [
        (32, 32, 512, 512, 1024, False),
        (16, 16, 2048, 2048, 128, False),
        (16, 16, 2048, 2048, 128, True),
        (8, 16, 2048, 2048, 256, False),
        (4, 32, 2048, 2048, 512, False),
    ],
    "decode": [  # split-KV: few query rows against long caches
        (1, 32, 1, 4096, 128, False),
        (1, 32, 1, 32768, 128, False),
        (8, 32, 1, 32768, 128, False),
        (8, 32, 1, 16384, 128, False, 8),   # grouped-query: 8 kv heads
        (4, 32, 16, 16384, 128, False),
        (2, 16, 4, 8192, 64, False),
        (2, 16, 4, 8192, 64, True),         # top-left causal: 4 visible keys, launch-bound
    ],
}

# The feature rows: (batch, heads, q_len, kv_len, head_dim, causal, features), each
# after the baseline it is compared with (same shape, no features; causal for the mask
# and window rows; the packed row's baseline is the batch of separate documents).
FEATURE_PRESET = [
    *[row for b, d in ((8, 128), (4, 1024)) for row in (
        (b, 16, 2048, 2048, d, False, {}),
        (b, 16, 2048, 2048, d, False, {"bias": "heads"}),
        (b, 16, 2048, 2048, d, False, {"bias": "heads", "bias_dtype": "input"}),
        (b, 16, 2048, 2048, d, False, {"soft_cap": 30.0}),
        (b, 16, 2048, 2048, d, False, {"dropout": 0.1}),
        (b, 16, 2048, 2048, d, False, {"kv_lengths": "half"}),
        (b, 16, 2048, 2048, d, True, {}),
        (b, 16, 2048, 2048, d, False, {"mask": "causal"}))],
    *[row for b, d in ((2, 128), (1, 1024)) for row in (
        (b, 16, 8192, 8192, d, True, {}),
        (b, 16, 8192, 8192, d, True, {"window": (256, 0)}))],
    *[row for d in (128, 1024) for row in (
        (8, 16, 1024, 1024, d, False, {}),
        (1, 16, 8192, 8192, d, False, {"segments": 8}))],
]

FLOPS_PER_MODE = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # in forward FLOPs


def feature_arrays(features, batch, heads, q_len, kv_len, key, dtype):
    """The arrays and options of a feature spec (the --bias .. --segments flags): a dict of
    jt_attention.dot_product_attention keywords. A bias is float32 unless the spec's
    bias_dtype is "input" (then `dtype`, the inputs')."""
    kwargs = {}
    if features.get("bias"):
        shape = {"heads": (1, heads, q_len, kv_len), "full": (batch, heads, q_len, kv_len),
                 "keys": (batch, 1, 1, kv_len)}[features["bias"]]
        bias_dtype = dtype if features.get("bias_dtype") == "input" else jnp.float32
        kwargs["bias"] = jax.random.normal(key, shape, bias_dtype)
    if features.get("mask") == "causal":
        kwargs["mask"] = jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None]
    elif features.get("mask") == "random":
        kwargs["mask"] = jax.random.bernoulli(key, 0.9, (batch, 1, q_len, kv_len))
    if features.get("kv_lengths") == "half":
        kwargs["key_value_seq_lengths"] = jnp.full((batch,), kv_len // 2, jnp.int32)
    if features.get("window"):
        kwargs["local_window_size"] = tuple(int(w) for w in features["window"])
    if features.get("soft_cap"):
        kwargs["logits_soft_cap"] = float(features["soft_cap"])
    if features.get("segments"):
        docs = features["segments"]
        ids = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) * docs // n, (batch, n))
        kwargs["query_segment_ids"], kwargs["key_value_segment_ids"] = ids(q_len), ids(kv_len)
    if features.get("dropout"):
        kwargs["dropout_rate"] = float(features["dropout"])
        kwargs["dropout_rng"] = jax.random.key(1)
    return kwargs


def _as_jax_nn(kwargs):
    """jt's feature keywords for jax.nn: segment ids become the equivalent dense mask; a
    soft-cap or dropout has no equivalent (ValueError)."""
    kwargs = dict(kwargs)
    for name in ("logits_soft_cap", "dropout_rate"):
        if name in kwargs:
            raise ValueError(f"jax.nn.dot_product_attention has no {name}")
    if "query_segment_ids" in kwargs:
        same = (kwargs.pop("query_segment_ids")[:, None, :, None]
                == kwargs.pop("key_value_segment_ids")[:, None, None, :])
        kwargs["mask"] = same & kwargs["mask"] if "mask" in kwargs else same
    return kwargs


def _unfused(q, k, v, scale, causal, bias=None, mask=None, query_seq_lengths=None,
             key_value_seq_lengths=None, local_window_size=None, logits_soft_cap=None,
             query_segment_ids=None, key_value_segment_ids=None, dropout_rate=None,
             dropout_rng=None):
    """What a careful user writes by hand: einsum, softmax, einsum, in the input dtype."""
    if dropout_rate:
        raise ValueError("the unfused baseline has no dropout")
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * jnp.asarray(scale, q.dtype)
    if bias is not None:
        logits = logits + bias.astype(q.dtype)
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    visible = jt_attention.reference.visibility(
        logits.shape, mask, causal, query_seq_lengths, key_value_seq_lengths,
        local_window_size, query_segment_ids, key_value_segment_ids)
    logits = jnp.where(visible, logits, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def _jax_impls(problem, kwargs):
    scale, causal = problem.scale, problem.is_causal
    nn = lambda impl: (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation=impl, **_as_jax_nn(kwargs)))
    return {
        "jt": lambda q, k, v: jt_attention.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal,
            implementation="triton" if ON_GPU else "interpret", **kwargs),
        "xla": nn("xla"),
        "cudnn": nn("cudnn"),
        "unfused": lambda q, k, v: _unfused(q, k, v, scale, causal, **kwargs),
        "mgpu": lambda q, k, v: _mosaic_gpu(q, k, v, scale, causal, **kwargs),
    }


def _mosaic_gpu(q, k, v, scale, causal, **features):
    """JAX's Pallas Mosaic GPU attention, where it runs. It applies no scale, so q is
    scaled first: one elementwise pass, included in its time (about 0.05 ms at B16 H16
    S2048 D128 fp16 on an H100, 5% of its forward)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    if features:
        raise ValueError("mgpu runs without features")
    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal, block_q_dkv=64,
        block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    return attention_mgpu.attention(q * jnp.asarray(scale, q.dtype), k, v, config)


def _torch_bmm(q, k, v, dout, problem, mode):
    """cuBLAS batched GEMMs + softmax in the input dtype (autograd for the backward);
    returns (timed callable, finish, to_numpy)."""
    import torch
    from torch.utils import dlpack

    if problem.num_kv_heads != problem.num_heads:
        raise ValueError("torch_bmm covers num_kv_heads == num_heads only")
    b, t, n, h = q.shape
    s = k.shape[1]
    to_heads = lambda x: (dlpack.from_dlpack(x).permute(0, 2, 1, 3).reshape(b * n, -1, h)
                          .contiguous())
    tq, tk, tv = to_heads(q), to_heads(k), to_heads(v)
    zero = torch.zeros(1, 1, 1, dtype=tq.dtype, device=tq.device)  # broadcast, beta=0
    mask = None
    if problem.is_causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=tq.device).tril()

    def forward(tq, tk, tv):
        scores = torch.baddbmm(zero, tq, tk.transpose(1, 2), beta=0.0, alpha=problem.scale)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.bmm(torch.softmax(scores, dim=-1), tv)

    to_numpy = lambda x: x.detach().reshape(b, n, -1, h).permute(0, 2, 1, 3).float().cpu().numpy()
    if mode == "fwd":
        run = lambda: forward(tq, tk, tv)
        return run, lambda out: torch.cuda.synchronize(), to_numpy
    if mode == "bwd":
        raise ValueError("torch_bmm is timed in fwd and fwd_bwd modes only")
    leaves = [x.requires_grad_() for x in (tq, tk, tv)]
    tdout = to_heads(dout)

    def run():
        out = forward(*leaves)
        return (out, *torch.autograd.grad(out, leaves, tdout))

    return (run, lambda out: torch.cuda.synchronize(),
            lambda arrays: [to_numpy(x) for x in arrays])


def _time(call, finish):
    """Median ms per call over FLAGS.repeats repeats of back-to-back calls.

    finish(out) waits for the device. The first call (trace, compile, autotune) is timed
    apart and returned as first_call_s."""
    start = time.perf_counter()
    finish(call())
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    finish(call())
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, math.ceil(FLAGS.min_repeat_ms / 1e3 / once))
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        finish(out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return float(np.median(times)), out, first_call_s


def _relative_error(out, ref):
    """Relative error of an output, or the worst over a tuple of gradients."""
    if isinstance(ref, (tuple, list)):
        return max(_relative_error(o, r) for o, r in zip(out, ref))
    out = np.asarray(out, np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _finite(out):
    """Whether an output, or every gradient of a tuple, is free of NaN and inf."""
    arrays = out if isinstance(out, (tuple, list)) else [out]
    return all(bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in arrays)


def _timed_function(attend, mode, q, k, v, dout):
    """A jitted no-argument call for `mode`, and its jitted form for memory analysis."""
    if mode == "fwd":
        fn = jax.jit(attend)
        return (lambda: fn(q, k, v)), None
    if mode == "bwd":
        _, vjp = jax.vjp(attend, q, k, v)  # residuals computed once, outside the timing
        fn = jax.jit(lambda vjp, dout: vjp(dout))
        return (lambda: fn(vjp, dout)), None
    fn = jax.jit(functools.partial(_training_step, attend))
    return (lambda: fn(q, k, v, dout)), (fn, (q, k, v, dout))


def _training_step(attend, q, k, v, dout):
    """(out, dq, dk, dv). The output is returned too, as a training step feeds it to the
    loss: left unused, XLA drops the launches that only compute it (the jt seed step
    timed 6.5 ms instead of 7.7 that way, 2026-11-24)."""
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(dout))


def _scratch_mb(jitted):
    """XLA's temp buffer size of the compiled step, MB (NaN if it does not say)."""
    if jitted is None:
        return float("nan")
    fn, args = jitted
    analysis = fn.lower(*args).compile().memory_analysis()
    return getattr(analysis, "temp_size_in_bytes", float("nan")) / 2**20


def _reference(q, k, v, dout, problem, mode, kwargs):
    """fp32 reference of what `mode` returns: the output (fwd), the gradients (bwd), or
    both (fwd_bwd), as numpy."""
    attend = lambda q, k, v: jt_attention.attention_reference(
        q, k, v, scale=problem.scale, is_causal=problem.is_causal, **kwargs)[0]
    upcast = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    if mode == "fwd":
        return np.asarray(jax.jit(attend)(*upcast[:3]))
    arrays = jax.jit(functools.partial(_training_step, attend))(*upcast)
    return tuple(np.asarray(x) for x in (arrays if mode == "fwd_bwd" else arrays[1:]))


def benchmark_shape(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, causal, impls,
                    mode, features=None):
    """Times each implementation on one shape (with `features`, a feature spec); returns
    the rows."""
    features = features or {}
    problem = Problem(batch, q_len, kv_len, heads, kv_heads, head_dim, np.dtype(dtype),
                      1.0 / math.sqrt(head_dim), causal)
    keys = jax.random.split(jax.random.key(int(time.time())), 5)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    dout = jax.random.normal(keys[3], q.shape, dtype)
    kwargs = feature_arrays(features, batch, heads, q_len, kv_len, keys[4], dtype)
    shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
                 head_dim=head_dim, dtype=str(np.dtype(dtype)), causal=causal,
                 features=_feature_label(features), mode=mode, gpu=jax.devices()[0].device_kind)
    print(f"{_shape_label(shape)}: the fp32 reference", flush=True)
    try:
        ref = _reference(q, k, v, dout, problem, mode, kwargs)
    except Exception as e:  # it materialises the scores: S=8192 gradients outgrow a GPU
        print(f"  no fp32 reference ({type(e).__name__}): errors are not checked, only "
              "that the results are finite", flush=True)
        ref = None
    jax_impls = _jax_impls(problem, kwargs)
    rows = []
    for name in impls:
        print(f"  {name} ...", flush=True)
        row = dict(impl=name, **shape)
        try:
            jitted = None
            if name == "torch_bmm":
                if features:
                    raise ValueError("torch_bmm runs without features")
                run, finish, to_numpy = _torch_bmm(q, k, v, dout, problem, mode)
                ms, out, first_call_s = _time(run, finish)
                out = to_numpy(out)
            else:
                run, jitted = _timed_function(jax_impls[name], mode, q, k, v, dout)
                ms, out, first_call_s = _time(run, jax.block_until_ready)
            err = _relative_error(out, ref) if ref is not None else float("nan")
            flops = problem.flops() * FLOPS_PER_MODE[mode]
            io_bytes = sum(x.nbytes for x in (q, k, v, q))  # read q, k, v once, write out
            row.update(ms=ms, tflops=flops / ms / 1e9, rel_err=err,
                       ok=_finite(out) and (ref is None or bool(np.isfinite(err))),
                       gbps=io_bytes / ms / 1e6, first_call_s=first_call_s,
                       temp_mb=_scratch_mb(jitted))
        except Exception as e:  # recorded, not raised: one failing peer must not stop the run
            row.update(ms=float("nan"), tflops=float("nan"), rel_err=float("nan"), ok=False,
                       reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _feature_label(features):
    return " ".join(f"{k}={v}" for k, v in sorted(features.items()))


def _shape_label(row):
    return (f"B={row['batch']} H={row['heads']} Sq={row['q_len']} Sk={row['kv_len']} "
            f"D={row['head_dim']} {row['dtype']}{' causal' if row['causal'] else ''}"
            f"{' ' + row['features'] if row.get('features') else ''}")


def _format(row):
    text = (f"{_shape_label(row):<46} {row['impl']:<10} {row['ms']:9.3f} ms "
            f"{row['tflops']:7.1f} TFLOP/s {row.get('gbps', float('nan')):6.0f} GB/s "
            f"err {row['rel_err']:.1e} "
            f"first call {row.get('first_call_s', float('nan')):5.1f} s")
    if not np.isnan(row.get("temp_mb", float("nan"))):
        text += f" temp {row['temp_mb']:.0f} MB"
    return text + (f"  [{row['reason']}]" if "reason" in row else "")


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.impls) - set(IMPLS))
    if unknown:
        raise app.UsageError(f"--impls: unknown {unknown}; choose from {IMPLS}")
    dtype = jnp.dtype(FLAGS.dtype)
    if FLAGS.preset == "features":
        shapes = [(b, h, sq, sk, d, c, None, f) for b, h, sq, sk, d, c, f in FEATURE_PRESET]
    elif FLAGS.preset:
        shapes = [(*row[:6], row[6] if len(row) > 6 else None, {})
                  for row in PRESETS[FLAGS.preset]]
    else:
        shapes = [(FLAGS.batch, FLAGS.num_heads, FLAGS.q_len, FLAGS.kv_len or FLAGS.q_len,
                   FLAGS.head_dim, FLAGS.causal, None, _flag_features())]
    if FLAGS.head_dims:
        shapes = [row for row in shapes if str(row[4]) in FLAGS.head_dims]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, mode {FLAGS.mode}")
    rows = []
    for batch, heads, q_len, kv_len, head_dim, causal, kv_heads, features in shapes:
        kv_heads = kv_heads or FLAGS.num_kv_heads or heads
        rows += benchmark_shape(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, causal,
                                FLAGS.impls, FLAGS.mode, features)
    print("\nsummary (ms; ratio = jt time / best peer time)" + (
        "" if ON_GPU else ": no CUDA GPU, so jt ran in Triton's interpreter, whose time is "
        "no measure of the kernels"))
    for shape_rows in _group(rows):
        peers = [r for r in shape_rows if r["impl"] != "jt" and r["ok"]]
        jt = next((r for r in shape_rows if r["impl"] == "jt"), None)
        best = min(peers, key=lambda r: r["ms"]) if peers else None
        ratio = jt["ms"] / best["ms"] if (jt and best) else float("nan")
        cells = "  ".join(f"{r['impl']}={r['ms']:.3f}" for r in shape_rows)
        print(f"{_shape_label(shape_rows[0]):<46} {cells}  ratio={ratio:.2f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)
    if FLAGS.plot:
        plot(rows, FLAGS.plot)


def plot(rows, path):
    """Grouped bars: TFLOP/s of each implementation at each shape (failed runs left out)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install 'jt_attention[plots]'): no {path}")
        return
    groups = _group(rows)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, impl in enumerate(impls):
        values = [next((r["tflops"] for r in g if r["impl"] == impl and r["ok"]), 0.0)
                  for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([_shape_label(g[0]).replace(" ", "\n", 4) for g in groups], fontsize=7)
    ax.set(ylabel="TFLOP/s", title=f"{rows[0]['gpu']}, {rows[0]['mode']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _flag_features():
    bias_dtype = FLAGS.bias_dtype if FLAGS.bias and FLAGS.bias_dtype != "float32" else None
    flags_given = dict(bias=FLAGS.bias, bias_dtype=bias_dtype, mask=FLAGS.mask,
                       kv_lengths=FLAGS.kv_lengths,
                       window=FLAGS.window, soft_cap=FLAGS.soft_cap, segments=FLAGS.segments,
                       dropout=FLAGS.dropout)
    return {k: v for k, v in flags_given.items() if v}


def _group(rows):
    groups = {}
    for row in rows:
        key = tuple(row.get(k) for k in ("batch", "heads", "q_len", "kv_len", "head_dim", "dtype",
                                         "causal", "features"))
        groups.setdefault(key, []).append(row)
    return list(groups.values())


if __name__ == "__main__":
    app.run(main)
