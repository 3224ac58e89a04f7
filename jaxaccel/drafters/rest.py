"""REST (training-free): draft what the model's own answers most often wrote after the last words.

State: the datastore (jaxaccel.drafters.rest_store: for each context of 1..max_ngram tokens, its
`branches` most frequent continuations of `depth` tokens, counted over a corpus of the model's own
answers) and the row's last max_ngram tokens (the root last). Each step looks up the longest of
those contexts the store holds and drafts its continuations as chains below the root (distinct
first tokens); nothing found: the chains carry token 0 and are simply rejected. Where prompt lookup
copies the text at hand, REST copies the model's habits (its phrasing, its formats), so the two
draft different tokens and compose well: `--drafter rest+pld`.

The store is built once per decoder from `corpus` (the `response_ids` of train.responses' shards;
for a model whose greedy answers are committed under data/distill/, found by the model's
fingerprint) and reaches the compiled loop as the drafter's carried pytree (the protocol's
`carry`), unchanged from call to call: arrays, not constants baked into the program.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import struct

from jaxaccel.drafters.common import chain_index, chains
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.drafters.rest_store import NO_TOKEN, Store, build_store, lookup, read_corpus

DISTILL_DIR = Path(__file__).resolve().parents[2] / "data" / "distill"


@struct.dataclass
class RestState:
    store: Store
    recent_bk: jax.Array  # [B, max_ngram] int32: the last tokens written (the root last), NO_TOKEN before the text


@dataclass(frozen=True)
class Rest:
    """`branches` chains of `depth` tokens from the datastore over `corpus` (paths joined by os.pathsep)."""

    corpus: str = ""
    depth: int = 2
    branches: int = 1
    max_ngram: int = 4
    module: None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.depth < 1 or self.branches < 1 or self.max_ngram < 1:
            raise ValueError(f"rest needs depth, branches and max_ngram >= 1, got {self}")

    @property
    def tree(self):
        return chains(self.branches, self.depth)

    def empty_carry(self, base) -> Store:
        """The datastore (built once per corpus and settings in a process)."""
        if not self.corpus:
            raise ValueError("the rest drafter needs a corpus of the model's own answers: rest:corpus=DIR "
                             "(train.responses shards; found by itself for a model whose answers are "
                             f"committed under {DISTILL_DIR})")
        return _store(self.corpus, self.max_ngram, self.depth, self.branches, base.config.vocab_size)

    def carry(self, state: RestState) -> Store:
        return state.store

    def start(self, base, module, prefill: Prefill, carried: Store | None = None) -> RestState:
        if carried is None:
            raise ValueError("the rest drafter starts from its datastore: decode through SpeculativeDecoder")
        b = prefill.tokens_bs.shape[0]
        # The last max_ngram tokens of prompt + first token.
        tokens_bs = jnp.concatenate([prefill.tokens_bs, jnp.zeros((b, 1), prefill.tokens_bs.dtype)], axis=1)
        tokens_bs = tokens_bs.at[jnp.arange(b), prefill.lengths_b].set(prefill.first_b).astype(jnp.int32)
        slot_bk = prefill.lengths_b[:, None] + 1 - self.max_ngram + jnp.arange(self.max_ngram)
        recent_bk = jnp.take_along_axis(tokens_bs, jnp.maximum(slot_bk, 0), axis=1)
        return RestState(store=carried, recent_bk=jnp.where(slot_bk >= 0, recent_bk, NO_TOKEN))

    def draft(self, base, module, state: RestState, root_b, cache) -> Draft:
        drafts_bcd, _ = lookup(state.store, state.recent_bk)
        branch_n, level_n = chain_index(self.branches, self.depth)
        tokens_bn = jnp.concatenate([root_b[:, None], drafts_bcd[:, branch_n, level_n]], axis=1).astype(jnp.int32)
        return Draft(tokens_bn, self.tree.batch(root_b.shape[0]))

    def commit(self, base, module, state: RestState, verified: Verified) -> RestState:
        emitted_bd, count_b = verified.emitted_bd, verified.verdict.num_nodes_b
        joined_bx = jnp.concatenate([state.recent_bk, emitted_bd.astype(jnp.int32)], axis=1)
        slot_bk = count_b[:, None] + jnp.arange(self.max_ngram)  # the window ending at the new root
        return RestState(store=state.store, recent_bk=jnp.take_along_axis(joined_bx, slot_bk, axis=1))


@functools.lru_cache(maxsize=4)
def _store(corpus: str, max_ngram: int, depth: int, branches: int, vocab_size: int) -> Store:
    store, _ = build_store(read_corpus(corpus.split(os.pathsep)), max_ngram=max_ngram, depth=depth,
                           branches=branches, vocab_size=vocab_size)
    return store


def recorded_options(model_dir) -> dict:
    """corpus: the committed greedy answers of the model in model_dir (matched by its fingerprint), if any."""
    if model_dir is None or not DISTILL_DIR.is_dir():
        return {}
    from jaxaccel.heads.io import base_fingerprint

    fingerprint, found = None, []
    for config in sorted(DISTILL_DIR.glob("*/*/config.json")):
        settings = json.loads(config.read_text()).get("settings", {})
        if "base" not in settings or settings.get("temperature", 0) != 0:
            continue  # greedy answers only: the text a T = 0 decode repeats
        fingerprint = fingerprint or base_fingerprint(model_dir)
        if settings["base"] == fingerprint:
            found.append(str(config.parent))
    return {"corpus": os.pathsep.join(found)} if found else {}


def make(tree, module, **options) -> Rest:
    if tree is not None:
        raise ValueError("rest lays out its own tree (options depth= and branches=), not --tree")
    return Rest(**options)


RECORD = DrafterRecord(
    name="rest", summary="REST: continue the last words as the model's own answers most often did (training-free)",
    make=make, options=("corpus", "depth", "branches", "max_ngram"), recorded_options=recorded_options,
    composes=True)
