"""Compiles a C++ XLA FFI source shipped beside this file, once per machine, and loads it.

The shared library goes to $JAXACCEL_CACHE_DIR/kernels (default ~/.cache/jaxaccel/kernels), named
by a hash of the source and the headers beside it, the compiler flags and jaxlib's version, so an
edit or a jax upgrade rebuilds it. It is written atomically (jaxaccel.files), so a concurrent
process never loads half a file. Nothing here downloads: it needs the system's C++ compiler (g++ or
$CXX) and jaxlib's FFI headers (`jax.ffi.include_dir()`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax
import jaxlib

from jaxaccel.files import cache_home, write_atomically

SOURCES = Path(__file__).parent
FLAGS = ("-O3", "-mavx2", "-mfma")

log = logging.getLogger(__name__)


def kernels_dir() -> Path:
    if os.environ.get("JAXACCEL_CACHE_DIR"):
        return Path(os.environ["JAXACCEL_CACHE_DIR"]) / "kernels"
    return cache_home() / "kernels"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _compile(cxx: str, flags: tuple[str, ...], source: Path, output: str) -> None:
    command = [cxx, *flags, "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}",
               str(source), "-o", output]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {source.name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")


def build(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """Compiles SOURCES/source (if not cached) with `flags` and loads it. Raises RuntimeError with
    the compiler's message when it cannot."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) to build {source}")
    text = b"".join(path.read_bytes() for path in (SOURCES / source, *sorted(SOURCES.glob("*.h"))))  # its headers too
    key = hashlib.sha256(text + " ".join(flags).encode() + jaxlib.__version__.encode()).hexdigest()[:16]
    target = kernels_dir() / f"{Path(source).stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda partial: _compile(cxx, flags, SOURCES / source, partial))
    return ctypes.cdll.LoadLibrary(str(target))


def cpu_has_avx2_fma() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@functools.cache
def registered(source: str, target: str) -> bool:
    """Whether the handler `target` of SOURCES/source runs on this machine: Linux on x86-64 with
    AVX2 and FMA, a C++ compiler, and $JAXACCEL_CPU_KERNELS not "0" (the switch for A/B runs).
    The first call builds the library and registers the handler with XLA:CPU."""
    if os.environ.get("JAXACCEL_CPU_KERNELS", "1") == "0" or not cpu_has_avx2_fma():
        return False
    try:
        library = build(source, FLAGS)
    except (RuntimeError, OSError) as error:
        log.warning("%s unavailable, decoding uses XLA's own operations: %s", source, error)
        return False
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    return True
