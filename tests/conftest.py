"""Test-wide setup: 8 emulated CPU devices, set before jax is imported."""

import os

# The suite is dominated by XLA compiling many small programs on the CPU: optimisation level 0
# roughly halves compile times, and the tests compare results, not speed.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
