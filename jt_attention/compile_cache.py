"""An on-disk cache of the Triton compiles behind jax-triton's kernel calls.

jax-triton compiles each kernel config from Triton IR to PTX when a jitted call is
lowered, and keeps the result in memory only, so every new process compiles every
config again: most of a first call's seconds. This cache keeps each compile's result
on disk, keyed by the Triton IR text, the compile options, the device and the
versions of triton, jax-triton and jaxlib, and gives it back to later processes.

JT_ATTENTION_CACHE_DIR names the directory (default ~/.cache/jt_attention);
JT_ATTENTION_CACHE_DIR=0 turns the cache off. Entries are JSON (the PTX and its
metadata); a damaged entry is compiled again.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import tempfile

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
        key = repr((str(ttir), tuple(repr(x) for x in target), versions))
        path = directory / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        fields = _load(path, key)
        if fields is not None:
            return result_type(**fields)
        result = compile_ttir(ttir, backend, *target)
        _store(path, key, dataclasses.asdict(result))
        return result

    def _store(path, key, fields):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=directory, delete=False) as f:
                json.dump(dict(key=key, fields=fields), f)
            os.replace(f.name, path)  # atomic: a concurrent reader sees all or nothing
        except (OSError, TypeError, ValueError) as error:  # TypeError: a non-text binary
            logger.warning("jt_attention: cannot write the compile cache in %s: %s",
                           directory, error)

    return compile_or_load


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
    triton_lib.compile_ttir_inplace = cached(compile_ttir, triton_lib.CompilationResult,
                                             directory, _versions())
    logger.info("jt_attention: compiled kernels are cached in %s (%s=0 turns it off)",
                directory, ENVIRONMENT_VARIABLE)
