"""Test setup, before any test module imports jax or jt_attention.

- Triton's interpreter on machines without a CUDA GPU: Triton picks it as each
  @triton.jit decorates, so TRITON_INTERPRET must be set before the kernels import.
- 8 simulated CPU devices (XLA reads the flag when its CPU backend starts), for the
  sharding and ring-attention tests; single-device tests run on the first.
"""

import os

SIMULATED_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={SIMULATED_DEVICES}")


def _has_cuda_gpu():
    import jax

    return any(getattr(d, "compute_capability", None) for d in jax.devices())


if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if _has_cuda_gpu() else "1"
