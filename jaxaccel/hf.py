"""Hugging Face model directories <-> jaxaccel models.

A model directory holds `config.json`, `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`) and `tokenizer.json`. Our module names follow the Hugging Face
ones, so a parameter's checkpoint name is derived from its path (`hf_name`); loading walks our
parameters and takes each one's tensor, so a missing, misshapen or unexpected tensor is named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxaccel.config import ModelConfig
from jaxaccel.families import FAMILIES, FamilyConfigError, named
from jaxaccel.families.dense import ATTENTION_KEY  # noqa: F401  (config.json key of ModelConfig.attention)
from jaxaccel.files import write_atomically, write_json_atomically
from jaxaccel.model import Transformer

# Tensors some exporters write that carry no weights of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX_FILE = "model.safetensors.index.json"


class ModelDirectoryError(ValueError):
    """The path is not a usable model directory (missing files, unknown architecture, bad tensors)."""


# ---------------------------------------------------------------------------------------------
# config.json


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config dict (transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    unknown = sorted(set(hf.get("layer_types") or ()) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise ModelDirectoryError(f"unsupported layer_types value(s) {unknown}; "
                                  f"supported: {list(SUPPORTED_LAYER_TYPES)}")
    if model_type not in FAMILIES:  # e.g. "gemma3": the multimodal model
        arch = hf.get("architectures") or [model_type]
        supported = sorted(f.architecture for f in FAMILIES.values())
        raise ModelDirectoryError(f"unsupported architecture {arch[0]!r} (model_type {model_type!r}); "
                                  f"supported: {supported}")
    try:
        fields = FAMILIES[model_type].config_fields(hf)
    except FamilyConfigError as e:
        raise ModelDirectoryError(str(e)) from None
    return ModelConfig(**fields).replace(**overrides)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config dict for `config`; raises if the family cannot express it."""
    return named(config.family).config_to_hf(config)


# ---------------------------------------------------------------------------------------------
# weights


def hf_name(path: tuple, family: str = "llama") -> tuple[str, bool]:
    """Checkpoint name of one of our parameters, and whether it is stored transposed ([out, in]).
    For a stacked expert weight [E, ...], the name has an `{e}` placeholder for the expert."""
    adapter = named(family)
    *module, leaf = (str(p) for p in path)
    if len(module) > 2:  # layers.i.<module>
        module[2] = adapter.layer_modules.get(module[2], module[2])
    if len(module) > 3 and module[3] == "experts":  # layers.i.mlp.experts.<projection>
        proj = adapter.expert_projections.get(leaf, leaf)
        return f"model.{'.'.join(module)}.{{e}}.{proj}.weight", True
    prefix = "" if module[0] == "lm_head" else "model."
    suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    return f"{prefix}{'.'.join(module)}.{suffix}", leaf == "kernel"


def _read_param(name: str, transposed: bool, shape: tuple[int, ...], where: dict[str, Path], path: Path,
                used: set[str]) -> jax.Array:
    """One parameter's tensor from the checkpoint (an expert stack: E tensors stacked), checked.
    Mixtral names (`block_sparse_moe`) and per-expert tensors are what transformers' save_pretrained
    writes; the fused layout of its modules (`mlp.experts.gate_up_proj` [E, 2f, d], `down_proj`
    [E, d, f]) is read too."""
    if name not in where and "block_sparse_moe" in name and name.replace("block_sparse_moe", "mlp") in where:
        name = name.replace("block_sparse_moe", "mlp")
    if "{e}" in name and name.format(e=0) not in where:
        fused = _read_fused_experts(name, shape, where, path, used)
        if fused is not None:
            return fused
    names = [name.format(e=e) for e in range(shape[0])] if "{e}" in name else [name]
    parts = []
    for one in names:
        if one not in where:
            raise ModelDirectoryError(f"{path} is missing tensor {one!r}")
        tensor = _read_tensor(where[one], one)
        expected = shape[1:] if "{e}" in name else shape
        expected = expected[::-1] if transposed else expected
        if tuple(tensor.shape) != tuple(expected):
            raise ModelDirectoryError(f"tensor {one!r} in {path} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(expected)} for this config.json")
        parts.append(tensor.T if transposed else tensor)
        used.add(one)
    return jnp.stack(parts) if "{e}" in name else parts[0]


