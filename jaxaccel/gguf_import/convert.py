"""GGUF file -> Hugging Face model directory (config, float32 safetensors, tokenizer, generation config)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from jaxaccel.files import replace_directory, write_atomically, write_json_atomically
from jaxaccel.gguf_import.families import GGUF_FAMILIES, GGUFFamily
from jaxaccel.gguf_import.layout import Layout
from jaxaccel.gguf_import.reader import GGUFError, open_gguf, read_metadata, read_tensor
from jaxaccel.gguf_import.tokenizer import tokenizer_from_metadata
from jaxaccel.hf import load_hf


def family_of(meta: dict[str, Any], path: Path) -> tuple[str, GGUFFamily]:
    arch = meta.get("general.architecture")
    if arch not in GGUF_FAMILIES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; supported: {sorted(GGUF_FAMILIES)}")
    return arch, GGUF_FAMILIES[arch]


def convert_weights(reader, family: GGUFFamily, layout: Layout, path: Path) -> dict[str, np.ndarray]:
    """Every tensor dequantized, renamed, transformed back to Hugging Face's layout and shape-checked."""
    expected = layout.shapes
    tensors = {}
    for t in reader.tensors:
        name = family.hf_name(t.name)
        if name is None or name not in expected:
            raise GGUFError(f"{path} holds tensor {t.name!r}, which this {layout.family} config does not use")
        w = read_tensor(t, path)
        if w.shape != expected[name]:
            raise GGUFError(f"tensor {t.name!r} in {path} has shape {w.shape} (numpy order), expected "
                            f"{expected[name]} from the metadata")
        for transform in family.all_transforms():
            w = transform(name, w, layout.num_heads, layout.num_kv_heads)
        tensors[name] = np.ascontiguousarray(w, np.float32)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFError(f"{path} lacks tensors {missing[:4]} (Hugging Face names) that its metadata implies")
    return tensors


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes the GGUF file as a model directory at `out_dir` and returns its path.

    The directory is built beside `out_dir` under a temporary name and renamed into place at the end
    (replacing an existing `out_dir`), so a failed conversion leaves `out_dir` as it was. Raises
    `GGUFError` for a file it cannot convert.
    """
    src, out = Path(gguf_path), Path(out_dir)
    reader = open_gguf(src)
    meta = read_metadata(reader)
    arch, family = family_of(meta, src)
    hf = family.hf_config(meta, arch, family, {t.name for t in reader.tensors}, src)
    layout = family.layout(hf, src)
    tokenizer, tokenizer_config = tokenizer_from_metadata(meta, src)
    if tokenizer.get_vocab_size() > layout.vocab_size:
        raise GGUFError(f"{src}: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                        f"{layout.vocab_size}")
    tensors = convert_weights(reader, family, layout, src)

    if out.exists() and not out.is_dir():
        raise GGUFError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, build / "model.safetensors", metadata={"format": "pt"})
        write_json_atomically(build / "config.json", layout.config_json)
        write_atomically(build / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
        write_json_atomically(build / "tokenizer_config.json", tokenizer_config)
        write_json_atomically(build / "generation_config.json", generation_config(meta, family.stop_tokens))
        for f in build.iterdir():  # mkdtemp made the folder private; a model directory is not
            f.chmod(0o644)
        build.chmod(0o755)
        replace_directory(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out


def generation_config(meta: dict[str, Any], stop_tokens: tuple[str, ...] = ()) -> dict[str, Any]:
    """bos / eos / pad ids; eos lists end-of-turn too (llama.cpp's eot / eom ids, and the family's
    `stop_tokens` where the vocabulary has them), where they differ."""
    eos = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
           if meta.get(f"tokenizer.ggml.{k}_token_id") is not None]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos += [tokens.index(t) for t in stop_tokens if t in tokens]
    eos = list(dict.fromkeys(eos))
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    return config


def load_gguf(path: str | os.PathLike, dtype: str = "float32", **overrides: Any):
    """A GGUF file as `(Transformer, tokenizers.Tokenizer)`: converted into a temporary model
    directory, then read by `load_hf` like any other (`dtype` and `overrides` as there)."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory(prefix="jaxaccel-gguf-") as tmp:
        directory = convert_gguf(path, Path(tmp) / "model")
        model = load_hf(directory, dtype=dtype, **overrides)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return model, tokenizer
