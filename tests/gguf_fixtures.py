"""Tiny GGUF files for the tests, written as llama.cpp's converter writes them: arch metadata,
byte-level BPE tokenizer metadata (a real tokenizer trained on Python source), chat template,
q/k rows permuted for Llama-layout files, 2-D weights quantized, norms and biases in F32; and tiny
Gemma 3 files (SentencePiece-style tokenizer metadata, norms stored as w + 1)."""

from __future__ import annotations

import json
import textwrap
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<tool_call>"
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Every inner (ggml row) dimension is a multiple of 256, so every quant type's blocks fit.
DIMS = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64, context=128)
# name -> (general.architecture, tokenizer.ggml.pre, dims overrides, general.name)
ARCHS = {
    "llama": ("llama", "smollm", {}, "tiny llama"),
    "llama_bpe": ("llama", "llama-bpe", {}, "tiny llama3"),
    "mistral": ("llama", "default", {}, "mistral"),  # llama.cpp writes Mistral as "llama"
    "qwen2": ("qwen2", "qwen2", {}, "tiny qwen2"),
    # transformers' GGUF loader ignores qwen3's attention.key_length and uses Qwen3Config's default
    # head_dim 128: 4 x 128 keeps the query width (512) apart from the hidden size (256) anyway.
    "qwen3": ("qwen3", "qwen2", dict(head_dim=128), "tiny qwen3"),
}
QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@lru_cache(maxsize=None)
def trained_tokenizer(digits: bool = False) -> Tokenizer:
    """A byte-level BPE of 500 tokens trained on real text (this repository's Python source); with
    `digits`, each digit pre-tokenized apart, as SmolLM2's was (llama.cpp's "smollm")."""
    root = Path(__file__).resolve().parents[1] / "jaxaccel"
    text = "\n".join(p.read_text() for p in sorted(root.glob("*.py")))[:60000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return tok


def tokenizer_metadata(pre: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's converter stores them, for pre-tokenizer `pre`."""
    tok = trained_tokenizer(digits=pre == "smollm")
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + [USER_DEFINED]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def random_weights(dims: dict, vocab: int, *, qkv_bias: bool, qk_norm: bool, tied: bool,
                   seed: int) -> dict[str, np.ndarray]:
    """llama.cpp-named weights in Hugging Face row order ([out, in]), norms around 1."""
    rng = np.random.default_rng(seed)
    d, f, hd = dims["hidden"], dims["intermediate"], dims["head_dim"]
    q, kv = dims["heads"] * hd, dims["kv_heads"] * hd

    def mat(*shape):
        return (0.08 * rng.standard_normal(shape)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": mat(vocab, d), "output_norm.weight": norm(d)}
    if not tied:
        w["output.weight"] = mat(vocab, d)
    for i in range(dims["layers"]):
        b = f"blk.{i}."
        w.update({b + "attn_norm.weight": norm(d), b + "attn_q.weight": mat(q, d), b + "attn_k.weight": mat(kv, d),
                  b + "attn_v.weight": mat(kv, d), b + "attn_output.weight": mat(d, q), b + "ffn_norm.weight": norm(d),
                  b + "ffn_gate.weight": mat(f, d), b + "ffn_up.weight": mat(f, d), b + "ffn_down.weight": mat(d, f)})
        if qkv_bias:
            w.update({b + "attn_q.bias": mat(q), b + "attn_k.bias": mat(kv), b + "attn_v.bias": mat(kv)})
        if qk_norm:
            w.update({b + "attn_q_norm.weight": norm(hd), b + "attn_k_norm.weight": norm(hd)})
    return w


def permute(w: np.ndarray, n: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary pairs (what the importer undoes)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# gguf-py cannot quantize the K-quants: their blocks are written at random instead, with the offsets
# of each block's float16 scale fields (every value is linear in them) to bring the weights to ~0.08.
K_QUANT_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def quantize(w: np.ndarray, kind: gguf.GGMLQuantizationType, seed: int) -> np.ndarray:
    """`w` in `kind`'s blocks (K-quants: random blocks of w's shape, as explained above)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = w.shape
    data = np.random.default_rng(seed + rows + cols).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if kind.name not in K_QUANT_SCALES:
        try:
            return gguf.quants.quantize(w, kind)
        except NotImplementedError:  # a type gguf-py neither writes nor reads (bad-input tests)
            return data.reshape(rows, -1)

    def set_scale(value: float) -> None:
        for offset in K_QUANT_SCALES[kind.name]:
            data[:, :, offset:offset + 2] = np.array([value], np.float16).view(np.uint8)

    set_scale(1.0)
    std = gguf.quants.dequantize(data.reshape(rows, -1), kind).std()
    set_scale(0.08 / std)
    return data.reshape(rows, -1)


def write_gguf(path: Path, name: str = "llama", qtype: str = "F32", *, seed: int = 0, tied: bool = True,
               add_bos: bool = False, tokenizer: bool = True, arch: str | None = None,
               tensor_types: dict[str, str] | None = None, metadata_dims: dict | None = None) -> Path:
    """Writes a tiny GGUF of architecture `name` (a key of ARCHS) with 2-D weights in `qtype`.

    For bad-input tests: `arch` overrides general.architecture, `tensor_types` one tensor's type,
    `metadata_dims` the dims the metadata states (not the tensors' shapes)."""
    gguf_arch, pre, overrides, general_name = ARCHS[name]
    gguf_arch = arch or gguf_arch
    dims = {**DIMS, **overrides}
    meta = {**dims, **(metadata_dims or {})}
    tokens, types, merges = tokenizer_metadata(pre)
    weights = random_weights(dims, len(tokens), qkv_bias=gguf_arch == "qwen2", qk_norm=gguf_arch == "qwen3",
                             tied=tied, seed=seed)
    writer = gguf.GGUFWriter(path, gguf_arch)
    writer.add_name(general_name)
    writer.add_block_count(meta["layers"])
    writer.add_context_length(meta["context"])
    writer.add_embedding_length(meta["hidden"])
    writer.add_feed_forward_length(meta["intermediate"])
    writer.add_head_count(meta["heads"])
    writer.add_head_count_kv(meta["kv_heads"])
    writer.add_rope_freq_base(10000.0 if gguf_arch != "qwen3" else 1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if gguf_arch == "llama":
        writer.add_vocab_size(len(tokens))
        writer.add_rope_dimension_count(dims["head_dim"])
    else:
        writer.add_key_length(dims["head_dim"])
        writer.add_value_length(dims["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(SPECIALS.index("<|im_start|>"))
        writer.add_eos_token_id(SPECIALS.index("<|im_end|>"))
        writer.add_unk_token_id(SPECIALS.index("<|endoftext|>"))
        writer.add_pad_token_id(SPECIALS.index("<|im_end|>"))
        writer.add_add_bos_token(add_bos)
        writer.add_chat_template(CHAT_TEMPLATE)
    if gguf_arch in ("llama", "mistral"):  # llama.cpp permutes Llama-layout q/k rows
        for tname, w in weights.items():
            if tname.endswith(("attn_q.weight", "attn_k.weight")):
                weights[tname] = permute(w, dims["heads" if tname.endswith("attn_q.weight") else "kv_heads"])
    write_tensors(writer, weights, qtype, seed, tensor_types)
    return path


def write_tensors(writer, weights: dict[str, np.ndarray], qtype: str, seed: int,
                  tensor_types: dict[str, str] | None = None) -> None:
    """Adds the weights (2-D ones in `qtype`, or their `tensor_types` entry), writes the file and closes it."""
    for tname, w in weights.items():
        kind = gguf.GGMLQuantizationType[(tensor_types or {}).get(tname, qtype)]
        if w.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tname, w)
        else:
            writer.add_tensor(tname, quantize(w, kind, seed), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sample_texts() -> list[str]:
    """A few hundred varied texts: code, prose, unicode, emoji, whitespace runs, digits, chat markup."""
    code = Path(textwrap.__file__).read_text()
    lines = [line for line in code.splitlines() if line.strip()][:120]
    prose = ("The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see... "
             "Don't you think?  Naïve café résumé — “quotes” and ‘single’ ones. 日本語のテキスト。 "
             "Привет, мир! 🤗🚀👍🏽 emoji, 🇫🇷 flags. Tabs\tand\r\nnewlines\n\n\n   spaces   ").split(" ")
    numbers = ["0", "7", "42", "123", "2024", "1234567890", "3.5e-10", "x1y22z333", " 12 345 6789", "v1.2.3"]
    spaces = [" ", "  ", "\t", "\n", "\n\n", " \n ", "a  b", "a   b\t\tc", "    def f():", "end   "]
    chat = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_end|><|im_start|>",
            "text <tool_call> more", "<|endoftext|>", "<|im_start|>system\nYou are 🤖.<|im_end|>"]
    joined = [" ".join(prose[i:i + 5]) for i in range(0, len(prose), 3)]
    return lines + prose + numbers + spaces + chat + joined + ["\n".join(lines[:40]), ""]


# ---------------------------------------------------------------------------------------------
# Gemma 3 (and 2): SentencePiece-style tokenizer metadata, four norms per block stored as w + 1, QK-norm

GEMMA_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
# Gemma's user-defined pieces: newline, space and tab runs (llama.cpp writes the space runs with real spaces)
GEMMA_USER_DEFINED = ["\n", "\n\n", "\n\n\n", "  ", "   ", "    ", "\t\t"]
# head_dim 256 as in every small Gemma 3: transformers' GGUF loader takes query_pre_attn_scalar's
# default 256, which the importer derives as head_dim. Six layers: five sliding, one global.
GEMMA_DIMS = dict(hidden=256, intermediate=512, layers=6, heads=2, kv_heads=1, head_dim=256, context=128,
                  sliding_window=8)
GEMMA_CHAT = "<start_of_turn>user\nSum 12 + 30 🤔<end_of_turn>\n<start_of_turn>model\n"


@lru_cache(maxsize=None)
def gemma_tokenizer_metadata() -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, types) as llama.cpp stores a Gemma vocabulary: control tokens, user-defined
    whitespace runs, the 256 byte pieces, then BPE pieces ("▁" for a space) best-first, trained here
    on this repository's Python source."""
    root = Path(__file__).resolve().parents[1] / "jaxaccel"
    text = "\n".join(p.read_text() for p in sorted(root.glob("*.py")))[:60000]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)],
                            trainers.BpeTrainer(vocab_size=600, show_progress=False))
    fixed = GEMMA_CONTROL + GEMMA_USER_DEFINED + [f"<0x{b:02X}>" for b in range(256)]
    trained = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
               if t not in fixed and not (len(t) > 1 and set(t) == {"▁"})]  # the space runs are user-defined
    pieces = fixed + trained
    types = [3] * len(GEMMA_CONTROL) + [4] * len(GEMMA_USER_DEFINED) + [6] * 256 + [1] * len(trained)
    scores = [-1000.0] * len(GEMMA_CONTROL) + [0.0] * (len(GEMMA_USER_DEFINED) + 256) + [-float(i) for i in
                                                                                          range(len(trained))]
    return pieces, scores, types


def gemma_weights(dims: dict, vocab: int, *, tied: bool, seed: int,
                  qk_norm: bool = True) -> dict[str, np.ndarray]:
    """llama.cpp-named Gemma 3 (Gemma 2: no `qk_norm`) weights in Hugging Face row order, norms as Hugging Face stores them
    (around 0: the scale is 1 + w)."""
    rng = np.random.default_rng(seed)
    d, f, hd = dims["hidden"], dims["intermediate"], dims["head_dim"]
    q, kv = dims["heads"] * hd, dims["kv_heads"] * hd

    def mat(*shape):
        return (0.08 * rng.standard_normal(shape)).astype(np.float32)

    def norm(n):
        return (0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": mat(vocab, d), "output_norm.weight": norm(d)}
    if not tied:
        w["output.weight"] = mat(vocab, d)
    for i in range(dims["layers"]):
        b = f"blk.{i}."
        w.update({b + "attn_norm.weight": norm(d), b + "attn_q.weight": mat(q, d), b + "attn_k.weight": mat(kv, d),
                  b + "attn_v.weight": mat(kv, d), b + "attn_output.weight": mat(d, q),
                  b + "post_attention_norm.weight": norm(d), b + "ffn_norm.weight": norm(d),
                  b + "post_ffw_norm.weight": norm(d), b + "ffn_gate.weight": mat(f, d),
                  b + "ffn_up.weight": mat(f, d), b + "ffn_down.weight": mat(d, f)})
        if qk_norm:
            w.update({b + "attn_q_norm.weight": norm(hd), b + "attn_k_norm.weight": norm(hd)})
    return w


def write_gemma_gguf(path: Path, qtype: str = "F32", *, arch: str = "gemma3", seed: int = 0,
                     tied: bool = True, metadata: dict | None = None, drop: tuple[str, ...] = (),
                     extra: dict[str, np.ndarray] | None = None) -> Path:
    """Writes a tiny Gemma 3 (or `arch="gemma2"`) GGUF as llama.cpp's converter does (norms stored as
    w + 1, no q/k permutation, 2-D weights in `qtype`). For bad-input tests: `metadata` overrides
    GEMMA_DIMS in the metadata only (None: the key is left out), `drop` leaves tensors out, `extra` adds some."""
    dims = GEMMA_DIMS
    meta = {**dims, **(metadata or {})}
    pieces, scores, types = gemma_tokenizer_metadata()
    weights = {**gemma_weights(dims, len(pieces), tied=tied, seed=seed, qk_norm=arch == "gemma3"), **(extra or {})}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    for add, key in [(writer.add_block_count, "layers"), (writer.add_context_length, "context"),
                     (writer.add_embedding_length, "hidden"), (writer.add_feed_forward_length, "intermediate"),
                     (writer.add_head_count, "heads"), (writer.add_head_count_kv, "kv_heads"),
                     (writer.add_key_length, "head_dim"), (writer.add_value_length, "head_dim"),
                     (writer.add_sliding_window, "sliding_window")]:
        if meta[key] is not None:
            add(meta[key])
    writer.add_rope_freq_base(1000000.0 if arch == "gemma3" else 10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for add, token in [(writer.add_bos_token_id, "<bos>"), (writer.add_eos_token_id, "<eos>"),
                       (writer.add_unk_token_id, "<unk>"), (writer.add_pad_token_id, "<pad>")]:
        add(pieces.index(token))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    # llama.cpp stores Gemma's norm scale 1 + w
    stored = {tname: w + 1.0 if tname.endswith("norm.weight") else w for tname, w in weights.items() if tname not in drop}
    write_tensors(writer, stored, qtype, seed)
    return path


def gemma_sample_texts() -> list[str]:
    """sample_texts() with Gemma's chat markup and whitespace runs."""
    return sample_texts() + [GEMMA_CHAT, "<start_of_turn>model\nHi!<end_of_turn>", "<bos>text<eos>", "<mask> x",
                             "a  b   c    d     e", "\t\t\tx", "  lead", "trail  ", "x\n\n\n\ny", "💩🦜 ∮ E⋅da"]