def _read_fused_experts(name: str, shape: tuple[int, ...], where: dict[str, Path], path: Path,
                        used: set[str]) -> jax.Array | None:
    """Our expert stack [E, d, f] / [E, f, d] from transformers' fused 3D tensors, or None if absent."""
    base, proj = name.replace("block_sparse_moe", "mlp").split(".{e}.")
    part = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down",
            "down_proj": "down"}[proj.removesuffix(".weight")]
    fused = f"{base}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
    if fused not in where:
        return None
    tensor = _read_tensor(where[fused], fused)
    e, rows, cols = shape
    expected = (e, cols, rows) if part == "down" else (e, 2 * cols, rows)
    if tuple(tensor.shape) != expected:
        raise ModelDirectoryError(f"tensor {fused!r} in {path} has shape {tuple(tensor.shape)}, "
                                  f"expected {expected} for this config.json")
    used.add(fused)
    if part == "gate":
        tensor = tensor[:, :cols]
    elif part == "up":
        tensor = tensor[:, cols:]
    return jnp.swapaxes(tensor, 1, 2)


def _tensor_files(path: Path) -> dict[str, Path]:
    """Which file holds each tensor."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelDirectoryError(f"{path} holds no *.safetensors weights")
    where = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            where.update({name: file for name in f.keys()})
    return where


def _read_tensor(file: Path, name: str) -> jax.Array:
    with safe_open(file, framework="flax") as f:  # flax: keeps bfloat16 as is
        return f.get_tensor(name)


def load_hf(path: str | os.PathLike, dtype: str = "float32", **overrides: Any) -> Transformer:
    """Loads a Llama / Qwen2 / Qwen3 / Mistral / Mixtral / Qwen2-MoE / Qwen3-MoE / Gemma 2 / Gemma 3 model
    directory as a Transformer.

    `dtype` is the parameter and activation dtype; `overrides` change other config fields
    (e.g. attention_impl="pallas").
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirectoryError(f"{path} is not a model directory: it has no config.json")
    config = config_from_hf(json.loads(config_file.read_text()), dtype=dtype, param_dtype=dtype, **overrides)
    where = _tensor_files(path)

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    used = set()
    leaves = []
    for param_path, variable in flat:
        name, transposed = hf_name(param_path, config.family)
        tensor = _read_param(name, transposed, tuple(variable.shape), where, path, used)
        leaves.append(variable.replace(jnp.asarray(tensor, jnp.dtype(dtype))))
    unexpected = sorted(n for n in set(where) - used
                        if not n.endswith(IGNORED_SUFFIXES) and not (config.tie_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise ModelDirectoryError(f"{path} holds tensors this config.json does not use: {unexpected[:8]}")
    state = nnx.from_flat_state([(p, leaf) for (p, _), leaf in zip(flat, leaves)])
    return nnx.merge(graphdef, state)


def save_hf(model: Transformer, path: str | os.PathLike, tokenizer=None,
            max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Writes `model` (and a `tokenizers.Tokenizer`) as a model directory that transformers loads.

    Each file is written to a temporary name and renamed, so an interrupted save never leaves a
    half-written file under a real name.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(param_path, model.config.family)
        value = np.asarray(jax.device_get(variable[...]))
        for one, part in ([(name.format(e=e), v) for e, v in enumerate(value)] if "{e}" in name else [(name, value)]):
            tensors[one] = np.ascontiguousarray(part.T if transposed else part)

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        if current and size + tensors[name].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(current)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_atomically(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {t: n for n, shard in zip(names, shards) for t in shard}}
        write_json_atomically(path / INDEX_FILE, index)
    write_json_atomically(path / "config.json", config_to_hf(model.config))
    if tokenizer is not None:
        write_atomically(path / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if model.config.eos_token_id is not None:
            tok_config["eos_token"] = tokenizer.id_to_token(model.config.eos_token_id)
        write_json_atomically(path / "tokenizer_config.json", tok_config)
    return path

