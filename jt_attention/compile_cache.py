"""An on-disk cache of the Triton compiles behind jax-triton's kernel calls.

jax-triton builds each kernel config when a jitted call is lowered: Triton's front end
turns the Python source into Triton IR, which is compiled to PTX. It keeps the result in
memory only, so every new process builds every config again: most of a first call's
seconds. Two layers keep the results on disk for later processes:
- compiles (`cached`): PTX and its metadata, keyed by the Triton IR text, the compile
  options, the device and the versions of triton, jax-triton and jaxlib;
- whole kernels (`cached_kernels`, jax-triton 0.3): the same and the Triton IR, keyed by
  the kernel's source hash and its arguments' types and options, so that a later process
  skips the front end too (about 0.1-0.3 s a config).

JT_ATTENTION_CACHE_DIR names the directory (default ~/.cache/jt_attention);
JT_ATTENTION_CACHE_DIR=0 turns the cache off. Entries are JSON; a damaged entry is
built again.
"""

import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import pathlib
import tempfile
import threading

from jt_attention.log import logger


ENVIRONMENT_VARIABLE = "JT_ATTENTION_CACHE_DIR"


def cache_dir():
    """The cache directory, or None where the environment turns the cache off."""
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if value == "0":
        return None
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "jt_attention"
    return pathlib.Path(value or default).expanduser()


def _versions():
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    return tuple(version(p) for p in ("triton", "jax-triton", "jaxlib"))


def cached(compile_ttir, result_type, directory, versions):
    """`compile_ttir(ttir, backend, *target)` (jax-triton's compile_ttir_inplace, which
    returns a `result_type` dataclass: the PTX and its metadata) with its results kept
    in `directory`. target: (options, compute_capability, platform) in jax-triton
    0.3, (options, gpu_target) in 0.4; the backend object is left out of the key (its
    repr holds an address)."""
    def compile_or_load(ttir, backend, *target):
        ttir_text = str(ttir)
        key = repr((ttir_text, tuple(repr(x) for x in target), versions))
        path = _entry_path(directory, key)
        fields = _load(path, key)
        if fields is not None:
            result = result_type(**fields)
        else:
            result = compile_ttir(ttir, backend, *target)
            _store(directory, path, key, dataclasses.asdict(result))
        if _RECORDING.compiles is not None:
            _RECORDING.compiles.append((ttir_text, target, result))
        return result

    return compile_or_load


class _Recording(threading.local):
    compiles = None  # within _recorded_compiles: (Triton IR text, target, result) of each


_RECORDING = _Recording()


@contextlib.contextmanager
def _recorded_compiles():
    """The compiles (Triton IR to PTX, or their results loaded) that run within."""
    _RECORDING.compiles = compiles = []
    try:
        yield compiles
    finally:
        _RECORDING.compiles = None


def cached_kernels(get_or_create, kernel_type, directory, versions):
    """jax-triton 0.3's `get_or_create_triton_kernel(backend_init_func, platform, fn,
    arg_dtypes, scalar_args, **options)`, which returns (kernel_type object, specialization
    attributes), with what it built kept in `directory`. On a hit, the kernel is rebuilt
    from its name, shared memory, PTX and Triton IR with no front end and no compile.

    The key: `fn.cache_key` (Triton's hash of the kernel's source, of the functions it
    calls and of the globals it reads), the argument dtypes, the scalar arguments (their
    values set Triton's specialization), the options, the versions and Triton's
    environment variables. The PTX comes from the compile wrapper (`cached`), which
    records each compile it sees."""
    built = {}  # this process's kernels, as jax-triton's own in-memory cache

    def get_or_create_cached(backend_init_func, platform, fn, arg_dtypes, scalar_args,
                             **options):
        key = repr((fn.cache_key, platform, tuple(arg_dtypes), tuple(map(tuple, scalar_args)),
                    sorted(options.items()), versions, _triton_environment()))
        if key in built:
            return built[key]
        path = _entry_path(directory, key, prefix="kernel-")
        built[key] = _kernel_from(_load(path, key), kernel_type)
        if built[key] is None:
            with _recorded_compiles() as compiles:
                built[key] = get_or_create(backend_init_func, platform, fn, arg_dtypes,
                                           scalar_args, **options)
            if len(compiles) == 1:  # built here, not taken from jax-triton's memory
                _store_kernel(directory, path, key, options, built[key][1], *compiles[0])
        return built[key]

    return get_or_create_cached


