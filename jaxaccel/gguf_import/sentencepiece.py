"""Gemma's tokenizer from GGUF metadata (`tokenizer.ggml.model == "llama"`): SentencePiece-style BPE.

llama.cpp stores a SentencePiece vocabulary as pieces (spaces spelled "▁"), a score and a type per
piece, and no merges: SentencePiece BPE merges, at each step, the adjacent pair whose joined piece
scores best. A `tokenizers` BPE does the same when each merge is ranked by its joined piece, so the
merges are rebuilt from the vocabulary: every split of every piece into two pieces, ranked by the
piece's position in the file (Gemma's pieces are listed best-first; its scores say the same for the
ordinary pieces but not for the user-defined ones). Bytes without a piece fall back to <0xNN> pieces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers

from jaxaccel.gguf_import.reader import GGUFError

SPACE = "▁"  # SentencePiece's spelling of a space
SENTENCEPIECE_ARCHS = ("gemma2", "gemma3")  # architectures whose "llama" tokenizer is Gemma's (no prefix space)


def rebuilt_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every piece into two vocabulary pieces, best piece first; a piece's
    splits with the longer left part first (one piece's splits never compete at one position)."""
    merges = []
    for piece in pieces:
        merges += [(piece[:k], piece[k:]) for k in range(len(piece) - 1, 0, -1)
                   if piece[:k] in vocab and piece[k:] in vocab]
    return merges


def gemma_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """The BPE model, normalizer and decoder of Gemma's tokenizer (special tokens are added by the caller)."""
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise GGUFError(f"{path}: a SentencePiece tokenizer with add_space_prefix is not supported "
                        f"(Gemma's has none)")
    if meta.get("tokenizer.ggml.merges"):
        raise GGUFError(f"{path}: a SentencePiece tokenizer with tokenizer.ggml.merges is not supported")
    # llama.cpp writes Gemma's whitespace-run pieces with real spaces; in text a space is "▁".
    pieces = [SPACE * len(t) if t and set(t) == {" "} else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise GGUFError(f"{path}: the SentencePiece vocabulary repeats {len(pieces) - len(vocab)} pieces")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=rebuilt_merges(pieces, vocab), dropout=None,
                                     unk_token=pieces[unk_id] if unk_id is not None else None,
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)  # no prefix space, no other normalization
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer
