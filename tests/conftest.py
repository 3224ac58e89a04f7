"""Test-wide setup: 8 emulated CPU devices, set before jax is imported."""

import os

# The suite is dominated by XLA compiling many small programs on the CPU: optimisation level 0
# roughly halves compile times, and the tests compare results, not speed.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
