"""What keeps a first call short: the on-disk compile cache, with a stand-in for
jax-triton's compile (no GPU needed), and Triton's specializer started without torch."""

import dataclasses
import os
import subprocess
import sys
import textwrap

from jt_attention import compile_cache


@dataclasses.dataclass
class FakeResult:  # the shape of jax-triton's CompilationResult
    binary: str
    name: str
    shared_mem_bytes: int
    cluster_dims: tuple


def _counting_compile(calls):
    def compile_ttir(ttir, backend, options, compute_capability, platform):
        calls.append(str(ttir))
        return FakeResult(f"ptx of {ttir} {options}", "kernel", 1024, (1, 1, 1))
    return compile_ttir


def test_second_process_loads_what_the_first_compiled(tmp_path):
    calls = []
    first = compile_cache.cached(_counting_compile(calls), FakeResult, tmp_path, ("v",))
    second = compile_cache.cached(_counting_compile(calls), FakeResult, tmp_path, ("v",))
    want = first("ttir A", None, "warps=4", 90, "cuda")
    assert second("ttir A", None, "warps=4", 90, "cuda") == want
    assert calls == ["ttir A"]  # the second "process" compiled nothing


def test_key_covers_ir_options_device_and_versions(tmp_path):
    calls = []
    compile_ttir = compile_cache.cached(_counting_compile(calls), FakeResult, tmp_path, ("v",))
    compile_ttir("ttir A", None, "warps=4", 90, "cuda")
    compile_ttir("ttir B", None, "warps=4", 90, "cuda")
    compile_ttir("ttir A", None, "warps=8", 90, "cuda")
    compile_ttir("ttir A", None, "warps=4", 89, "cuda")
    other_versions = compile_cache.cached(_counting_compile(calls), FakeResult, tmp_path, ("w",))
    other_versions("ttir A", None, "warps=4", 90, "cuda")
    assert len(calls) == 5


def test_jax_triton_04_signature(tmp_path):
    """jax-triton 0.4 calls compile_ttir_inplace(ttir, backend, options, gpu_target)."""
    calls = []

    def compile_ttir(ttir, backend, options, gpu_target):
        calls.append((str(ttir), gpu_target))
        return FakeResult(f"ptx of {ttir} for {gpu_target}", "kernel", 1024, (1, 1, 1))

    first = compile_cache.cached(compile_ttir, FakeResult, tmp_path, ("v",))
    want = first("ttir A", None, "warps=4", "sm_90")
    assert first("ttir A", None, "warps=4", "sm_90") == want
    first("ttir A", None, "warps=4", "sm_89")
    assert calls == [("ttir A", "sm_90"), ("ttir A", "sm_89")]


def test_damaged_entry_is_compiled_again(tmp_path):
    calls = []
    compile_ttir = compile_cache.cached(_counting_compile(calls), FakeResult, tmp_path, ("v",))
    want = compile_ttir("ttir A", None, "warps=4", 90, "cuda")
    for entry in tmp_path.glob("*.json"):
        entry.write_text("{not json")
    assert compile_ttir("ttir A", None, "warps=4", 90, "cuda") == want
    assert len(calls) == 2


@dataclasses.dataclass
class FakeKernel:  # the arguments of jaxlib's TritonKernel
    name: str
    num_warps: int
    num_ctas: int
    shared_mem_bytes: int
    ptx: str
    ttir: str
    compute_capability: int


@dataclasses.dataclass
class FakeFunction:  # a JITFunction: its cache_key hashes its source and dependencies
    cache_key: str


def _one_process(tmp_path, builds, compiles, versions=("v",)):
    """jax-triton 0.3's get_or_create_triton_kernel as a new process sees it, cached."""
    compile_ttir = compile_cache.cached(_counting_compile(compiles), FakeResult, tmp_path,
                                        versions)

    def get_or_create(backend_init_func, platform, fn, arg_dtypes, scalar_args, *, num_warps,
                      num_stages, num_ctas, compute_capability, enable_fp_fusion, metaparams,
                      dump):
        ttir = f"ttir of {fn.cache_key} {arg_dtypes} {scalar_args} {metaparams}"  # front end
        builds.append(ttir)
        result = compile_ttir(ttir, None, f"warps={num_warps}", 90, platform)
        kernel = FakeKernel(result.name, num_warps, num_ctas, result.shared_mem_bytes,
                            result.binary, ttir, 90)
        return kernel, {(0,): [["tt.divisibility", 16]], (1,): []}

    return compile_cache.cached_kernels(get_or_create, FakeKernel, tmp_path, versions)


