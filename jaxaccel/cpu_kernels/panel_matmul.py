"""Few-row matmuls against weights packed as 16-column panels: the decode and tree-verify steps'
products on CPU (panel_matmul.cc says why XLA:CPU's own GEMM is slow there).

`pack_panels(w_kn)` makes the packed copy [N/16, K, 16] once; `panel_matmul(x, w_pk16)` is x @ w
for x [..., K]. `available()` says whether this machine can run it: Linux on x86-64 with AVX2 and
FMA, a C++ compiler, and $JAXACCEL_CPU_KERNELS not "0" (the switch for A/B runs). The decoders use
it through `jaxaccel.model.decode_layout`; nothing else needs to call it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxaccel.cpu_kernels.build import registered

PANEL = 16
TARGET = "jaxaccel_panel_matmul"
MAX_ROWS = 16  # beyond this XLA's GEMM (which prefill uses) is the better product


def available() -> bool:
    """True once the kernel is built and registered with XLA:CPU (the first call builds it)."""
    return registered("panel_matmul.cc", TARGET)


def reads_panels(x: jax.Array) -> bool:
    """Whether a pass with input `x` [..., K] multiplies by the panels: float32, at most MAX_ROWS rows."""
    return x.dtype == jnp.float32 and math.prod(x.shape[:-1]) <= MAX_ROWS


def packable(w_kn: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether `w_kn` can be packed: a float32 [K, N] weight, N a multiple of 16."""
    return w_kn.ndim == 2 and w_kn.dtype == jnp.float32 and w_kn.shape[1] % PANEL == 0


@jax.jit
def pack_panels(w_kn: jax.Array) -> jax.Array:
    """[K, N] -> [N/16, K, 16]: panel p holds columns 16p..16p+15, row by row."""
    k, n = w_kn.shape
    return jnp.transpose(w_kn.reshape(k, n // PANEL, PANEL), (1, 0, 2))


def panel_matmul(x: jax.Array, w_pk16: jax.Array) -> jax.Array:
    """x [..., K] float32 @ the packed weight -> [..., N] float32."""
    p, k, width = w_pk16.shape
    if width != PANEL or x.shape[-1] != k or x.dtype != jnp.float32 or w_pk16.dtype != jnp.float32:
        raise ValueError(f"panel_matmul takes float32 x [..., K] and panels [N/16, K, 16]; got x "
                         f"{x.dtype}{list(x.shape)} and panels {w_pk16.dtype}{list(w_pk16.shape)}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (p * PANEL,), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w_pk16)
