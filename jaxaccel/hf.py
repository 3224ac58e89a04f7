"""Hugging Face model directories <-> jaxaccel models.

A model directory holds `config.json`, `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`) and `tokenizer.json`. Our module names follow the Hugging Face
ones, so a parameter's checkpoint name is derived from its path (`hf_name`); loading walks our
parameters and takes each one's tensor, so a missing, misshapen or unexpected tensor is named.
"""

from __future__ import annotations

import dataclasses
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

from jaxaccel.config import ModelConfig, MoESpec, RopeScaling
from jaxaccel.families import gemma, hf_dimensions
from jaxaccel.files import write_atomically, write_json_atomically
from jaxaccel.model import Transformer

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    **gemma.ARCHITECTURES,
}
# A MoE family's attention and dense layers are those of this dense family.
DENSE_FAMILY = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
# Tensors some exporters write that carry no weights of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX_FILE = "model.safetensors.index.json"
ATTENTION_KEY = "jaxaccel_attention"  # config.json key of ModelConfig.attention (an AttentionSpec)


class ModelDirectoryError(ValueError):
    """The path is not a usable model directory (missing files, unknown architecture, bad tensors)."""


# ---------------------------------------------------------------------------------------------
# config.json


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config dict (transformers 4 or 5 layout)."""
    family = hf.get("model_type")
    unknown = sorted(set(hf.get("layer_types") or ()) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise ModelDirectoryError(f"unsupported layer_types value(s) {unknown}; "
                                  f"supported: {list(SUPPORTED_LAYER_TYPES)}")
    if family in gemma.MODEL_TYPES:
        try:
            return ModelConfig(**gemma.config_fields(hf)).replace(**overrides)
        except gemma.GemmaConfigError as e:
            raise ModelDirectoryError(str(e)) from None
    if family not in ARCHITECTURES or family in gemma.ARCHITECTURES:  # "gemma3": the multimodal model
        arch = hf.get("architectures") or [family]
        raise ModelDirectoryError(f"unsupported architecture {arch[0]!r} (model_type {family!r}); "
                                  f"supported: {sorted(ARCHITECTURES.values())}")
    attn = DENSE_FAMILY.get(family, family)
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelDirectoryError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' is implemented")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_kind = rope.get("rope_type", rope.get("type", "default"))
    if rope_kind == "default":
        scaling = None
    elif rope_kind == "linear":
        scaling = RopeScaling(kind="linear", factor=rope["factor"])
    elif rope_kind == "llama3":
        scaling = RopeScaling(kind="llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_max_position=rope["original_max_position_embeddings"])
    else:
        raise ModelDirectoryError(f"unsupported rope_type {rope_kind!r}; supported: default, linear, llama3")
    bias = bool(hf.get("attention_bias", False))
    sliding_window = hf.get("sliding_window") if attn == "mistral" else None
    if attn in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ModelDirectoryError(f"{family} with use_sliding_window=true (per-layer windows) is not supported")
    eos = hf.get("eos_token_id")
    fields = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if attn == "qwen2" else bias,
        o_bias=bias if attn in ("llama", "qwen3") else False,
        mlp_bias=bool(hf.get("mlp_bias", False)) if attn == "llama" else False,
        qk_norm=attn == "qwen3",
        moe=moe_from_hf(hf) if family in DENSE_FAMILY else None,
        sliding_window=sliding_window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        attention=hf.get(ATTENTION_KEY),  # our own key: per-layer attention kinds (absent: full)
    )
    return ModelConfig(**fields).replace(**overrides)


def moe_from_hf(hf: dict[str, Any]) -> MoESpec:
    """The MoESpec of a Mixtral / Qwen2-MoE / Qwen3-MoE config dict."""
    family = hf["model_type"]
    fields = dict(num_experts=hf.get("num_local_experts") or hf.get("num_experts"), top_k=hf["num_experts_per_tok"],
                  load_balance_weight=hf.get("router_aux_loss_coef", 0.01))
    if family == "mixtral":
        return MoESpec(**fields)  # experts are intermediate_size wide; top-k weights normalised
    fields.update(intermediate_size=hf["moe_intermediate_size"], normalize_top_k=bool(hf.get("norm_topk_prob", False)),
                  layer_step=hf.get("decoder_sparse_step", 1), dense_layers=tuple(hf.get("mlp_only_layers") or ()))
    if family == "qwen2_moe":
        fields.update(shared_intermediate_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True)
    return MoESpec(**fields)


def moe_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The MoE fields of a Mixtral / Qwen-MoE config dict; raises if the family cannot express `config.moe`."""
    family, m = config.family, config.moe
    if m is None:
        raise ValueError(f"a {family} checkpoint needs MoE layers, but config.moe is None")
    expected = dict(router="softmax")
    if family == "mixtral":
        expected.update(normalize_top_k=True, shared_intermediate_size=0, layer_step=1, dense_layers=())
    elif family == "qwen2_moe":
        expected.update(shared_expert_gate=True)
    else:
        expected.update(shared_intermediate_size=0)
    wrong = {k: getattr(m, k) for k, v in expected.items() if getattr(m, k) != v}
    if family == "mixtral" and config.moe_intermediate_size != config.intermediate_size:
        wrong["intermediate_size"] = m.intermediate_size  # Mixtral's experts are intermediate_size wide
    if family == "qwen2_moe" and not m.shared_intermediate_size:
        wrong["shared_intermediate_size"] = 0
    if wrong:
        raise ValueError(f"a {family} checkpoint cannot express moe {wrong}")
    hf = {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.load_balance_weight, "output_router_logits": False}
    if family == "mixtral":
        return {**hf, "num_local_experts": m.num_experts, "router_jitter_noise": 0.0}
    hf.update(num_experts=m.num_experts, moe_intermediate_size=config.moe_intermediate_size,
              norm_topk_prob=m.normalize_top_k, decoder_sparse_step=m.layer_step, mlp_only_layers=list(m.dense_layers))
    if family == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = m.shared_intermediate_size
    return hf


