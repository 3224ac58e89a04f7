"""Prompt batches with static shapes: right-padded to a length bucket, true lengths as an array.

Compiled decode functions depend only on shapes, so every prompt batch whose longest prompt
falls in the same bucket reuses one compilation. The cache is sized bucket + max_new_tokens
(not the model's whole context), which keeps per-step attention proportional to what is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded length for a prompt of n tokens, at least `minimum`: the next power of two, or
    three quarters of it (48, 96, 192, ...) where that fits. The extra steps keep padding under a third
    (a prefill's cost grows faster than its length: a 671-token prompt prefills in about half the
    time at 768 as at 1024) for twice the compiled shapes."""
    power = max(minimum, 1 << max(n - 1, 0).bit_length())
    three_quarters = power * 3 // 4
    return three_quarters if power >= 64 and n <= three_quarters and three_quarters >= minimum else power


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> None:
    """Errors that name the problem: no prompts, an empty prompt, no room in the context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
        if len(p) >= context:
            raise ValueError(f"prompt {i} is longer than the context: {len(p)} tokens, "
                             f"the model has {context} positions")
        if len(p) + max_new_tokens > context:
            raise ValueError(f"prompt {i} of {len(p)} tokens + {max_new_tokens} new tokens does not fit "
                             f"in the model's context of {context} positions")


def pad_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Right-pads token lists to a bucket: (tokens_bs int32, lengths_b int32, cache_len).

    `cache_len` fits the bucket plus max_new_tokens, capped at the context.
    """
    check_prompts(prompts, max_new_tokens, context)
    width = min(bucket_length(max(len(p) for p in prompts)), context)
    tokens_bs = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in zip(tokens_bs, prompts):
        row[:len(p)] = p
    lengths_b = np.array([len(p) for p in prompts], np.int32)
    return tokens_bs, lengths_b, min(width + max_new_tokens, context)


def pad_batch(prompts: Sequence[Sequence[int]], batch_size: int) -> list[Sequence[int]]:
    """Fills a short last batch up to batch_size with copies of its first prompt (outputs dropped),
    so that it reuses the compiled loop of the full batches."""
    return list(prompts) + [prompts[0]] * (batch_size - len(prompts))
