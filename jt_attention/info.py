"""What jt_attention would do here: `python -m jt_attention.info [--shape B,T,S,N,K,D]`.

Prints the versions of the stack, the device, the implementation a call takes by
default and why, the kernels a problem of the given shape launches (forward,
forward under jax.grad, backward), and for each kernel the autotune configs that
fit this device's shared memory.
"""

import argparse
import importlib.metadata
import platform

import jax
import numpy as np

from jt_attention import plan, tuning
from jt_attention.attention import _has_cuda_gpu

PACKAGES = ("jax", "jaxlib", "jax-triton", "triton", "numpy", "flax", "torch")
H100_COMPUTE_CAPABILITY = "9.0"  # what the configs are listed for without a GPU


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _describe_device():
    if _has_cuda_gpu():
        device = next(d for d in jax.devices() if getattr(d, "compute_capability", None))
        print(f"device: {device.device_kind}, compute capability {device.compute_capability}, "
              f"{getattr(device, 'core_count', '?')} SMs")
        print("default implementation: 'triton' (a CUDA GPU is present)")
        return str(device.compute_capability), getattr(device, "core_count", 0)
    print(f"device: {jax.devices()[0].device_kind} (no CUDA GPU)")
    print("default implementation: 'xla' (pure jnp): the Triton kernels need a CUDA GPU; "
          "implementation='interpret' runs them in Triton's CPU interpreter "
          "(TRITON_INTERPRET=1 before triton is imported)")
    print(f"configs below: those an H100 (sm_{H100_COMPUTE_CAPABILITY.replace('.', '')}) "
          "would try")
    return H100_COMPUTE_CAPABILITY, 132


def _describe_plan(problem, compute_capability, num_sms):
    launches = {"forward": plan.forward_plan(problem, num_sms=num_sms),
                "forward under jax.grad": plan.forward_plan(problem, True, num_sms=num_sms),
                "backward": plan.backward_plan(problem, num_sms)}
    for stage, stage_launches in launches.items():
        print(f"{stage}:")
        for launch in stage_launches:
            configs = tuning.candidate_configs(launch.kernel, compute_capability,
                                               problem.footprint, launch.has_persistent_grid)
            print(f"  {launch.kernel.fn.__name__}: "
                  + "; ".join(map(_config_text, configs)))


def _config_text(config):
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()),
                     f"warps={config.num_warps}", f"stages={config.num_stages}"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,2048,2048,16,16,128",
                        help="batch,q_len,kv_len,num_heads,num_kv_heads,head_dim")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()}; "
          + "; ".join(f"{p} {_version(p)}" for p in PACKAGES))
    compute_capability, num_sms = _describe_device()
    print(f"shared memory per block: {tuning.shared_memory_limit(compute_capability)} bytes")
    batch, seq_q, seq_k, heads, kv_heads, head_dim = map(int, args.shape.split(","))
    problem = plan.Problem(batch, seq_q, seq_k, heads, kv_heads, head_dim,
                           np.dtype(jax.numpy.dtype(args.dtype)), head_dim ** -0.5, args.causal)
    kernel = "flash" if problem.uses_flash_kernel else "two-pass (head dim above the flash limit)"
    print(f"problem {args.shape} {args.dtype}{' causal' if args.causal else ''}: {kernel} kernels")
    problem = plan.with_tma(problem, _describe_tma(problem))
    _describe_plan(problem, compute_capability, num_sms)


def _describe_tma(problem):
    """Prints whether the flash kernels take their TMA variant here, and why; returns it."""
    if not problem.tma_eligible:
        print("memory access: pointer loads (TMA needs the flash kernels and rows of a "
              "multiple of 16 bytes)")
        return False
    if not _has_cuda_gpu():
        print("memory access: pointer loads here; TMA tensor descriptors on an H100 with "
              "jax-triton >= 0.4 (Triton >= 3.7) and JT_ATTENTION_TMA=1")
        return False
    from jt_attention import launch

    supported = launch.tma_supported()
    print("memory access: " + ("TMA tensor descriptors (sm_90, jax-triton >= 0.4)" if supported
                               else "pointer loads (TMA, opt-in and no faster so far, needs "
                               "JT_ATTENTION_TMA=1, sm_90 and jax-triton >= 0.4)"))
    return supported


if __name__ == "__main__":
    main()
