"""Launches the forward and backward plans on a CUDA GPU through `jax_triton.triton_call`.

jax_triton is imported here, lazily: its import fails on a JAX without CUDA.
Every launch is autotuned over the configs that fit this device (`tuning.py`),
with the grid computed from the winning config's block sizes.
"""

import functools
import inspect
import os
import sys

import jax
import jax.numpy as jnp
import triton

from jt_attention import compile_cache, plan, tuning
from jt_attention.kernels import probs_matmul, tiles, two_pass_forward
from jt_attention.log import log_once, logger
from jt_attention.plan import backward_outputs, backward_plan, forward_outputs, forward_plan


@functools.cache
def compute_capability():
    return jax.devices("gpu")[0].compute_capability


@functools.cache
def multiprocessor_count():
    """SMs of the GPU, for the persistent grids; 0 (one program per tile) if jaxlib
    does not report it."""
    return getattr(jax.devices("gpu")[0], "core_count", 0)


@functools.cache
def tma_supported():
    """Whether the flash kernels address memory through TMA tensor descriptors: asked for
    (JT_ATTENTION_TMA=1), a Hopper GPU (sm_90), and jax-triton 0.4 or later (with Triton
    3.7 or later), whose launcher gives kernels the global scratch that descriptors built
    on the device are written to (0.3.1 passes a null pointer, and they fault).

    Opt-in: on the H100 with Triton 3.7.1 the TMA variant was no faster than the pointer
    loads at any config (WORKSPACE_NOTES.md, "TMA configs against pointer configs")."""
    import jax_triton

    return (os.environ.get(plan.TMA_ENVIRONMENT) == "1" and compute_capability() == "9.0"
            and _is_jax_triton_04(jax_triton.triton_call))


@functools.cache
def _is_jax_triton_04(triton_call):
    """jax-triton 0.4 renamed out_shape= to out_type= (0.3.1 knows only out_shape=)."""
    return "out_type" in inspect.signature(triton_call).parameters


def _unwritten(dtype):
    return jnp.zeros((1,), dtype)


def _in_place(launch, buffers, jax_triton_04):
    """(keyword arguments, input_output_aliases) for the outputs the launch updates in
    place. The kernels take (inputs..., outputs..., constexprs...).

    jax-triton 0.3.1: every output keeps its pointer parameter (jaxlib passes the
    input's buffer there); the alias maps the array input's index (ints are not
    arrays) to the output's. 0.4: an aliased output has no pointer of its own, the
    kernel writes through an operand; so the output's parameter is bound, by name, to
    the buffer, and the alias maps that operand's index (every non-constexpr argument
    before it counts, ints too) to the output's."""
    outputs = [b.name for b in launch.outputs]
    if not jax_triton_04:
        arrays = [x for x in launch.inputs if not isinstance(x, int)]
        return {}, {arrays.index(name): outputs.index(name) for name in launch.in_place}
    output_params = launch.kernel.arg_names[len(launch.inputs):]
    keywords, aliases = {}, {}
    for index, name in enumerate(outputs):
        if name in launch.in_place:
            aliases[len(launch.inputs) + len(keywords)] = index
            keywords[output_params[index]] = buffers[name]
    return keywords, aliases


def _after(arguments, previous, buffers):
    """`arguments` made to wait for the `previous` buffers: both pass one optimization
    barrier, and later launches read the previous buffers from it too (each buffer
    then has one reader before its next in-place update, so XLA adds no copy)."""
    arrays = [i for i, x in enumerate(arguments) if not isinstance(x, int)]
    held, outputs = jax.lax.optimization_barrier(
        ([arguments[i] for i in arrays], [buffers[name] for name in previous]))
    buffers.update(zip(previous, outputs))
    arguments = list(arguments)
    for i, array in zip(arrays, held):
        arguments[i] = array
    return arguments


class _RefuseTorch:
    """A sys.meta_path finder under which `import torch` fails at once."""

    def find_spec(self, name, path=None, target=None):
        del path, target
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"jt_attention: {name} hidden for a moment", name=name)
        return None