# Gemma's architectural flags at the values every other family has.
NOT_GEMMA = dict(hidden_act="silu", norm_offset=0.0, sandwich_norms=False, embed_scale=False, layer_types=None,
                 local_rope_theta=None, query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config dict for `config`; raises if the family cannot express it."""
    if config.family in gemma.ARCHITECTURES:
        return gemma.config_to_hf(config)
    family = DENSE_FAMILY.get(config.family, config.family)
    if config.moe is not None and config.family not in DENSE_FAMILY:
        raise ValueError(f"a {family} checkpoint cannot express MoE layers; use family "
                         f"{sorted(DENSE_FAMILY)[0]!r}, {sorted(DENSE_FAMILY)[1]!r} or {sorted(DENSE_FAMILY)[2]!r}")
    expected = {
        "llama": dict(qk_norm=False, o_bias=config.qkv_bias, sliding_window=None),
        "qwen2": dict(qk_norm=False, qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=None),
        "qwen3": dict(qk_norm=True, o_bias=config.qkv_bias, mlp_bias=False, sliding_window=None),
        "mistral": dict(qk_norm=False, qkv_bias=False, o_bias=False, mlp_bias=False),
    }[family] | NOT_GEMMA
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"a {family} checkpoint cannot express {wrong}")
    s = config.rope_scaling
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if s is not None:
        rope = {"rope_type": s.kind, "factor": s.factor, "rope_theta": config.rope_theta}
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    hf = {
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": config.family,
        **hf_dimensions(config),
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,  # transformers 4 reads these two,
        "rope_scaling": None if s is None else rope,
        "rope_parameters": rope,  # transformers 5 this one
    }
    if family in ("llama", "qwen3"):
        hf["attention_bias"] = config.qkv_bias
    if family == "llama":
        hf["mlp_bias"] = config.mlp_bias
    if family == "mistral":
        hf["sliding_window"] = config.sliding_window
    if family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if config.family in DENSE_FAMILY:
        hf.update(moe_to_hf(config))
    if config.attention is not None:  # duo / block_sparse / linear / hybrids: read back by config_from_hf
        hf[ATTENTION_KEY] = dataclasses.asdict(config.attention)
    return hf


# ---------------------------------------------------------------------------------------------
# weights


# Our stacked expert weights [E, ...] -> the per-expert tensor name in each MoE family.
MIXTRAL_EXPERTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def hf_name(path: tuple, family: str = "llama") -> tuple[str, bool]:
    """Checkpoint name of one of our parameters, and whether it is stored transposed ([out, in]).
    For a stacked expert weight [E, ...], the name has an `{e}` placeholder for the expert."""
    *module, leaf = (str(p) for p in path)
    if family == "mixtral" and len(module) > 2 and module[2] == "mlp":
        module[2] = "block_sparse_moe"
    if len(module) > 3 and module[3] == "experts":  # layers.i.mlp.experts.<projection>
        proj = MIXTRAL_EXPERTS[leaf] if family == "mixtral" else leaf
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

