"""Launches the forward plan on a CUDA GPU through `jax_triton.triton_call`.

jax_triton is imported here, lazily: its import fails on a JAX without CUDA.
Every launch is autotuned over the configs that fit this device (`tuning.py`),
with the grid computed from the winning config's block sizes.
"""

import functools

import jax

from jt_attention import tuning
from jt_attention.plan import forward_plan


@functools.cache
def compute_capability():
    return jax.devices("gpu")[0].compute_capability


def triton_forward(q, k, v, problem):
    """(out, lse [B, H, Sq] fp32) on the GPU; traceable, no host synchronisation."""
    import jax_triton

    buffers = {"q": q, "k": k, "v": v}
    for launch in forward_plan(problem):
        kernel = tuning.autotuned(launch.kernel, compute_capability(), problem.itemsize,
                                  problem.block_d)
        outputs = jax_triton.triton_call(
            *(buffers[name] for name in launch.inputs),
            kernel=kernel,
            out_shape=[jax.ShapeDtypeStruct(b.shape, b.dtype) for b in launch.outputs],
            grid=launch.grid,
            **launch.metaparams)
        buffers.update(zip((b.name for b in launch.outputs), outputs))
    return buffers["out"], buffers["lse"]
