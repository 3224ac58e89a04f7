"""Layer-skip self-speculation (SWIFT, training-free): the base model with some of its layers
skipped drafts a chain of `depth` tokens for itself, one token at a time.

No state of its own: the draft runs over the base's KV cache (`draft`'s `cache`), whose kept
layers' committed K/V are exactly what the skipped model would attend to; the chain's own K/V
go to uncommitted slots of a copy that is dropped after drafting (the verify pass writes every
node's K/V itself). Each draft step costs the kept layers plus the LM head over one token.

Which layers to skip: `skip=` (a list, `skip=3-5+9` on the command line), else the set a search
recorded beside the model (`layerskip.json`, jaxaccel.drafters.layerskip_search), else every
other middle layer. Drafts are argmax tokens, point masses to the verifier: lossless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxaccel.decoding.sampling import greedy_tokens
from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters.protocol import Draft, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.model import run_layers

RECORD_FILE = "layerskip.json"  # in the model directory: the searched skip set
DEFAULT_DEPTH = 3


@dataclass(frozen=True)
class LayerSkip:
    """Drafts a chain of `depth` tokens with the base's layers `skip` left out (None: `default_skip`
    of the base it drafts for, whose layer count is known only then)."""

    skip: tuple[int, ...] | None = None
    depth: int = DEFAULT_DEPTH
    module: None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.skip is not None:
            object.__setattr__(self, "skip", tuple(sorted(set(int(i) for i in self.skip))))
        if self.depth < 1:
            raise ValueError(f"layer skipping needs depth >= 1, got {self.depth}")
        if self.skip and self.skip[0] < 0:
            raise ValueError(f"skipped layers must be >= 0, got {list(self.skip)}")

    @property
    def tree(self) -> Tree:
        return Tree.chain(self.depth)

    def kept(self, num_layers: int) -> tuple[int, ...]:
        """The layers the draft runs (ValueError if the skip set does not fit this base)."""
        skip = default_skip(num_layers) if self.skip is None else self.skip
        if skip and skip[-1] >= num_layers:
            raise ValueError(f"skip={list(skip)}: the base has only {num_layers} layers (0..{num_layers - 1})")
        if len(skip) == num_layers:
            raise ValueError(f"skip={list(skip)} leaves none of the base's {num_layers} layers")
        return tuple(i for i in range(num_layers) if i not in skip)

    def start(self, base, module, prefill: Prefill) -> None:
        self.kept(base.config.num_layers)  # checks the skip set against this base
        return None

    def draft(self, base, module, state, root_b, cache) -> Draft:
        kept = self.kept(base.config.num_layers)
        layers = [base.layers[i] for i in kept]
        sub_cache = cache.replace(layers=tuple(cache.layers[i] for i in kept))
        chain_db = draft_chain(base, layers, sub_cache, root_b, self.depth)
        tokens_bn = jnp.concatenate([root_b[:, None], chain_db.T], axis=1).astype(jnp.int32)
        return Draft(tokens_bn, self.tree.batch(root_b.shape[0]))

    def commit(self, base, module, state, verified: Verified) -> None:
        return None


def draft_chain(base, layers, cache, root_b: jax.Array, depth: int, keep_bl: jax.Array | None = None) -> jax.Array:
    """[depth, B] the argmax chain after `root_b` through `layers` over `cache` (its lengths: the
    root's position). `keep_bl` [B, len(layers)] (the search's gated variant): per row, a layer
    whose gate is off passes its input through, as if skipped."""
    def step(carry, _):
        cache, token_b = carry
        x_b1d = base.embed_tokens(token_b[:, None])
        if keep_bl is None:
            x_b1d, cache, _ = run_layers(layers, x_b1d, cache=cache)
        else:
            x_b1d, cache = gated_layers(layers, x_b1d, cache, keep_bl)
        next_b = greedy_tokens(base.logits(base.norm(x_b1d))[:, 0])
        return (cache.advance(1), next_b), next_b

    _, chain_db = jax.lax.scan(step, (cache, root_b.astype(jnp.int32)), None, length=depth)
    return chain_db


def gated_layers(layers, x_bnd, cache, keep_bl):
    """Every layer, one at a time, keeping its output only in rows whose gate is on."""
    entries = []
    for i, layer in enumerate(layers):
        y_bnd, one, _ = run_layers([layer], x_bnd, cache=cache.replace(layers=(cache.layers[i],)))
        x_bnd = jnp.where(keep_bl[:, i, None, None], y_bnd, x_bnd)
        entries.append(one.layers[0])
    return x_bnd, cache.replace(layers=tuple(entries))


def default_skip(num_layers: int) -> tuple[int, ...]:
    """Without a search: every other layer, leaving the first and last eighth (at least one each) alone."""
    edge = max(1, num_layers // 8)
    return tuple(range(edge, num_layers - edge, 2))


def parse_skip(text: str | int) -> tuple[int, ...]:
    """'3-5+9' (ranges and single layers joined by '+'; ',' separates --drafter options) -> (3, 4, 5, 9)."""
    layers = []
    for part in filter(None, str(text).split("+")):
        lo, dash, hi = part.partition("-")
        try:
            layers += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise ValueError(f"skip={text}: expected layer numbers and ranges joined by '+', like 3-5+9") from None
    return tuple(layers)


def recorded_options(model_dir: str | Path | None) -> dict:
    """The options a search recorded beside the model ({} if none)."""
    path = None if model_dir is None else Path(model_dir) / RECORD_FILE
    if path is None or not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())["result"]
        return {"skip": "+".join(str(i) for i in found["skip"]), "depth": int(found["depth"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a layer-skip search record ({e}); delete it or search again") from None


def make(tree, module, skip=None, depth: int = DEFAULT_DEPTH) -> LayerSkip:
    if tree is not None:
        raise ValueError("layer skipping drafts a chain (option depth=), not --tree")
    return LayerSkip(None if skip is None else parse_skip(skip), depth)


RECORD = DrafterRecord(
    name="layerskip", summary="layer skipping (SWIFT): the base with some layers skipped drafts a chain for itself "
                              "(training-free)",
    make=make, options=("skip", "depth"), recorded_options=recorded_options, composes=True)
