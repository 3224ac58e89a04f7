"""JAX's persistent compilation cache, switched on for programs that compile the same jits every run.

XLA compiles of the decode loops take seconds each on a CPU; with the cache on, a later process
with the same programs, shapes, jax version and XLA flags loads the executables from disk
instead (checked on CPU with jax 0.10.2). The default directory is under the user's cache home:
$JAXACCEL_CACHE_DIR, else $XDG_CACHE_HOME/jaxaccel/jax-compilation, else
~/.cache/jaxaccel/jax-compilation.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxaccel.files import cache_home


def default_cache_dir() -> Path:
    """Where compiled executables go unless a program is told otherwise."""
    if os.environ.get("JAXACCEL_CACHE_DIR"):
        return Path(os.environ["JAXACCEL_CACHE_DIR"])
    return cache_home() / "jax-compilation"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Points JAX's persistent cache at `directory` (created) and caches every compiled program,
    however quick its compile and however small (the defaults skip compiles under 1 s, which
    on a fast machine would be most of ours). Call before the first jit runs; returns the directory."""
    import jax

    path = Path(directory) if directory is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor at all
    return path
