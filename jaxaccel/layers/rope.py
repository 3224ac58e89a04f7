"""Rotary position embeddings (the half-split layout of the Hugging Face checkpoints)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig


def inverse_frequencies(config: ModelConfig, layer: int = 0) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2] of `layer` (its rope base: see
    ModelConfig.layer_rope), including `linear` / `llama3` scaling."""
    dim = config.resolved_head_dim
    theta, s = config.layer_rope(layer)
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if s is None:
        return inv_freq.astype(np.float32)
    if s.kind == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_bnhd: jax.Array, positions_bn: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates query or key vectors [B, n, H, D] by their token positions [B, n]."""
    angles_bnf = positions_bn.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos = jnp.cos(angles_bnf)[:, :, None, :]
    sin = jnp.sin(angles_bnf)[:, :, None, :]
    x1, x2 = jnp.split(x_bnhd.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_bnhd.dtype)
