"""Every shipped autotune config compiles for sm_89 (RTX 4090) and sm_90 (H100), no GPU needed.

Checks the compiler's shared memory against the device limit and against the
estimate that tuning.py prunes configs by (the estimate must never undercount).
"""

import collections
import itertools
import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

from jt_attention import plan, tuning
from jt_attention.kernels import flash_backward, flash_forward
from compile_check import every_feature
from helpers import every_launch


def _compiler_env(cache_dir):
    """The environment of a compiling subprocess: real kernels, not interpreted ones, with
    a cache of their own (started from the test process on the GPU machine, Triton found
    no cache dir otherwise)."""
    return {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache_dir)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = _compiler_env(tmp_path_factory.mktemp("triton_cache"))
    script = pathlib.Path(__file__).with_name("compile_check.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_and_target_compiles(compiled):
    kernels = {kernel.fn.__name__ for kernel in tuning.KERNEL_TUNING}
    seen = collections.Counter((row["kernel"], row["target"]) for row in compiled)
    assert {k for k, _ in seen} == kernels
    assert {t for _, t in seen} == {"8.9", "9.0"}


@pytest.mark.parametrize("target", ["8.9", "9.0"])
def test_shared_memory_fits_and_estimate_is_an_upper_bound(compiled, target):
    rows = [row for row in compiled if row["target"] == target]
    assert rows
    for row in rows:
        assert row["shared"] <= row["limit"], row
        assert row["shared"] <= row["estimate"], row


NO_MATMUL = {"_output_grad_dot_kernel", "_split_kv_combine_kernel"}  # row reductions
SIXTEEN_ROW_TILES = {"_split_kv_kernel"}  # decoding: wgmma needs 64-row tiles; mma it is


def test_tensor_cores_used(compiled):
    """Every matmul kernel uses mma on sm_89; on sm_90 each has wgmma configs (tiles of
    fewer than 64 rows, kept for 99 KB parts or decoding, fall back to mma there)."""
    wgmma = collections.defaultdict(bool)
    for row in compiled:
        if row["kernel"] in NO_MATMUL:
            assert row["tensor_cores"] == "none", row
        elif row["target"] == "8.9" or row["kernel"] in SIXTEEN_ROW_TILES:
            assert row["tensor_cores"] == "mma", row
        else:
            assert row["tensor_cores"] in ("wgmma", "mma"), row
            wgmma[row["kernel"]] |= row["tensor_cores"] == "wgmma"
    assert all(wgmma.values()) and wgmma, dict(wgmma)


def test_tma_variant_moves_tiles_with_bulk_tensor_copies(compiled):
    """The flash kernels' TMA variant (sm_90) loads and stores q, k, v, dO and their
    outputs with the tensor memory accelerator (cp.async.bulk.tensor); no pointer
    variant does."""
    tma = {row["kernel"] for row in compiled if row["tma"] and row["bulk_tensor_copies"]}
    assert tma == {"_flash_forward_kernel", "_flash_query_grads_kernel",
                   "_flash_key_grads_kernel"}, tma
    assert not any(row["bulk_tensor_copies"] for row in compiled if not row["tma"])
    assert all(row["target"] == "9.0" for row in compiled if row["tma"])


@pytest.mark.parametrize("compute_capability", ["8.9", "9.0"])
@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256, 512, 1024])
@pytest.mark.parametrize("seq_q,seq_k", [(100, 100), (1, 4096)])
@pytest.mark.parametrize("features", [False, True])
def test_every_problem_keeps_a_config(compute_capability, itemsize, head_dim, seq_q, seq_k,
                                      features):
    problem = plan.Problem(1, seq_q, seq_k, 2, 2, head_dim,
                           {2: "float16", 4: "float32"}[itemsize], 0.1, False)
    if features:
        problem = every_feature(problem)
    for launch in every_launch(problem):
        assert tuning.fitting_configs(launch.kernel, compute_capability, problem.footprint)