def _build(get_or_create, source="kernel v1", metaparams=(("BLOCK_M", 64),), scalar=48):
    return get_or_create(None, "cuda", FakeFunction(source), ["*bf16", "i32"],
                         [(1, "i32", scalar)], num_warps=4, num_stages=3, num_ctas=1,
                         compute_capability=None, enable_fp_fusion=True,
                         metaparams=dict(metaparams), dump=False)


def test_second_process_skips_the_front_end(tmp_path):
    builds, compiles = [], []
    want = _build(_one_process(tmp_path, builds, compiles))
    second = _one_process(tmp_path, builds, compiles)
    assert _build(second) == want
    assert _build(second) == want  # and from memory after that
    assert len(builds) == len(compiles) == 1
    assert want[0].compute_capability == 90 and want[1][(0,)] == [["tt.divisibility", 16]]


def test_kernel_key_covers_source_arguments_and_versions(tmp_path):
    builds, compiles = [], []
    _build(_one_process(tmp_path, builds, compiles))
    get_or_create = _one_process(tmp_path, builds, compiles)
    _build(get_or_create, source="kernel v2")          # the source (or a helper) changed
    _build(get_or_create, metaparams=(("BLOCK_M", 128),))
    _build(get_or_create, scalar=49)                    # specialization: not a multiple of 16
    _build(_one_process(tmp_path, builds, compiles, versions=("w",)))
    assert len(builds) == 5


def test_damaged_kernel_entry_is_built_again(tmp_path):
    builds, compiles = [], []
    want = _build(_one_process(tmp_path, builds, compiles))
    for entry in tmp_path.glob("kernel-*.json"):
        entry.write_text('{"key": "x", "fields": {}}')
    assert _build(_one_process(tmp_path, builds, compiles)) == want
    assert len(builds) == 2 and len(compiles) == 1  # the PTX still came from its own entry


def test_kernel_cache_only_wraps_jax_triton_03():
    """0.4 builds kernels elsewhere (a method of its kernel class): only compiles are kept."""
    def get_or_create_03(backend_init_func, platform, fn, arg_dtypes, scalar_args, *,
                         num_warps, num_stages, num_ctas, compute_capability,
                         enable_fp_fusion, metaparams, dump):
        pass

    def some_other(fn, signature, options):
        pass

    assert compile_cache._takes_jax_triton_03_arguments(get_or_create_03)
    assert not compile_cache._takes_jax_triton_03_arguments(some_other)


def test_environment_turns_it_off_or_moves_it(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENVIRONMENT_VARIABLE, "0")
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENVIRONMENT_VARIABLE, str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path


SPECIALIZE_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import sys, types
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend, GPUTarget
    from jt_attention import launch

    launch._specializer_without_torch()
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    def pointer(address, dtype):  # what jax-triton passes for an array argument
        return types.SimpleNamespace(data_ptr=lambda: address, dtype=dtype)
    got = [native_specialize_impl(backend, pointer(16, "fp16"), False, True, True),
           native_specialize_impl(backend, pointer(8, "bf16"), False, True, True),
           native_specialize_impl(backend, 48, False, True, True)]
    assert "torch" not in sys.modules, "torch was imported"
    import torch
    got.append(native_specialize_impl(backend, torch.zeros(8, dtype=torch.float16), False,
                                      True, True))
    print(repr(got))
""")


def test_specializer_starts_without_importing_torch():
    """jax-triton's lowering calls Triton's specializer, whose first call imports torch
    (seconds) in Triton 3.6; started by jt it must not, and must still tell pointers,
    alignments and torch tensors apart. (Triton 3.9's specializer imports no torch
    itself, so there only the second half can fail; on the GPU machine's 3.6 both.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SPECIALIZE_IN_A_FRESH_PROCESS], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = eval(result.stdout.strip().splitlines()[-1])
    assert got[:3] == [("*fp16", "D"), ("*bf16", ""), ("i32", "D")]
    assert got[3][0] == "*fp16"
