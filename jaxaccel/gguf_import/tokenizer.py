"""A `tokenizers.Tokenizer` (and tokenizer_config.json fields) from a GGUF file's tokenizer metadata.

llama.cpp stores a byte-level BPE tokenizer ("gpt2") as its vocabulary, spelled in GPT-2's byte
alphabet, its merges, a type per token, and the name of its pre-tokenizer (`tokenizer.ggml.pre`),
whose split rule lives in llama.cpp's source rather than in the file: `PRE_TOKENIZERS` holds the
ones we know. Gemma's SentencePiece tokenizer ("llama") is built in `sentencepiece.py`; the special
and user-defined tokens, BOS/EOS and tokenizer_config.json are the same for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxaccel.gguf_import.reader import GGUFError
from jaxaccel.gguf_import.sentencepiece import SENTENCEPIECE_ARCHS, gemma_tokenizer

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# The split rules of llama.cpp's pre-tokenizer types (llama-vocab.cpp). None: GPT-2's own rule.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": "digits",  # SmolLM2's tokenizer.json: each digit apart, then GPT-2's rule
    "llama-bpe": LLAMA3_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def pre_tokenizer(pre: str, path: Path):
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: unsupported tokenizer.ggml.pre {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
    split = PRE_TOKENIZERS[pre]
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def post_processor(bos: str | None, eos: str | None, vocab: dict[str, int]):
    """Adds BOS / EOS around every sequence, as the add_bos_token / add_eos_token flags ask."""
    single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
    pair = " ".join([single, *([bos] if bos else []), "$B:1", *([eos] if eos else [])])
    specials = [(t, vocab[t]) for t in {bos, eos} if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def tokenizer_from_metadata(meta: dict[str, Any], path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer and the tokenizer_config.json fields (special tokens, chat template, BOS/EOS flags)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFError(f"{path} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tokenizer, vocab, special_ok = byte_level_tokenizer(meta, tokens, path)
    elif kind == "llama" and meta.get("general.architecture") in SENTENCEPIECE_ARCHS:
        tokenizer = gemma_tokenizer(meta, path)
        vocab, special_ok = tokenizer.get_vocab(), lambda t: True
    else:
        raise GGUFError(f"{path}: unsupported tokenizer.ggml.model {kind!r}; supported: 'gpt2' (byte-level BPE), "
                        f"'llama' for {', '.join(SENTENCEPIECE_ARCHS)} (SentencePiece BPE)")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == CONTROL and special_ok(t)])
    # USER_DEFINED tokens (e.g. <think>, Gemma's newline runs) are matched whole in text, but are not
    # special; one the vocabulary spells differently (Gemma's space runs) stays an ordinary piece.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))  # llama.cpp's default for SPM
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        tokenizer.post_processor = post_processor(bos if add_bos else None, eos if add_eos else None, vocab)
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                                          "normalized": t.normalized, "single_word": t.single_word,
                                          "special": t.special}
                                 for i, t in sorted(tokenizer.get_added_tokens_decoder().items())},
    }
    if meta.get("tokenizer.chat_template") is not None:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config


def byte_level_tokenizer(meta: dict[str, Any], tokens: list[str], path: Path):
    """(the BPE tokenizer, its vocabulary, which CONTROL tokens may be special) for a "gpt2" tokenizer."""
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{path} has a byte-level BPE tokenizer without tokenizer.ggml.merges")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet (llama.cpp writes some special tokens raw) is respelled; as
    # transformers does, such a CONTROL token is not made special (it is a llama.cpp mislabel).
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, vocab, lambda t: set(t) <= alphabet
