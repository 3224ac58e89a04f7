"""Small helpers shared by the kernels: backend detection and argument checks."""

from __future__ import annotations

import jax

MASKED = -1e30  # the same finite "minus infinity" as jaxaccel.layers.attention
LANES, SUBLANES = 128, 8  # TPU vector tiles: the minor two dimensions of every Mosaic block


class KernelArgumentError(ValueError):
    """A kernel was called with arrays whose shapes or dtypes do not fit together."""


def default_interpret() -> bool:
    """Pallas has no CPU lowering: on CPU the kernels run in the Pallas interpreter."""
    return jax.default_backend() == "cpu"


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def check_rank(name: str, x, rank: int, layout: str) -> None:
    """A KernelArgumentError naming `name` and its layout unless x has this rank."""
    if x.ndim != rank:
        raise KernelArgumentError(f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}")


def check_positive(name: str, value: int) -> None:
    """A KernelArgumentError naming `name` unless value is a positive int."""
    if not isinstance(value, int) or value <= 0:
        raise KernelArgumentError(f"{name} must be a positive int, got {value!r}")


def compiler_params(interpret: bool):
    """Lowering choice for a GPU-version pallas_call: the Triton lowering unless interpreting.

    jax 0.10 lowers a pallas_call without compiler params through Mosaic GPU, which needs the
    kernels in its own (warpgroup) style; these kernels are written for Triton's. On CPU
    (interpret=False only makes sense when exporting for GPU, as tests/test_pallas_lowering.py
    does) Triton is the target too. On TPU the kernels take their TPU versions (`tpu_route`).
    """
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def tpu_route(interpret) -> bool:
    """Whether a kernel takes its TPU (Mosaic) version: compiled on a TPU backend (interpret=False
    or None there), or simulated on any backend with interpret=pltpu.InterpretParams(...).
    interpret=True is the generic Pallas interpreter running the GPU version."""
    from jax.experimental.pallas import tpu as pltpu

    if isinstance(interpret, pltpu.InterpretParams):
        return True
    return interpret is not True and jax.default_backend() == "tpu"


def triton_head_dim_problem(kernel: str, head_dim: int) -> str | None:
    """Why the GPU (Triton) `kernel` cannot take heads of this size (None: it can).

    Triton loads and dots want power-of-two tiles of at least 16 (decode_attention pads smaller
    heads to 16 itself). The TPU kernels and the interpreters take any head size.
    `jaxaccel.config.resolve_attention_impl` reads this for "auto" on GPU.
    """
    if kernel == "decode_attention" and head_dim < 16:
        return None
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"{kernel} on GPU (Triton) needs a power-of-two head_dim of at least 16, got {head_dim}"
    return None


def check_head_dim(kernel: str, head_dim: int, interpret) -> None:
    """A KernelArgumentError naming the head size when the GPU kernel about to lower (not
    interpret: interpret is False off TPU) cannot take it."""
    compiles_for_gpu = interpret is False and jax.default_backend() != "tpu"
    problem = triton_head_dim_problem(kernel, head_dim) if compiles_for_gpu else None
    if problem:
        raise KernelArgumentError(f"{problem}; use attention_impl='xla'")
