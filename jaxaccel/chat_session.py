"""A multi-turn chat over a decoder: the conversation re-rendered through the chat template each turn,
the answer streamed as the jitted loop decodes it.

    session = ChatSession(AutoregressiveDecoder(model), ChatTemplate.from_model_dir(model_dir))
    for piece in session.reply("Hi!"):
        print(piece, end="", flush=True)
    session.last        # TurnStats: tokens, seconds, tokens_per_s, mean_accepted_tokens

Each turn prefills the whole conversation again (no cache is kept between turns). When the
conversation no longer fits the model's context, its oldest exchanges are dropped (a system message
stays).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from jaxaccel.chat import ChatTemplate
from jaxaccel.decoding.prompts import bucket_length
from jaxaccel.decoding.sampling import Greedy, Policy
from jaxaccel.decoding.stream import TokenStream, stream_text, warm_up


@dataclass(frozen=True)
class TurnStats:
    """One answer: its tokens (end-of-turn included), decode seconds (prefill included, compilation
    excluded), and what the stream saw: (seconds, tokens so far) after each chunk."""
    tokens: list[int]
    seconds: float
    mean_accepted_tokens: float
    arrivals: list[tuple[float, int]]

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


class ChatSession:
    """A conversation with one model: `reply(text)` streams the answer and records it in the history."""

    def __init__(self, decoder, template: ChatTemplate, *, system: str | None = None, policy: Policy = Greedy(),
                 max_new_tokens: int = 256, stop_tokens: Sequence[int] = (), seed: int = 0,
                 log: Callable[[str], None] | None = None):
        self.decoder, self.template, self.system, self.policy = decoder, template, system, policy
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.stop_tokens = sorted({*stop_tokens, *template.stop_ids})
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.context = decoder.config.max_position_embeddings
        self.messages: list[dict[str, str]] = []
        self.turns = 0
        self.last: TurnStats | None = None
        self._compiled: set[int] = set()
        self._chunk = 1  # steps per streamed chunk, carried from turn to turn

    def reset(self) -> None:
        """Forgets the conversation (the system message stays)."""
        self.messages = []

    def prompt_ids(self) -> list[int]:
        """The conversation so far, rendered up to the assistant's turn, cut to fit: oldest exchanges
        first (ValueError if the last message alone does not fit)."""
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        while True:
            ids = self.template.encode(head + self.messages)
            if len(ids) + self.max_new_tokens <= self.context:
                return ids
            if len(self.messages) <= 1:
                raise ValueError(f"the message is too long: {len(ids)} tokens + {self.max_new_tokens} new ones do "
                                 f"not fit in the model's context of {self.context}")
            self.messages = self.messages[2:]  # the oldest user message and its answer

    def reply(self, text: str) -> Iterator[str]:
        """Streams the answer to a user message as text pieces; afterwards it is in the history and
        `last` holds its statistics. A message that cannot be answered is taken back (ValueError)."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.prompt_ids()
        except ValueError:
            self.messages.pop()
            raise
        kw = dict(policy=self.policy, max_new_tokens=self.max_new_tokens, stop_tokens=self.stop_tokens)
        bucket = bucket_length(len(prompt))
        if bucket not in self._compiled:  # so that the turn's tokens/s excludes compilation
            self.log(f"(compiling for conversations up to {min(bucket, self.context)} tokens)")
            warm_up(self.decoder, prompt, **kw)
            self._compiled.add(bucket)
        stream = TokenStream(self.decoder, prompt, seed=self.seed + self.turns, first_chunk=self._chunk, **kw)
        pieces = []
        for piece in stream_text(self.template.tokenizer, stream, skip_ids=self.template.stop_ids):
            pieces.append(piece)
            yield piece
        tokens, self._chunk = stream.result.sequences()[0], stream.chunk
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.turns += 1
        self.last = TurnStats(tokens, stream.seconds, stream.result.mean_accepted_tokens(), stream.arrivals)