@functools.cache
def _specializer_without_torch():
    """Starts Triton's native argument specializer without importing torch.

    In Triton 3.6 the specializer's first call imports torch, only to give torch.Tensor
    a fast path (other tensors, torch's among them, take a path by attribute with the
    same result; Triton 3.9 no longer imports it). jax-triton calls it at every
    lowering, so where torch is installed each process's first jt call paid for
    importing torch: about 3 of the 3.8 s of a warm-cache first lowering on the H100
    (WORKSPACE_NOTES.md, "First call: the torch import").
    Started once with that import refused, it takes ~0.1 s. A process that has imported
    torch already skips this; an `import torch` in another thread during that 0.1 s
    would fail."""
    if "torch" in sys.modules:
        return
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # a Triton without it: nothing imports torch there
        return
    refuse = _RefuseTorch()
    sys.meta_path.insert(0, refuse)
    try:
        native_specialize_impl(None, 1, False, True, True)
    except Exception as error:  # noqa: BLE001 - a Triton whose start differs: it imports later
        logger.debug("jt_attention: Triton's specializer did not start without torch: %s", error)
    finally:
        sys.meta_path.remove(refuse)


def _drains_register_dots(launch):
    """Whether this launch's loops wait for each step's dot on this Triton
    (tiles.drained: before 3.9, a wgmma register hazard)."""
    return tiles.REGISTER_A_RACES.value and launch.kernel in (
        probs_matmul._probs_matmul_kernel, two_pass_forward._weighted_values_kernel,
        two_pass_forward._weighted_values_keeping_probs_kernel)


def _run_launches(launches, buffers, problem):
    """Launches each kernel in turn; `buffers` (name -> array) gains their outputs."""
    import jax_triton

    compile_cache.install()
    _specializer_without_torch()
    previous = ()
    for launch in launches:
        if _drains_register_dots(launch):
            log_once(f"jt_attention: Triton {triton.__version__} (before 3.9) can overwrite a "
                     "matrix operand in registers while a Hopper wgmma reads it, so the "
                     "two-pass kernels' masked and P.V loops finish each step's matrix "
                     "multiply before the next step (slower; Triton 3.9 or later overlaps them)")
        kernel = tuning.autotuned(launch.kernel, compute_capability(), problem.footprint,
                                  launch.has_persistent_grid)
        out_types = [jax.ShapeDtypeStruct(b.shape, b.dtype) for b in launch.outputs]
        arguments = launch.arguments(buffers, _unwritten)
        if launch.after_previous:
            arguments = _after(arguments, previous, buffers)
        zeroed = {"zeroed_outputs": launch.zeroed_outputs} if launch.zeroed_outputs else {}
        jax_triton_04 = _is_jax_triton_04(jax_triton.triton_call)
        in_place, aliases = _in_place(launch, buffers, jax_triton_04)
        outputs = jax_triton.triton_call(
            *arguments,
            kernel=kernel,
            grid=launch.grid,
            input_output_aliases=aliases,
            **{"out_type" if jax_triton_04 else "out_shape": out_types},
            **in_place,
            **zeroed,
            **launch.metaparams)
        previous = tuple(b.name for b in launch.outputs)
        buffers.update(zip(previous, outputs))
    return buffers


def triton_forward(inputs, problem, for_backward):
    """(out, lse [B, H, Sq] fp32, *kept) on the GPU from the named inputs (q, k, v and
    the feature operands), kept being plan.kept_buffers(problem) if `for_backward`, else
    none; traceable, no host synchronisation."""
    problem = plan.with_tma(problem, tma_supported())
    launches = forward_plan(problem, for_backward, num_sms=multiprocessor_count())
    buffers = _run_launches(launches, dict(inputs), problem)
    return tuple(buffers[name] for name in forward_outputs(problem, for_backward))


def triton_backward(inputs, problem):
    """plan.backward_outputs(problem) (dq, dk, dv and maybe dbias) from the named
    plan.backward_inputs(problem): the forward's residuals and the cotangents."""
    problem = plan.with_tma(problem, tma_supported())
    buffers = _run_launches(backward_plan(problem, multiprocessor_count()), dict(inputs),
                            problem)
    return tuple(buffers[name] for name in backward_outputs(problem))
