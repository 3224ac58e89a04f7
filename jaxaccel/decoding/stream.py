"""Streaming: tokens out of a jitted decode loop while it runs, and text out of tokens as they come.

The loop runs in chunks (`decoder.advance(state, ..., max_steps=K)`, the state donated from chunk to
chunk), and the new tokens are read between chunks. K adapts so that a chunk lasts about
`chunk_seconds`: one host round trip per chunk, not per token, so streaming costs the jitted loop
next to nothing, while the text still arrives several times a second. A chunked run emits exactly
the tokens of one whole `generate` call.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from jaxaccel.decoding.result import DecodeResult
from jaxaccel.decoding.sampling import Greedy, Policy


def warm_up(decoder, prompt: Sequence[int], *, policy: Policy = Greedy(), max_new_tokens: int,
            stop_tokens: Sequence[int] = ()) -> None:
    """Compiles the prefill and the chunked loop for this prompt's shape bucket (one prefill and one
    step are run), so that a timed stream after it excludes compilation."""
    state, stop_ids = decoder.start([prompt], policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens)
    state = decoder.advance(state, stop_ids, policy=policy, max_steps=1)
    jax.device_get(_snapshot(state.result, state.step))


@jax.jit
def _snapshot(result: DecodeResult, step: jax.Array):
    """Fresh copies of what the host reads between chunks: they outlive the state's donation."""
    return jax.tree.map(jnp.copy, (result, step))


class TokenStream:
    """Iterating yields each chunk's new tokens (a list of ids) for one prompt, the stop token included.

    The next chunk is queued before the last one's tokens are read, so the device never waits for
    the host (reading, decoding text, printing). Afterwards: `result` (the DecodeResult, as
    `generate` returns it), `seconds` (from the call to the last token), `arrivals` ((seconds
    since the call, tokens so far) after each chunk), and `chunk` (the steps per chunk it settled on:
    a good `first_chunk` for the next stream of the same decoder).
    """

    def __init__(self, decoder, prompt: Sequence[int], *, policy: Policy = Greedy(), max_new_tokens: int,
                 stop_tokens: Sequence[int] = (), seed: int = 0, chunk_seconds: float = 0.05,
                 first_chunk: int = 1, max_chunk_steps: int = 1024):
        self.decoder, self.prompt, self.policy = decoder, list(prompt), policy
        self.max_new_tokens, self.stop_tokens, self.seed = max_new_tokens, stop_tokens, seed
        self.chunk_seconds, self.max_chunk_steps = chunk_seconds, max_chunk_steps
        self.chunk = max(1, min(first_chunk, max_chunk_steps))
        self.result: DecodeResult | None = None
        self.seconds = 0.0
        self.arrivals: list[tuple[float, int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        began = time.perf_counter()
        state, stop_ids = self.decoder.start([self.prompt], policy=self.policy, max_new_tokens=self.max_new_tokens,
                                             stop_tokens=self.stop_tokens, seed=self.seed)
        emitted, previous = 0, None
        while True:
            snapshot = _snapshot(state.result, state.step)
            # Queued behind the snapshot; after the last chunk it is one no-op loop test.
            state = self.decoder.advance(state, stop_ids, policy=self.policy, max_steps=self.chunk)
            result, step = jax.device_get(snapshot)
            now = time.perf_counter()
            count, step, done = int(result.num_generated_b[0]), int(step), bool(result.done_b[0])
            self.arrivals.append((now - began, count))
            if count > emitted:
                yield result.tokens_bn[0, emitted:count].tolist()
                emitted = count
            if done:
                self.result, self.seconds = result, now - began  # the chunk queued after it does nothing
                return
            if previous is not None:  # size the next chunks from the time per step so far
                per_step = (now - previous[0]) / max(step - previous[1], 1)
                self.chunk = int(np.clip(self.chunk_seconds / max(per_step, 1e-9), 1, self.max_chunk_steps))
            previous = (now, step)


def stream_text(tokenizer: Tokenizer, chunks: Iterable[Sequence[int]], skip_ids: Iterable[int] = ()) -> Iterator[str]:
    """Text pieces of a stream of token chunks; special tokens and `skip_ids` (e.g. the end-of-turn
    token) are left out. The pieces join to `tokenizer.decode(tokens without skip_ids)`.

    Each chunk decodes everything so far (one `decode` per chunk, not per token: cheaper than
    incremental decoding token by token) and hands out what is new, except an incomplete character
    at the end (a replacement character there may be the first bytes of one), which waits for the
    rest of its bytes or for the end of the stream.
    """
    skip, kept, emitted = set(skip_ids), [], ""
    for chunk in chunks:
        kept += [token for token in chunk if token not in skip]
        text = tokenizer.decode(kept).rstrip("\ufffd")
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(kept)
    if len(text) > len(emitted) and text.startswith(emitted):
        yield text[len(emitted):]
