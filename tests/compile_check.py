"""Compiles every shipped config of every forward and backward kernel for a GPU, without one.

Run as a script (tests/test_compile.py does, in a process without TRITON_INTERPRET):
prints one JSON line per compile with the compiler's shared memory, the estimate
that tuning.py prunes by, and the device limit.
"""

import dataclasses
import json
import sys

import jax.numpy as jnp
import numpy as np
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from jt_attention import plan, tuning
from jt_attention.features import Features
from helpers import every_launch  # this script runs from tests/

TARGETS = {"8.9": 89, "9.0": 90}
POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "bool": "*i1",
                 "int32": "*i32"}
# (dtype, head_dim, causal, seq_q, seq_k, features): each kernel, each dtype, every side
# of the dispatch (flash, split-KV for decoding shapes, two-pass with the forward's
# probabilities kept or recomputed), and each kernel with every feature operand at
# once (EVERY_FEATURE), which adds their loads, predicates and bias-gradient stores.
PROBLEMS = [("float16", 64, True, 300, 257, False), ("bfloat16", 256, False, 300, 257, True),
            ("float32", 64, True, 300, 257, True), ("float16", 1024, True, 300, 257, True),
            ("bfloat16", 520, False, 300, 257, False), ("float32", 72, False, 300, 257, True),
            ("float16", 256, False, 1, 4096, True), ("float32", 64, True, 16, 2048, False),
            ("bfloat16", 1024, False, 300, 700, True),  # kept, rows past the whole-row limit
            ("float16", 264, True, 300, 300, True),  # recomputed P (kv_len > head_dim)
            ("float16", 1024, False, 100, 700, False),  # dK, dV: one query block per group head
            ("bfloat16", 512, False, 256, 512, False),  # persistent GEMM grids
            ("bfloat16", 64, False, 1, 4096, False),
            ("float32", 64, False, 100, 100, False)]  # two query blocks: the key grads' group loop
# Problems that are there for one kernel compile only its launches (the others add
# nothing the rest of PROBLEMS does not cover, at 10-15 s of this script's time).
ONLY = {("float32", 64, False, 100, 100, False): "_flash_key_grads_kernel"}


def every_feature(problem):
    """problem with a bias (and its gradient), a mask, spans, segment ids, a window, a
    soft-cap and dropout. No soft-cap or dropout where the forward keeps P: they would
    stop it keeping P, and that path must compile with the rest."""
    b, n, t, s = problem.batch, problem.num_heads, problem.seq_q, problem.seq_k
    recomputed = problem.seq_k > problem.head_dim
    return dataclasses.replace(problem, features=Features(
        window=(128, 64), soft_cap=30.0 if recomputed else 0.0, bias=(1, n, t, s),
        bias_dtype=np.dtype(np.float32), mask=(b, 1, t, s), segments=True, spans=(b, n),
        bias_grad=True, dropout_rate=0.1 if recomputed else 0.0))
# FEATURE_CONFIGS: every config compiles for both targets in the plain problems; with
# every feature operand only the one with the most shared memory does, for sm_90. The
# features add loads, predicates and registers but little shared memory (the risk on
# sm_89's 99 KB), and compiling each config again with them took most of this
# script's time (Philox alone doubles a compile).
H100_SMS = 132  # persistent grids are compiled for this many programs


def _buffer_dtypes(problem, launches):
    """Every buffer's dtype: inputs, feature operands and the launches' outputs."""
    dtypes = {name: problem.dtype for name in ("q", "k", "v", "dout")}
    dtypes.update(dlse=np.dtype(np.float32), bias=problem.features.bias_dtype,
                  mask=np.dtype(bool), query_segments=np.dtype(np.int32),
                  key_segments=np.dtype(np.int32), key_spans=np.dtype(np.int32),
                  query_spans=np.dtype(np.int32), dropout_seeds=np.dtype(np.int32))
    dtypes.update((b.name, b.dtype) for l in launches for b in l.outputs)
    return dtypes


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


