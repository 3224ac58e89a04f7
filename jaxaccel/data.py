"""Corpus, tokenizer and batching for pretraining, head distillation and benchmarks.

Corpus: the CPython standard-library ``.py`` files of the running interpreter (real
code, available offline), optionally plus local text directories. Each file goes to
``train`` / ``validation`` / ``test`` by a SHA-1 of its path relative to its root, so
the split is the same on every machine with the same Python version, and a file's
split never depends on which other files exist. The test split is never trained on.

Tokenizer: byte-level BPE from the ``tokenizers`` library, ``<|endoftext|>`` = id 0
is the end-of-document token, saved as a Hugging Face ``tokenizer.json``.

Token streams: a split is tokenized once into one flat int32 array with EOS after
every document, optionally cached as ``.npy``. Training batches are a pure function
of ``(seed, step)`` (``batch_at``), so a run resumed at step k sees exactly the data
an uninterrupted run would have seen.

Bits per byte: with byte-level BPE every token id stands for a fixed number of UTF-8
bytes (``token_byte_lengths``); EOS counts as 0 bytes because it is not part of any
file's text. Its NLL is still part of the sum (ending a document is part of the
task); documents average ~17 KB, so this moves bits/byte by well under 0.1%.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxaccel.files import write_atomically, write_json_atomically

EOS_TOKEN = "<|endoftext|>"
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)  # train, validation, test
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_CACHE_FORMAT = 1  # bump when the token-stream layout changes, to invalidate caches

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus file. ``name`` (path relative to its root, '/'-separated) decides the split."""

    name: str
    path: Path


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> str:
    """Split of a file from its root-relative path: a stable hash, ~90/5/5."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < SPLIT_FRACTIONS[0]:
        return "train"
    if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]:
        return "validation"
    return "test"


def _walk(root: Path, suffix: str) -> list[Document]:
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place: hidden dirs (.git, .venv) and installed packages are not corpus
        # text, and a site-packages can hold many times more files than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(".")]
        for f in filenames:
            if f.endswith(suffix) and not f.startswith("."):
                path = Path(dirpath, f)
                docs.append(Document(path.relative_to(root).as_posix(), path))
    return sorted(docs, key=lambda d: d.name)


def list_documents(
    split: str, extra_dirs: Sequence[PathLike] = (), include_stdlib: bool = True
) -> list[Document]:
    """Files of one split, in a fixed order (stdlib first, then each extra dir; sorted by name).

    Stdlib contributes its ``*.py`` files; extra dirs contribute every non-hidden file
    (files that turn out not to be UTF-8 are skipped when read). Raises
    ``FileNotFoundError`` for a missing extra dir and ``ValueError`` for a source with
    no files or a split that comes out empty.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    sources = [(stdlib_root(), ".py")] if include_stdlib else []
    for d in extra_dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"corpus directory does not exist: {d}")
        sources.append((d, ""))
    if not sources:
        raise ValueError("empty corpus: include_stdlib=False and no extra_dirs given")
    docs = []
    for root, suffix in sources:
        found = _walk(root, suffix)
        if not found:
            raise ValueError(f"no corpus files (*{suffix}) found under {root}")
        docs += [doc for doc in found if split_of(doc.name) == split]
    if not docs:
        raise ValueError(f"split {split!r} is empty for corpus roots {[str(r) for r, _ in sources]}")
    return docs


def read_text(doc: Document) -> str | None:
    """The file's exact text (no newline translation), or None if it is not UTF-8 text."""
    try:
        text = doc.path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return None if "\x00" in text else text  # NUL: a binary file that happens to decode


def load_texts(
    split: str, extra_dirs: Sequence[PathLike] = (), include_stdlib: bool = True
) -> list[str]:
    """Texts of the readable files of a split, in ``list_documents`` order."""
    texts = [read_text(d) for d in list_documents(split, extra_dirs, include_stdlib)]
    texts = [t for t in texts if t is not None]
    if not texts:
        raise ValueError(f"split {split!r} has no UTF-8 readable files")
    return texts


