"""Heads directories: the head weights, their config, and the fingerprint of their base model.

    HEADS_DIR/heads.safetensors    head parameters by dotted name ("heads.lm_kernel", "layer.mlp.up_proj.kernel")
    HEADS_DIR/heads_config.json    {"format", "heads": HeadsConfig, "base": {"fingerprint", "config", "path"}}

Floating tensors may be stored in a narrower dtype than they run in (bfloat16 halves a shipped
file); `load_heads` casts them to the dtype asked for.

The fingerprint is a SHA-256 of the base's config.json (parsed, so formatting does not count) and
one of its weight files' bytes. Heads only make sense on the hidden states of the model they
were distilled from, so loading them for another base model is an error (HeadsMismatchError).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import flax as safetensors_flax

from jaxaccel.files import write_atomically, write_json_atomically
from jaxaccel.hf import INDEX_FILE, ModelDirectoryError, config_from_hf
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.heads.registry import HeadParts, Heads

FORMAT = 1
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads_config.json"


class HeadsMismatchError(ValueError):
    """The heads were distilled from another base model (or the directory holds no heads)."""


def _base_config_json(base_dir: Path) -> dict[str, Any]:
    path = base_dir / "config.json"
    if not path.is_file():
        raise ModelDirectoryError(f"{base_dir} is not a model directory: it has no config.json")
    return json.loads(path.read_text())


def base_fingerprint(base_dir: str | os.PathLike) -> dict[str, str]:
    """{"config_sha256", "weights_sha256"} of a model directory. The weights' hash (about a second
    for 538 MB) is remembered while their files keep their names, sizes and modification times."""
    base_dir = Path(base_dir)
    config = json.dumps(_base_config_json(base_dir), sort_keys=True).encode()
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise ModelDirectoryError(f"{base_dir} holds no *.safetensors weights")
    files += [base_dir / INDEX_FILE] if (base_dir / INDEX_FILE).exists() else []
    stamp = tuple((f.name, str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return {"config_sha256": hashlib.sha256(config).hexdigest(), "weights_sha256": _weights_sha256(stamp)}


@functools.lru_cache(maxsize=16)
def _weights_sha256(stamp: tuple[tuple[str, str, int, int], ...]) -> str:
    weights = hashlib.sha256()
    for name, path, _, _ in stamp:
        weights.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                weights.update(chunk)
    return weights.hexdigest()


def save_heads(heads: Heads, heads_dir: str | os.PathLike, base_dir: str | os.PathLike,
               fingerprint: dict[str, str] | None = None) -> Path:
    """Writes heads.safetensors and heads_config.json (each via a temporary file and a rename)."""
    heads_dir, base_dir = Path(heads_dir), Path(base_dir)
    heads_dir.mkdir(parents=True, exist_ok=True)
    parts = HeadParts(heads.config, _loaded_config(base_dir))
    tensors = {name: jnp.asarray(jax.device_get(v)) for name, v in parts.params(heads).items()}
    record = {"format": FORMAT, "heads": heads.config.to_dict(),
              "base": {"fingerprint": fingerprint or base_fingerprint(base_dir),
                       "config": _base_config_json(base_dir), "path": str(base_dir.absolute())}}
    write_atomically(heads_dir / WEIGHTS_FILE, lambda tmp: safetensors_flax.save_file(tensors, tmp))
    write_json_atomically(heads_dir / CONFIG_FILE, record)
    return heads_dir


def store_heads_as(weights_file: str | os.PathLike, out_file: str | os.PathLike, store_dtype: str) -> Path:
    """Rewrites a heads.safetensors with its floating tensors stored as `store_dtype` (integer ones,
    a draft vocabulary's token map, as saved), via a temporary file and a rename."""
    try:
        dtype = jnp.dtype(store_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"heads can only be stored in a floating dtype (bfloat16, float16, float32), got {store_dtype!r}")
    tensors = {name: t.astype(dtype) if jnp.issubdtype(t.dtype, jnp.floating) else t
               for name, t in safetensors_flax.load_file(str(weights_file)).items()}
    write_atomically(Path(out_file), lambda tmp: safetensors_flax.save_file(tensors, tmp))
    return Path(out_file)


def read_heads_config(heads_dir: str | os.PathLike) -> tuple[HeadsConfig, dict[str, Any]]:
    """(HeadsConfig, the whole heads_config.json record) of a heads directory."""
    path = Path(heads_dir) / CONFIG_FILE
    if not path.is_file():
        raise HeadsMismatchError(f"{heads_dir} is not a heads directory: it has no {CONFIG_FILE}")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise HeadsMismatchError(f"{path} has format {record.get('format')!r}; this version reads format {FORMAT}")
    return HeadsConfig.from_dict(record["heads"]), record


def check_base(heads_dir: str | os.PathLike, base_dir: str | os.PathLike) -> HeadsConfig:
    """Raises HeadsMismatchError, naming what differs, unless the heads were distilled from base_dir."""
    config, record = read_heads_config(heads_dir)
    expected, actual = record["base"]["fingerprint"], base_fingerprint(base_dir)
    if expected == actual:
        return config
    where = f"heads in {heads_dir} were distilled from another base model than {base_dir} (that was {record['base']['path']})"
    if expected["config_sha256"] != actual["config_sha256"]:
        old, new = record["base"]["config"], _base_config_json(Path(base_dir))
        diffs = [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        raise HeadsMismatchError(f"{where}: config.json differs ({'; '.join(diffs) or 'key order'})")
    raise HeadsMismatchError(f"{where}: same config.json, different weights "
                             f"(sha256 {expected['weights_sha256'][:12]}… vs {actual['weights_sha256'][:12]}…)")


def load_heads(heads_dir: str | os.PathLike, base_dir: str | os.PathLike, dtype: str = "float32") -> Heads:
    """The heads of `heads_dir`, after checking that they belong to the model in `base_dir`
    (HeadsMismatchError otherwise). `dtype` as in `jaxaccel.hf.load_hf` for the base."""
    config = check_base(heads_dir, base_dir)
    parts = HeadParts(config, _loaded_config(Path(base_dir), dtype))
    tensors = safetensors_flax.load_file(str(Path(heads_dir) / WEIGHTS_FILE))
    missing, unexpected = sorted(parts.templates.keys() - tensors.keys()), sorted(tensors.keys() - parts.templates.keys())
    if missing or unexpected:
        raise HeadsMismatchError(f"{heads_dir}/{WEIGHTS_FILE} does not match its config: missing {missing}, "
                                 f"unexpected {unexpected}")
    for name, (_, var) in parts.templates.items():
        if tuple(tensors[name].shape) != tuple(var.shape):
            raise HeadsMismatchError(f"tensor {name!r} in {heads_dir} has shape {tuple(tensors[name].shape)}, "
                                     f"expected {tuple(var.shape)}")
    # Floating parameters take `dtype`; integer ones (a draft vocabulary's token map) stay as saved.
    return parts.merge({name: tensors[name].astype(jnp.dtype(dtype)) if jnp.issubdtype(tensors[name].dtype, jnp.floating)
                        else tensors[name] for name in parts.templates})


def _loaded_config(base_dir: Path, dtype: str = "float32"):
    return config_from_hf(_base_config_json(base_dir), dtype=dtype, param_dtype=dtype)

