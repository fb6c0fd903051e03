"""Runs the forward and backward plans in Triton's CPU interpreter, inside `jax.pure_callback`.

Triton picks the interpreter when a function is decorated, for its own standard
library as much as for these kernels, so this path needs TRITON_INTERPRET=1 in
the environment before `triton` is first imported (the test suite's conftest sets
it on machines without a GPU). The interpreter reads and writes through torch CPU
tensors, so it also needs torch (the `test` extra).

Block sizes here are small on purpose: the tests' short sequences then still
cross several blocks and score tiles, so every masked and unmasked path runs.
"""

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import triton

from jt_attention.plan import (TMA_ENVIRONMENT, Buffer, backward_outputs, backward_plan,
                               forward_outputs, forward_plan, with_tma)

INTERPRETER_SCORE_TILE_N = 32
INTERPRETER_BLOCKS = {
    "_flash_forward_kernel": dict(BLOCK_M=32, BLOCK_N=16),
    "_split_kv_kernel": dict(BLOCK_M=16, BLOCK_N=32),
    "_split_kv_combine_kernel": dict(BLOCK_M=16),
    "_score_tiles_kernel": dict(BLOCK_M=32, BLOCK_K=32),
    "_row_softmax_kernel": dict(BLOCK_M=16, BLOCK_K=64),
    "_weighted_values_kernel": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=64),
    "_weighted_values_keeping_probs_kernel": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=64),
    "_output_grad_dot_kernel": dict(BLOCK_M=16, BLOCK_D=64),
    "_flash_key_grads_kernel": dict(BLOCK_M=16, BLOCK_N=32),
    "_flash_query_grads_kernel": dict(BLOCK_M=32, BLOCK_N=16),
    "_score_grads_kernel": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64),
    "_dscores_from_probs_kernel": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64),
    "_dscores_whole_rows_kernel": dict(BLOCK_M=16, BLOCK_K=64),
    "_probs_matmul_kernel": dict(BLOCK_R=32, BLOCK_C=16, BLOCK_D=64, PERSISTENT=1),
}
# Persistent grids (the GEMMs) run this many programs, so that each walks several tiles.
INTERPRETER_SMS = 3


def interpreter_enabled():
    return bool(triton.knobs.runtime.interpret)


def _widen_bf16_dot_operands():
    """Triton's interpreter (3.9) keeps bf16 as raw uint16 bits and its `dot` multiplies
    those bits as integers; it widens fp8 operands but not bf16. Widen bf16 to fp32 the
    same way before its dot. Does nothing once the interpreter handles bf16 itself."""
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    original = builder.create_dot
    if getattr(original, "widens_bf16", False):
        return

    def widened(handle):
        if handle.dtype != triton.language.bfloat16 or handle.data.dtype != np.uint16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), triton.language.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    create_dot.widens_bf16 = True
    builder.create_dot = create_dot


def _round_bf16_casts():
    """Triton's interpreter (3.9) casts fp32 to bf16 by dropping the low 16 bits, where
    the GPU rounds to nearest even (cvt.rn.bf16.f32). Truncated bf16 outputs lean toward
    zero by up to 2^-8 of their size, and a backward's rowsum(dO * O) adds that lean up
    coherently: a bias gradient came out 0.4 off where the GPU is exact to bf16 rounding.
    Round to nearest even instead. Does nothing once patched."""
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    original = builder.cast_impl
    if getattr(original, "rounds_bf16", False):
        return

    language = triton.language

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != language.float32 or dst_type.scalar != language.bfloat16:
            return original(self, src, dst_type)
        values = np.asarray(src.data, np.float32)
        bits = values.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)  # keep NaN a NaN
        return interpreter.TensorHandle(np.where(np.isnan(values), quiet_nan, rounded),
                                        dst_type.scalar)

    cast_impl.rounds_bf16 = True
    builder.cast_impl = cast_impl


def _patch_language_once_per_launch():
    """Triton's interpreter (3.9) patches triton.language again on every call of a
    @triton.jit helper from a kernel (inspect.getmembers over whole modules: about
    0.15 ms a call, half the run time of the masked kernels), though one patch per
    module and launch is enough: the patches of helper calls are never undone. Here a
    helper call patches only the first time its module is seen in a launch. Does
    nothing where the interpreter has changed."""
    from triton.runtime import interpreter

    function = getattr(interpreter, "InterpretedFunction", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if (function is None or executor is None
            or getattr(function.__call__, "patches_once", False)):
        return
    patched_modules = set()
    launch = executor.__call__

    def launch_once(self, *args, **kwargs):
        patched_modules.clear()
        return launch(self, *args, **kwargs)

    def call(self, *args, **kwargs):
        if self.fn.__module__ not in patched_modules:
            interpreter._patch_lang(self.fn)
            patched_modules.add(self.fn.__module__)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    call.patches_once = True
    executor.__call__ = launch_once
    function.__call__ = call


def _require_interpreter():
    from jt_attention.kernels.flash_forward import _flash_forward_kernel
    from triton.runtime.interpreter import InterpretedFunction

    if not interpreter_enabled():
        raise RuntimeError("implementation='interpret' runs Triton's interpreter, which must be "
                           "chosen before triton is imported: set TRITON_INTERPRET=1 in the "
                           "environment (e.g. `TRITON_INTERPRET=1 python app.py`)")
    if not isinstance(_flash_forward_kernel, InterpretedFunction):
        # Triton picks the interpreter as each @triton.jit decorates: set later, the
        # flag is seen but the kernels were already built for the GPU.
        raise RuntimeError("implementation='interpret': TRITON_INTERPRET=1 was set after "
                           "triton (or jt_attention) was imported, so the kernels were built "
                           "for the GPU. Set it in the environment before the process starts "
                           "(`TRITON_INTERPRET=1 python app.py`), or in os.environ before the "
                           "first import of triton, jax_triton or jt_attention.")
    try:
        import torch  # noqa: F401
    except ImportError as err:
        raise ImportError("implementation='interpret' drives Triton's interpreter with torch "
                          "CPU tensors: pip install 'jt_attention[test]'") from err
    _widen_bf16_dot_operands()
    _round_bf16_casts()
    _patch_language_once_per_launch()


def _to_torch(array):
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == jnp.dtype("bfloat16"):
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _to_numpy(tensor, dtype):
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.dtype("bfloat16"))
    return tensor.numpy().astype(dtype, copy=False)