def _kernel_from(fields, kernel_type):
    """(kernel, attributes) from a stored entry, or None (absent or damaged)."""
    try:
        kernel = kernel_type(fields["name"], fields["num_warps"], fields["num_ctas"],
                             fields["shared_mem_bytes"], fields["ptx"], fields["ttir"],
                             fields["compute_capability"])
        return kernel, ast.literal_eval(fields["attrs"])
    except (TypeError, KeyError, ValueError, SyntaxError):  # TypeError: fields is None
        return None


def _store_kernel(directory, path, key, options, attrs, ttir, target, result):
    if ast.literal_eval(repr(attrs)) != attrs:  # only plain values can be stored
        return
    # jax-triton 0.3's defaults, and its compile target: (options, compute capability,
    # platform)
    fields = dict(name=result.name, num_warps=options.get("num_warps") or 4,
                  num_ctas=options.get("num_ctas") or 1,
                  shared_mem_bytes=result.shared_mem_bytes, ptx=result.binary, ttir=ttir,
                  compute_capability=target[1], attrs=repr(attrs))
    _store(directory, path, key, fields)


def _triton_environment():
    return sorted((k, v) for k, v in os.environ.items() if k.startswith("TRITON_"))


def _entry_path(directory, key, prefix=""):
    return directory / f"{prefix}{hashlib.sha256(key.encode()).hexdigest()}.json"


def _store(directory, path, key, fields):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False) as f:
            json.dump(dict(key=key, fields=fields), f)
        os.replace(f.name, path)  # atomic: a concurrent reader sees all or nothing
    except (OSError, TypeError, ValueError) as error:  # TypeError: a non-text binary
        logger.warning("jt_attention: cannot write the compile cache in %s: %s",
                       directory, error)


def _load(path, key):
    """The stored fields for `key` (lists back to tuples), or None (absent or damaged)."""
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != key:  # a hash collision
            return None
        return {k: tuple(v) if isinstance(v, list) else v for k, v in entry["fields"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@functools.cache
def install():
    """Puts the cache in front of jax-triton's compiles, once per process; logs where."""
    directory = cache_dir()
    if directory is None:
        return
    from jax_triton import triton_lib

    compile_ttir = getattr(triton_lib, "compile_ttir_inplace", None)
    if compile_ttir is None:
        logger.warning("jt_attention: this jax-triton has no compile_ttir_inplace; "
                       "kernels are compiled in every process")
        return
    versions = _versions()
    triton_lib.compile_ttir_inplace = cached(compile_ttir, triton_lib.CompilationResult,
                                             directory, versions)
    get_or_create = getattr(triton_lib, "get_or_create_triton_kernel", None)
    if get_or_create is not None and _takes_jax_triton_03_arguments(get_or_create):
        triton_lib.get_or_create_triton_kernel = cached_kernels(
            get_or_create, triton_lib.triton_kernel_call_lib.TritonKernel, directory,
            versions)
    logger.info("jt_attention: compiled kernels are cached in %s (%s=0 turns it off)",
                directory, ENVIRONMENT_VARIABLE)


def _takes_jax_triton_03_arguments(get_or_create):
    parameters = list(inspect.signature(get_or_create).parameters)
    return parameters[:5] == ["backend_init_func", "platform", "fn", "arg_dtypes",
                              "scalar_args"]
