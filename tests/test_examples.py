"""The example apps still run: the demo checks its own output and gradients."""

import os
import pathlib
import subprocess
import sys

import pytest

from helpers import kernel_implementation

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("head_dim", [64])  # the flash kernels (every path runs elsewhere)
def test_attention_demo(head_dim):
    implementation = kernel_implementation()
    env = {**os.environ, "TRITON_INTERPRET": "1" if implementation == "interpret" else "0"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "attention_demo.py"), f"--implementation={implementation}",
         "--seq=40", f"--head_dim={head_dim}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"path: {implementation}" in result.stdout
    assert "gradients (dq, dk, dv)" in result.stdout