def test_every_config_is_kept_somewhere():
    """No dead config: each fits at least one supported device for some problem."""
    kept = collections.defaultdict(set)
    for cc, itemsize, head_dim, seq_q, seq_k, features in itertools.product(
            ("8.9", "9.0"), (2, 4), (16, 64, 128, 256, 1024), (1, 100, 256), (4096, 600, 512),
            (False, True)):
        problem = plan.Problem(1, seq_q, seq_k, 2, 2, head_dim,
                               {2: "float16", 4: "float32"}[itemsize], 0.1, False)
        if features:
            problem = every_feature(problem)
        for launch in every_launch(problem, num_sms=132):
            kept[launch.kernel].update(map(str, tuning.fitting_configs(
                launch.kernel, cc, problem.footprint, launch.has_persistent_grid)))
    for kernel, kernel_tuning in tuning.KERNEL_TUNING.items():
        assert kept[kernel] == set(map(str, kernel_tuning.configs)), kernel.fn.__name__


def _flash_problem(head_dim, is_causal=False):
    return plan.Problem(8, 2048, 2048, 16, 16, head_dim, "bfloat16", 0.1, is_causal)


def test_candidates_are_the_class_winners(monkeypatch):
    """A launch times the configs that won for its shape class, a subset of those that fit."""
    monkeypatch.delenv("JT_ATTENTION_AUTOTUNE", raising=False)
    for head_dim, is_causal in itertools.product((32, 64, 128, 256), (False, True)):
        problem = _flash_problem(head_dim, is_causal)
        for launch in every_launch(problem, num_sms=132):
            fitting = tuning.fitting_configs(launch.kernel, "9.0", problem.footprint)
            candidates = tuning.candidate_configs(launch.kernel, "9.0", problem.footprint)
            assert candidates and all(c in fitting for c in candidates)
            assert all(tuning.shape_class(problem.footprint) in c.tried_for for c in candidates)
    # Head dim 128, non-causal, forward + backward: 4 configs compiled and timed, not 10.
    problem = _flash_problem(128)
    launches = [*plan.forward_plan(problem, True, num_sms=132), *plan.backward_plan(problem, 132)]
    count = lambda select: sum(len(select(l.kernel, "9.0", problem.footprint)) for l in launches)
    assert (count(tuning.candidate_configs), count(tuning.fitting_configs)) == (4, 10)


def test_candidates_fall_back_to_every_fitting_config(monkeypatch):
    monkeypatch.delenv("JT_ATTENTION_AUTOTUNE", raising=False)
    # Every feature's tiles rule out the key grads' class winner: every fitting config is timed.
    key_grads = flash_backward._flash_key_grads_kernel
    footprint = every_feature(_flash_problem(128, is_causal=True)).footprint
    fitting = tuning.fitting_configs(key_grads, "9.0", footprint)
    assert len(fitting) > 1
    assert tuning.candidate_configs(key_grads, "9.0", footprint) == fitting
    # JT_ATTENTION_AUTOTUNE=all times every fitting config.
    forward = flash_forward._flash_forward_kernel
    footprint = _flash_problem(128).footprint
    assert len(tuning.candidate_configs(forward, "9.0", footprint)) == 2
    monkeypatch.setenv("JT_ATTENTION_AUTOTUNE", "all")
    assert tuning.candidate_configs(forward, "9.0", footprint) == tuning.fitting_configs(
        forward, "9.0", footprint)


