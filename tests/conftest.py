"""Test setup: Triton's interpreter on machines without a CUDA GPU.

The interpreter must be chosen before `triton` is first imported (GUIDE.md 3f),
so this runs before any test module imports jt_attention.
"""

import os


def _has_cuda_gpu():
    import jax

    return any(getattr(d, "compute_capability", None) for d in jax.devices())


if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if _has_cuda_gpu() else "1"
