"""Compiles every shipped config of every forward and backward kernel for a GPU, without one.

Run as a script (tests/test_compile.py does, in a process without TRITON_INTERPRET):
prints one JSON line per compile with the compiler's shared memory, the estimate
that tuning.py prunes by, and the device limit.
"""

import json
import sys

import jax.numpy as jnp
import numpy as np
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from jt_attention import plan, tuning
from helpers import every_launch  # this script runs from tests/

TARGETS = {"8.9": 89, "9.0": 90}
POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
# (dtype, head_dim, causal, seq_q, seq_k): each kernel, each dtype, every side of the
# dispatch (flash, split-KV for decoding shapes, two-pass with the forward's
# probabilities kept or recomputed).
PROBLEMS = [("float16", 64, True, 300, 257), ("bfloat16", 256, False, 300, 257),
            ("float32", 64, True, 300, 257), ("float16", 1024, True, 300, 257),
            ("bfloat16", 520, False, 300, 257), ("float32", 72, False, 300, 257),
            ("float16", 256, False, 1, 4096), ("float32", 64, True, 16, 2048),
            ("bfloat16", 1024, False, 300, 700),  # kept, rows past the whole-row limit
            ("float16", 264, True, 300, 300),  # recomputed probabilities (kv_len > head_dim)
            ("float16", 1024, False, 100, 700),  # dK, dV: one query block per KV group head
            ("bfloat16", 512, False, 256, 512)]  # persistent GEMM grids
H100_SMS = 132  # persistent grids are compiled for this many programs


def _argument_type(argument, buffer_dtypes):
    """Triton's type of a launch input or output (plan.Launch.inputs)."""
    if isinstance(argument, int):
        return "i32"  # a chunk's first head
    dtype = argument.dtype if isinstance(argument, plan.Unwritten) else buffer_dtypes[argument]
    return POINTER_TYPES[np.dtype(dtype).name]


def compile_launch(launch, buffer_dtypes, config, compute_capability):
    arguments = list(launch.inputs) + [b.name for b in launch.outputs]
    constexprs = {**launch.metaparams, **config.kwargs}
    signature, attrs = {}, {}
    for i, arg in enumerate(launch.kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        else:
            signature[arg] = _argument_type(arguments[i], buffer_dtypes)
            if signature[arg].startswith("*"):  # 16-byte aligned, as jax-triton declares
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(launch.kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", TARGETS[compute_capability], 32),
                          options={"num_warps": config.num_warps,
                                   "num_stages": config.num_stages})


def main():
    for dtype, head_dim, causal, seq_q, seq_k in PROBLEMS:
        problem = plan.Problem(2, seq_q, seq_k, 4, 2, head_dim, jnp.dtype(dtype), 0.125, causal)
        launches = every_launch(problem, H100_SMS)
        buffer_dtypes = {name: problem.dtype for name in ("q", "k", "v", "dout")}
        buffer_dtypes["dlse"] = np.dtype(np.float32)
        buffer_dtypes.update((b.name, b.dtype) for l in launches for b in l.outputs)
        for cc in TARGETS:
            for launch in launches:
                estimate = tuning.KERNEL_TUNING[launch.kernel].shared_bytes
                for config in tuning.fitting_configs(launch.kernel, cc, problem.itemsize,
                                                     problem.block_d,
                                                     launch.has_persistent_grid):
                    compiled = compile_launch(launch, buffer_dtypes, config, cc)
                    print(json.dumps(dict(
                        kernel=launch.kernel.fn.__name__, dtype=dtype, head_dim=head_dim,
                        target=cc, config=str(config), shared=compiled.metadata.shared,
                        estimate=estimate(config, problem.block_d, problem.itemsize),
                        limit=tuning.shared_memory_limit(cc),
                        tensor_cores=("wgmma" if "wgmma" in compiled.asm["ptx"] else
                                      "mma" if "mma.sync" in compiled.asm["ptx"] else "none"))),
                          flush=True)


if __name__ == "__main__":
    sys.exit(main())
