"""The example apps still run and check themselves: the demo (output and gradients against
fp32) and a tiny training run (the loss falls and follows jax.nn's on the same seed)."""

import os
import pathlib
import subprocess
import sys

from helpers import kernel_implementation

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _run(script, *flags):
    implementation = kernel_implementation()
    env = {**os.environ, "TRITON_INTERPRET": "1" if implementation == "interpret" else "0"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script),
                             f"--implementation={implementation}", *flags],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_attention_demo():
    """The flash kernels (every path runs elsewhere)."""
    out = _run("attention_demo.py", "--seq=40", "--head_dim=64")
    assert f"path: {kernel_implementation()}" in out
    assert "gradients (dq, dk, dv)" in out


def test_train_lm_tiny():
    """2 layers of grouped-query attention with a sliding window, 24 steps: the loss falls,
    and jt's curve stays within bf16 noise of jax.nn's xla on the same seed and batches."""
    out = _run("train_lm.py", "--layers=2", "--d_model=32", "--heads=2", "--kv_heads=1",
               "--head_dim=16", "--seq=32", "--batch=4", "--steps=24", "--learning_rate=1e-2",
               "--window=8", "--compare=xla")
    assert "ok jax.nn xla vs jt" in out, out[-2000:]


def test_benchmark_runs_here():
    """On a CPU jt runs interpreted; the row must carry a finite error, not a reason."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if kernel_implementation() == "interpret"
           else "0"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "benchmark.py"), "--batch=1", "--num_heads=2",
         "--q_len=40", "--head_dim=32", "--dtype=float32", "--impls=jt,unfused",
         "--repeats=1", "--min_repeat_ms=1", "--mode=fwd_bwd"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    jt_row = next(line for line in result.stdout.splitlines()
                  if line.startswith("B=1") and " jt " in line)
    assert "err" in jt_row and "[" not in jt_row and "nan" not in jt_row, jt_row


def test_benchmark_times_a_row_whose_reference_fails():
    """Where the fp32 reference cannot run (out of memory at long sequences), the row is
    still timed: no error figure, and ok only if the results are finite."""
    code = "; ".join([
        "import sys", f"sys.path.insert(0, {str(EXAMPLES)!r})", "import benchmark as b",
        "b.FLAGS(['benchmark', '--repeats=1', '--min_repeat_ms=1'])",
        "b._reference = lambda *args: (_ for _ in ()).throw(MemoryError('no room'))",
        "row = b.benchmark_shape(1, 2, 2, 16, 16, 16, 'float32', False, ['unfused'], 'fwd')[0]",
        "print('ROW', row['ok'], row['rel_err'], row['ms'] > 0)"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no fp32 reference (MemoryError)" in result.stdout
    assert "ROW True nan True" in result.stdout, result.stdout[-2000:]


def test_benchmark_rejects_unknown_impls_at_once():
    result = subprocess.run([sys.executable, str(EXAMPLES / "benchmark.py"), "--impls=jt,foo"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--impls: unknown ['foo']" in result.stderr


def test_first_call_times_new_and_second_processes():
    """jt in two fresh processes (an empty compile cache, then the one the first filled) and
    a peer in one; each line a first-call time, none failed."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "first_call.py"), "--batch=1", "--num_heads=2",
         "--q_len=40", "--head_dim=32", "--dtype=float32", "--impls=jt,xla",
         "--mode=fwd_bwd"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.strip() for line in result.stdout.splitlines()]
    for name in ("jt (new shape)", "jt (second process)", "xla"):
        line = next(line for line in lines if line.startswith(name + " "))
        assert "first call" in line and "failed" not in line, result.stdout


def test_info_names_the_kernels():
    result = subprocess.run([sys.executable, "-m", "jt_attention.info",
                             "--shape=1,1,4096,32,8,128"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "jax-triton" in result.stdout and "_split_kv_kernel:" in result.stdout
    assert "memory access: " in result.stdout  # pointer loads or TMA, and why
