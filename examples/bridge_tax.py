"""The cost of launching through jax-triton: each forward launch timed both ways.

    python examples/bridge_tax.py --batch 16 --num_heads 16 --seq 2048 --head_dim 128

For every launch of the forward plan, with one config (the first the device keeps),
the same compiled kernel runs (a) through `jax_triton.triton_call` inside `jax.jit`,
as jt_attention runs it, and (b) through Triton's own launcher on torch tensors.
Each path runs `--calls` back-to-back launches per repeat; the median ms per call
and the difference ("bridge tax") are printed. Needs a CUDA GPU, jax-triton and torch.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from jt_attention import launch as jt_launch
from jt_attention import features, plan, tuning

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 16, "batch size")
flags.DEFINE_integer("num_heads", 16, "heads")
flags.DEFINE_integer("seq", 2048, "query and key length")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_bool("causal", False, "causal mask")
flags.DEFINE_integer("calls", 100, "launches per timed repeat")
flags.DEFINE_integer("repeats", 7, "timed repeats; the median is reported")


def _median_ms_per_call(run, finish):
    finish(run())  # warm: compile and first launch
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(FLAGS.calls):
            out = run()
        finish(out)
        times.append((time.perf_counter() - start) / FLAGS.calls * 1e3)
    return float(np.median(times))


def _via_jax_triton(launch, config, inputs):
    import jax_triton

    meta = {**launch.metaparams, **config.kwargs}
    out_types = [jax.ShapeDtypeStruct(b.shape, b.dtype) for b in launch.outputs]
    keyword = jt_launch._out_keyword(jax_triton.triton_call)
    arrays = [x for x in inputs if not isinstance(x, int)]

    def kernel_call(*arrays):  # ints (a chunk's first head) stay Python scalars
        remaining = iter(arrays)
        arguments = [x if isinstance(x, int) else next(remaining) for x in inputs]
        return jax_triton.triton_call(
            *arguments, kernel=launch.kernel, grid=launch.grid(meta),
            num_warps=config.num_warps, num_stages=config.num_stages,
            **{keyword: out_types}, **meta)

    call = jax.jit(kernel_call)
    ms = _median_ms_per_call(lambda: call(*arrays), jax.block_until_ready)
    return ms, call(*arrays)


def _via_triton(launch, config, inputs):
    import torch

    meta = {**launch.metaparams, **config.kwargs}
    outs = [torch.empty(b.shape, dtype=getattr(torch, np.dtype(b.dtype).name), device="cuda")
            for b in launch.outputs]
    grid = launch.grid(meta)
    run = lambda: launch.kernel[grid](*inputs, *outs, num_warps=config.num_warps,
                                      num_stages=config.num_stages, **meta)
    return _median_ms_per_call(run, lambda _: torch.cuda.synchronize()), outs


def main(argv):
    del argv
    problem = plan.Problem(FLAGS.batch, FLAGS.seq, FLAGS.seq, FLAGS.num_heads, FLAGS.num_heads,
                           FLAGS.head_dim, np.dtype(np.float16), FLAGS.head_dim ** -0.5,
                           FLAGS.causal)
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (FLAGS.batch, FLAGS.seq, FLAGS.num_heads, FLAGS.head_dim)
    buffers = {name: jax.random.normal(key, shape, jnp.float16)
               for name, key in zip("qkv", keys)}
    print(f"device: {jax.devices()[0].device_kind}; shape {shape}, causal={FLAGS.causal}")
    launches = plan.forward_plan(problem)
    buffers.update(features.no_operands())
    configs = [tuning.fitting_configs(l.kernel, jt_launch.compute_capability(),
                                      problem.footprint)[0] for l in launches]
    # Triton's launcher first: once jax-triton has compiled in this process, Triton's own
    # launcher failed on the H100 machine ("Could not create or locate cache dir").
    import torch

    triton_ms = _time_plan(_via_triton, launches, configs, _torch_buffers(buffers),
                           lambda dtype: torch.from_dlpack(_unwritten(dtype)))
    jax_ms = _time_plan(_via_jax_triton, launches, configs, buffers)
    for launch, config, ours, theirs in zip(launches, configs, jax_ms, triton_ms):
        print(f"{launch.kernel.fn.__name__:26s} {str(config.kwargs):42s} jax-triton "
              f"{ours:.3f} ms  triton launcher {theirs:.3f} ms  "
              f"bridge tax {100 * (ours / theirs - 1):+.1f}%")


def _torch_buffers(buffers):
    import torch

    return {name: torch.from_dlpack(x) for name, x in buffers.items()}


def _unwritten(dtype):
    return jnp.zeros((1,), dtype)


def _time_plan(via, launches, configs, buffers, unwritten=_unwritten):
    """ms per call of each launch through `via`; each launch feeds on the earlier outputs
    (outputs a launch would update in place come out new: the timing is the same)."""
    times = []
    for launch, config in zip(launches, configs):
        ms, outputs = via(launch, config, launch.arguments(buffers, unwritten))
        buffers.update(zip((b.name for b in launch.outputs), outputs))
        times.append(ms)
    return times


if __name__ == "__main__":
    app.run(main)