def _empty_poisoned(buffer):
    """A NaN-filled output (zeros where the plan asks for them): a tile the kernels forget
    to write shows up in the result."""
    if buffer.zeroed:
        return _to_torch(np.zeros(buffer.shape, dtype=buffer.dtype))
    return _to_torch(np.full(buffer.shape, np.nan, dtype=buffer.dtype))


def _unwritten(dtype):
    return _empty_poisoned(Buffer("unwritten", (1,), dtype))


# Triton's interpreter patches triton.language module-wide for each launch, so two
# launches at once (callbacks from several devices under shard_map) break each other.
_INTERPRETER_LOCK = threading.Lock()


def run_interpreted(launches, arrays, blocks=None):
    """Runs `launches` on numpy `arrays` (name -> array); returns every buffer as numpy.
    One call at a time in a process (_INTERPRETER_LOCK)."""
    with _INTERPRETER_LOCK:
        return _run_interpreted(launches, arrays, blocks)


def _run_interpreted(launches, arrays, blocks):
    _require_interpreter()
    blocks = INTERPRETER_BLOCKS if blocks is None else blocks
    buffers = {name: _to_torch(array) for name, array in arrays.items()}
    dtypes = {name: array.dtype for name, array in arrays.items()}
    for launch in launches:
        # In-place outputs are their input tensors; the rest start as NaN.
        outputs = [buffers[b.name] if b.name in launch.in_place else _empty_poisoned(b)
                   for b in launch.outputs]
        metaparams = {**launch.metaparams, **blocks[launch.kernel.fn.__name__]}
        launch.kernel[launch.grid(metaparams)](
            *launch.arguments(buffers, _unwritten), *outputs, **metaparams)
        buffers.update(zip((b.name for b in launch.outputs), outputs))
        dtypes.update((b.name, b.dtype) for b in launch.outputs)
    return {name: _to_numpy(t, dtypes[name]) for name, t in buffers.items()}


def _run_in_callback(launches, inputs, names):
    """The `names` buffers that `launches` write, from the named `inputs`, computed by
    the interpreter inside a jax.pure_callback (so it works under jit)."""
    written = {b.name: b for launch in launches for b in launch.outputs}
    result_shapes = tuple(jax.ShapeDtypeStruct(written[n].shape, written[n].dtype) for n in names)
    input_names = tuple(inputs)

    def host(*arrays):
        buffers = run_interpreted(launches, dict(zip(input_names, arrays)))
        return tuple(buffers[name] for name in names)

    return jax.pure_callback(host, result_shapes, *inputs.values(), vmap_method="sequential")


def _with_tma(problem):
    """The interpreter runs the TMA variant of the flash kernels (tensor descriptors)
    only where JT_ATTENTION_TMA=1 asks, as on a Hopper GPU."""
    return with_tma(problem, os.environ.get(TMA_ENVIRONMENT) == "1")


def forward_launches(problem, for_backward):
    """The forward plan as the interpreter runs it (its score tiles and program count)."""
    return forward_plan(_with_tma(problem), for_backward,
                        score_tile_n=INTERPRETER_SCORE_TILE_N, num_sms=INTERPRETER_SMS)


def backward_launches(problem):
    return backward_plan(_with_tma(problem), INTERPRETER_SMS)


def interpret_forward(inputs, problem, for_backward):
    """(out, lse [B, H, Sq] fp32, *kept) from the interpreted kernels, given the named
    inputs (q, k, v and the feature operands), kept being plan.kept_buffers(problem) if
    `for_backward`, else none."""
    _require_interpreter()
    return _run_in_callback(forward_launches(problem, for_backward), inputs,
                            forward_outputs(problem, for_backward))


def interpret_backward(inputs, problem):
    """plan.backward_outputs(problem) from the interpreted backward kernels, given the
    named plan.backward_inputs(problem)."""
    _require_interpreter()
    return _run_in_callback(backward_launches(problem), inputs, backward_outputs(problem))