def _same_code(launch, buffer_dtypes, config, compute_capability):
    """What decides a compile: launches that differ only in their output scale (dK and
    dV, O = P.V and dQ: same shapes, same strides) compile to the same code, once."""
    metaparams = {k: v for k, v in launch.metaparams.items() if k != "OUT_SCALE"}
    arguments = [x if isinstance(x, int) else buffer_dtypes.get(getattr(x, "name", x), x)
                 for x in list(launch.inputs) + list(launch.outputs)]
    return (launch.kernel, compute_capability, str(config), str(sorted(metaparams.items())),
            str([np.dtype(a).name if not isinstance(a, (int, plan.Unwritten)) else str(a)
                 for a in arguments]))


def _skip_assembly(backend=None, stages=None, options=None, language=None, capability=None):
    """Triton's stage hook: the cubin stage (ptxas) returns nothing. Shared memory is
    fixed before it (the LLVM stage) and the matrix instructions show in the PTX, so the
    checks need no assembly, which took 40% of this script's time. Called with no
    arguments, it names itself for Triton's cache key."""
    if stages is None:
        return "jt_attention_skip_assembly", "1"
    stages["cubin"] = lambda src, metadata: b""


def _variants(problem):
    """(problem, targets, nearest_only) to compile: the problem on both targets (with
    every feature: sm_90 only, the config nearest the limit: see FEATURE_CONFIGS), and
    where the flash kernels may use TMA, their TMA variant for sm_90 (nearest only)."""
    features = problem.features.bias != ()
    yield problem, ("9.0",) if features else tuple(TARGETS), features
    if problem.tma_eligible:
        yield plan.with_tma(problem, True), ("9.0",), True


def main():
    triton.knobs.runtime.add_stages_inspection_hook = _skip_assembly
    compiled_before = set()
    for entry in PROBLEMS:
        dtype, head_dim, causal, seq_q, seq_k, features = entry
        problem = plan.Problem(2, seq_q, seq_k, 4, 2, head_dim, jnp.dtype(dtype), 0.125, causal)
        if features:
            problem = every_feature(problem)
        for variant, targets, nearest_only in _variants(problem):
            launches = every_launch(variant, H100_SMS)
            buffer_dtypes = _buffer_dtypes(variant, launches)
            if variant.tma:  # the launches that take it
                launches = [launch for launch in launches if "TMA" in launch.metaparams]
            if entry in ONLY:
                launches = [launch for launch in launches
                            if launch.kernel.fn.__name__ == ONLY[entry]]
            for cc in targets:
                for launch in launches:
                    _compile_configs(launch, variant, buffer_dtypes, cc, nearest_only,
                                     compiled_before, features)


def _compile_configs(launch, problem, buffer_dtypes, cc, nearest_only, compiled_before,
                     features):
    estimate = tuning.KERNEL_TUNING[launch.kernel].estimate
    configs = tuning.fitting_configs(launch.kernel, cc, problem.footprint,
                                     launch.has_persistent_grid)
    if nearest_only:
        configs = [max(configs, key=lambda c: estimate(c, problem.footprint))]
    for config in configs:
        key = _same_code(launch, buffer_dtypes, config, cc)
        if key in compiled_before:
            continue
        compiled_before.add(key)
        compiled = compile_launch(launch, buffer_dtypes, config, cc)
        ptx = compiled.asm["ptx"]
        print(json.dumps(dict(
            kernel=launch.kernel.fn.__name__, dtype=str(problem.dtype),
            head_dim=problem.head_dim, features=features, tma=problem.tma, target=cc,
            config=str(config), shared=compiled.metadata.shared,
            estimate=estimate(config, problem.footprint), limit=tuning.shared_memory_limit(cc),
            tensor_cores=("wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"),
            bulk_tensor_copies="cp.async.bulk.tensor" in ptx)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