def test_min_block_rows_bounds_every_config():
    """plan.Problem.wide_indexing counts row blocks with tuning.MIN_BLOCK_ROWS."""
    for kernel_tuning in tuning.KERNEL_TUNING.values():
        for config in kernel_tuning.configs:
            rows = [v for k, v in config.kwargs.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_R")]
            assert min(rows) >= tuning.MIN_BLOCK_ROWS, config


def test_wide_indexing_only_past_the_limits():
    problem = lambda b, s, h, d: plan.Problem(b, s, s, h, h, d, "float16", 0.1, False)
    assert not problem(32, 512, 32, 1024).wide_indexing            # the seed workload
    assert not problem(16, 8192, 16, 128).wide_indexing
    assert problem(8193, 128, 8, 64).wide_indexing                  # batch x heads > 65535
    assert problem(64, 8192, 32, 128).wide_indexing                 # q of 2**31 elements
    assert problem(1, 65536, 1, 512).wide_indexing                  # one head's P: 4.3e9
    assert not problem(1, 8192, 16, 512).wide_indexing              # P of 1.1e9 elements
    assert not problem(4, 8192, 32, 512).wide_indexing              # 8.6e9, in head chunks
    for launch in plan.forward_plan(problem(8193, 128, 8, 64)):
        assert len(launch.grid({"BLOCK_M": 64, "BLOCK_N": 64})) == 1
    for launch in plan.forward_plan(problem(2, 128, 8, 64)):
        assert len(launch.grid({"BLOCK_M": 64, "BLOCK_N": 64})) == 3


@pytest.mark.parametrize("version,racing", [("3.6.0", True), ("3.8.0", True),
                                            ("3.9.0", False), ("3.10.1", False)])
def test_register_operand_dots_drained_where_triton_races(version, racing, monkeypatch):
    """Triton before 3.9 can overwrite a wgmma's register operand mid-read
    (kernels/tiles.drained): there the two-pass GEMM and weighted-values launches, and
    no flash launch, wait for each step's dot and log it (launch.py)."""
    from jt_attention import launch
    from jt_attention.kernels import tiles

    monkeypatch.setattr(triton, "__version__", version)
    assert tiles._triton_before(3, 9) == racing
    monkeypatch.setattr(tiles, "REGISTER_A_RACES", triton.language.constexpr(racing))
    for head_dim, seq in ((1024, 700), (128, 700)):  # two-pass with score tiles; flash
        problem = plan.Problem(1, seq, seq, 2, 2, head_dim, "float16", 0.1, True)
        drained = {l.kernel.fn.__name__ for l in every_launch(problem)
                   if launch._drains_register_dots(l)}
        expected = ({"_probs_matmul_kernel", "_weighted_values_kernel",
                     "_weighted_values_keeping_probs_kernel"} if head_dim > 256 else set())
        assert drained == (expected if racing else set()), (head_dim, drained)


_WAITS_SCRIPT = """
import re, sys
import jax.numpy as jnp
import triton
from jt_attention import plan, tuning
from jt_attention.kernels import tiles
import compile_check
from helpers import every_launch

tiles.REGISTER_A_RACES = triton.language.constexpr(sys.argv[1] == "races")
triton.knobs.runtime.add_stages_inspection_hook = compile_check._skip_assembly
problem = plan.Problem(1, 300, 700, 2, 2, 520, jnp.dtype("float16"), 0.05, True)
launches = every_launch(problem, 132)
values = next(l for l in launches if l.kernel.fn.__name__ == "_weighted_values_kernel")
config = tuning.fitting_configs(values.kernel, "9.0", problem.footprint)[0]
ptx = compile_check.compile_launch(values, compile_check._buffer_dtypes(problem, launches),
                                   config, "9.0").asm["ptx"]
for kind in ("wgmma", "cp.async"):
    print(kind, sorted({int(n) for n in re.findall(kind + r"\\.wait_group\\S*\\s+(\\d+);", ptx)}))
"""


@pytest.mark.parametrize("races", [True, False])
def test_drained_dots_finish_within_their_step(races, tmp_path):
    """Where Triton races on register operands (tiles.REGISTER_A_RACES, forced here on
    whichever Triton runs the test), the weighted-values loops retire each step's wgmmas
    before the next step (wait_group 0 only) and keep prefetching their tiles
    (cp.async waits with groups pending); without the flag wgmmas stay in flight."""
    env = _compiler_env(tmp_path)
    tests = pathlib.Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent),
                                         env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _WAITS_SCRIPT,
                             "races" if races else "free"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    waits = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    wgmma, copies = json.loads(waits["wgmma"]), json.loads(waits["cp.async"])
    assert max(copies) > 0, waits
    assert (wgmma == [0]) if races else (max(wgmma) > 0), waits
