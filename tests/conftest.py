"""Test-wide setup: 8 emulated CPU devices, set before jax is imported."""

import os
import shutil
import tempfile

# The suite is dominated by XLA compiling many small programs on the CPU: optimisation level 0
# roughly halves compile times, and the tests compare results, not speed.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the run, shared by its xdist workers (they inherit this
# environment from the controller) and the subprocesses the tests start: many test files compile
# the same small programs (measured: 15% off six of them). Removed when the run ends.
_RUN_CACHE = os.path.join(tempfile.gettempdir(), f"jaxaccel-tests-{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _RUN_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # noqa: E402


@pytest.fixture
def as_if_on_tpu(monkeypatch):
    """Trace as if on a TPU backend: the kernels and "auto" choose by jax.default_backend(). Traces
    cached under the real backend would hide that choice (and these would leak out), so the jit
    caches are cleared before and after. Tests that run kernels this way add the TPU interpreter
    (`pltpu.force_tpu_interpret_mode()`); tests that export for "tpu" do not."""
    import jax

    jax.clear_caches()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    yield
    jax.clear_caches()


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist), after every worker
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)
