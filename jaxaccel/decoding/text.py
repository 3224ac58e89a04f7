"""Text in and out of the decode loop: prompt files, encoding as the tokenizer was saved, stop tokens."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from jaxaccel.config import ModelConfig


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The `prompt` field of each line of a JSON-lines file (blank lines skipped), in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON: {e.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path} line {number} has no string field 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"prompt file {path} is empty: no lines with a 'prompt'")
    return prompts


def load_model_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """The model directory's tokenizer.json, used as saved (its post-processor decides BOS/EOS)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    return Tokenizer.from_file(str(path))


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, adding only what the tokenizer's own post-processor adds."""
    ids = [enc.ids for enc in tokenizer.encode_batch(list(texts))]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty: it encodes to no tokens")
    return ids


def stop_tokens(config: ModelConfig, model_dir: str | os.PathLike | None = None) -> list[int]:
    """The config's EOS, plus any EOS ids listed in the directory's generation_config.json."""
    ids = [] if config.eos_token_id is None else [config.eos_token_id]
    gen_file = None if model_dir is None else Path(model_dir) / "generation_config.json"
    if gen_file is not None and gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return sorted(set(ids))