# -------------------------------------------------------------------------- tokenizer


def files_within_bytes(texts: list[str], max_bytes: int | None) -> list[str]:
    """Whole files, in corpus order, that fit in max_bytes together (at least one file)."""
    if max_bytes is None:
        return texts
    out, total = [], 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if out and total + size > max_bytes:
            continue  # a smaller file further on may still fit
        out.append(text)
        total += size
    return out


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, max_bytes: int | None = None, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE tokenizer; ``<|endoftext|>`` gets id 0.

    ``max_bytes`` caps the UTF-8 bytes of training text (texts are taken in order, the
    last one truncated), which keeps tests and tiny presets to seconds. The vocab can
    come out smaller than ``vocab_size`` if the text has too few distinct pairs.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")

    def capped() -> Iterable[str]:
        budget = math.inf if max_bytes is None else max_bytes
        for text in texts:
            if budget <= 0:
                return
            data = text.encode("utf-8")
            if len(data) > budget:
                text = data[: int(budget)].decode("utf-8", errors="ignore")
            budget -= len(data)
            yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no UNK ever
        show_progress=False,
    )
    tokenizer.train_from_iterator(capped(), trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path_or_dir: PathLike) -> Path:
    """Write ``tokenizer.json`` (into a directory, or to the given ``*.json`` path)."""
    path = Path(path_or_dir)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def load_tokenizer(path_or_dir: PathLike) -> Tokenizer:
    """Load a ``tokenizer.json``, given the file itself or a model directory holding it."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of ``<|endoftext|>`` (the document separator)."""
    i = tokenizer.token_to_id(EOS_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token")
    return i


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-1 of the serialized tokenizer: identifies it in cache metadata."""
    return hashlib.sha1(tokenizer.to_str().encode("utf-8")).hexdigest()


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """``[V]`` int32: UTF-8 bytes each token id stands for; special tokens (EOS) count 0.

    Byte-level BPE writes each byte as exactly one character of its 256-symbol
    alphabet, so a token's byte length is the length of its vocab string.
    """
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths_v = np.zeros(tokenizer.get_vocab_size(), np.int32)
    for token, i in tokenizer.get_vocab().items():
        lengths_v[i] = 0 if token in special else len(token)
    return lengths_v


def bits_per_byte(nll_nats_sum: float, num_bytes: int) -> float:
    """Bits per UTF-8 byte from a summed token NLL in nats and the bytes those tokens cover.

    For eval windows: ``num_bytes = token_byte_lengths(tok)[windows_nt[:, 1:]].sum()``.
    """
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return float(nll_nats_sum) / (math.log(2) * float(num_bytes))


# ---------------------------------------------------------------------- token streams


def tokenize_documents(tokenizer: Tokenizer, texts: Sequence[str], chunk: int = 64) -> np.ndarray:
    """One flat int32 stream: each document's tokens followed by EOS.

    A literal ``<|endoftext|>`` inside a file is tokenized as ordinary text, so only
    real document boundaries produce the EOS id.
    """
    eos = eos_id(tokenizer)
    parts = []
    saved, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    try:
        for start in range(0, len(texts), chunk):  # chunks bound the Encoding objects held at once
            for enc in tokenizer.encode_batch_fast(list(texts[start : start + chunk])):
                parts.append(np.asarray(enc.ids, np.int32))
                parts.append(np.array([eos], np.int32))
    finally:
        tokenizer.encode_special_tokens = saved
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def token_stream(
    tokenizer: Tokenizer,
    split: str,
    cache_dir: PathLike | None = None,
    extra_dirs: Sequence[PathLike] = (),
    include_stdlib: bool = True,
) -> np.ndarray:
    """Flat int32 token stream of a split, reused from ``cache_dir`` when still valid.

    The cache is ``tokens_<split>.npy`` plus ``tokens_<split>.json`` recording the
    tokenizer hash, the split and a hash of the file names and contents; any mismatch
    re-tokenizes and overwrites.
    """
    docs = list_documents(split, extra_dirs, include_stdlib)
    texts, files_sha1 = [], hashlib.sha1()
    for doc in docs:
        text = read_text(doc)
        if text is not None:
            texts.append(text)
            files_sha1.update(doc.name.encode("utf-8") + b"\0")
            files_sha1.update(hashlib.sha1(text.encode("utf-8")).digest())
    meta = {
        "format": _CACHE_FORMAT,
        "split": split,
        "tokenizer_sha1": tokenizer_hash(tokenizer),
        "files_sha1": files_sha1.hexdigest(),
        "num_files": len(texts),
    }
    if cache_dir is None:
        return tokenize_documents(tokenizer, texts)

    cache_dir = Path(cache_dir)
    npy_path, json_path = cache_dir / f"tokens_{split}.npy", cache_dir / f"tokens_{split}.json"
    if npy_path.is_file() and json_path.is_file():
        cached = json.loads(json_path.read_text())
        if {k: cached.get(k) for k in meta} == meta:
            tokens = np.load(npy_path)
            if tokens.dtype == np.int32 and tokens.shape == (cached.get("num_tokens"),):
                return tokens

    tokens = tokenize_documents(tokenizer, texts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Atomic writes, so a run killed mid-write never leaves a cache that looks valid, and hosts
    # sharing cache_dir never write into each other's temporary files.
    def save_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file, not a name: np.save would append ".npy" to the name
            np.save(f, tokens)

    write_atomically(npy_path, save_npy)
    write_json_atomically(json_path, {**meta, "num_tokens": int(tokens.size)})
    return tokens


def batch_at(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """``[batch_size, seq_len + 1]`` int32 random windows, a pure function of ``(seed, step)``.

    Inputs are ``[:, :-1]``, targets ``[:, 1:]``. No state carries between steps, so
    resuming at step k reproduces an uninterrupted run exactly.
    """
    num_starts = tokens.shape[0] - seq_len  # windows of seq_len + 1 tokens
    if num_starts <= 0:
        raise ValueError(f"token stream of {tokens.shape[0]} tokens is too short for seq_len={seq_len}")
    rng = np.random.default_rng([seed, step])
    starts_b = rng.integers(0, num_starts, size=batch_size)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return windows[starts_b].astype(np.int32)  # fancy indexing copies: no view into tokens


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """``[N, seq_len + 1]`` int32 windows from the start of the stream, in order.

    Consecutive windows share one boundary token, so their targets (``[:, 1:]``) tile
    the stream without gaps or overlap: every token after the first is scored once.
    """
    n = (tokens.shape[0] - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n <= 0:
        raise ValueError(f"token stream of {tokens.shape[0]} tokens is too short for seq_len={seq_len}")
    windows = np.lib.stride_tricks.sliding_window_view(tokens[: n * seq_len + 1], seq_len + 1)
    return np.ascontiguousarray(windows[::seq_len], dtype=np.int32)


# --------------------------------------------------------------------------- prompts


def sample_prompts(
    split: str = "test",
    n: int = 8,
    num_chars: int = 512,
    seed: int = 0,
    extra_dirs: Sequence[PathLike] = (),
    include_stdlib: bool = True,
) -> list[str]:
    """``n`` text snippets of exactly ``num_chars`` characters from ``n`` different files.

    Each snippet starts at a random line start of a file at least ``num_chars`` long;
    deterministic given the arguments (and the corpus). For a prompt of a fixed token
    length, encode a snippet and truncate its ids.
    """
    texts = [t for t in load_texts(split, extra_dirs, include_stdlib) if len(t) >= num_chars]
    if len(texts) < n:
        raise ValueError(f"split {split!r} has only {len(texts)} files of >= {num_chars} chars, need {n}")
    rng = np.random.default_rng(seed)
    prompts = []
    for i in rng.choice(len(texts), size=n, replace=False):
        text = texts[i]
        # Line starts that leave room for a full snippet (0 always qualifies).
        starts = [0] + [m.end() for m in re.finditer("\n", text[: len(text) - num_chars])]
        s = starts[rng.integers(len(starts))]
        prompts.append(text[s : s + num_chars])
    return prompts
