"""Test setup, before any test module imports jax or jt_attention.

- Triton's interpreter on machines without a CUDA GPU: Triton picks it as each
  @triton.jit decorates, so TRITON_INTERPRET must be set before the kernels import.
- 8 simulated CPU devices (XLA reads the flag when its CPU backend starts), for the
  sharding and ring-attention tests; single-device tests run on the first.
- Triton's interpreter checks every 32-bit integer add, subtract and multiply for
  overflow, which took a third of the interpreted tests' time. Only tests marked
  `int_overflow_checks` keep the check: the random shapes, the wide-indexing tests and
  each kernel family's "everything" case in test_features.py. The package's own
  interpreter path (implementation='interpret') keeps Triton's default.
"""

import dataclasses
import os

import pytest

SIMULATED_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={SIMULATED_DEVICES}")


def _has_cuda_gpu():
    import jax

    return any(getattr(d, "compute_capability", None) for d in jax.devices())


if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if _has_cuda_gpu() else "1"


@pytest.fixture(autouse=True)
def _interpreter_overflow_checks(request):
    if os.environ["TRITON_INTERPRET"] != "1":
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    default = builder.options
    checked = request.node.get_closest_marker("int_overflow_checks") is not None
    builder.options = dataclasses.replace(default, sanitize_overflow=checked)
    yield
    builder.options = default
