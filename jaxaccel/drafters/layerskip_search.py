"""Choosing which layers the layer-skip drafter skips (SWIFT's layer-set search, offline).

The objective is tokens per unit of step cost: mean accepted tokens per verify pass (measured by
speculative decoding at T = 0 on a few prompts) over the step's modelled cost, in base 1-token
forward passes: verify over depth + 1 tokens (measured once) + depth draft steps, each costing
the LM head plus the kept layers' share of the weights (decoding one token reads every weight:
memory-bound on CPU). Candidates are scored many at a time: `GatedLayerSkip` runs every layer
but keeps a layer's output only in rows whose gate is on, so one compilation scores a batch of
skip sets (rows = sets x prompts). The search: the default set, random sets and middle blocks,
then rounds of one-layer changes (add, drop, swap) around the best so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.decoding.tree import Tree
from jaxaccel.drafters.layerskip import default_skip, draft_chain
from jaxaccel.drafters.protocol import Draft, Prefill, Verified


@dataclass(frozen=True)
class GatedLayerSkip:
    """The layer-skip chain with the skip set per row as state (keep_bl [B, layers]), for scoring.
    `start` keeps every layer; the search sets the gates in the loop's state before decoding."""

    depth: int
    module: None = field(default=None, compare=False, repr=False)

    @property
    def tree(self) -> Tree:
        return Tree.chain(self.depth)

    def start(self, base, module, prefill: Prefill) -> jax.Array:
        return jnp.ones((prefill.tokens_bs.shape[0], base.config.num_layers), bool)

    def draft(self, base, module, keep_bl, root_b, cache) -> Draft:
        chain_db = draft_chain(base, list(base.layers), cache, root_b, self.depth, keep_bl=keep_bl)
        tokens_bn = jnp.concatenate([root_b[:, None], chain_db.T], axis=1).astype(jnp.int32)
        return Draft(tokens_bn, self.tree.batch(root_b.shape[0]))

    def commit(self, base, module, keep_bl, verified: Verified) -> jax.Array:
        return keep_bl


def draft_step_cost(model, skip) -> float:
    """One draft step's cost relative to a base 1-token step: LM head + kept layers, by weight count."""
    def size(tree) -> int:
        return sum(x.size for x in jax.tree.leaves(tree))

    layer_sizes = [size(nnx.state(layer)) for layer in model.layers]
    head = model.config.vocab_size * model.config.hidden_size
    kept = sum(s for i, s in enumerate(layer_sizes) if i not in set(skip))
    return (head + kept) / (head + sum(layer_sizes))


def verify_cost(model, depth: int, repeats: int = 15) -> float:
    """A base forward over depth + 1 new tokens (one row, after a 64-token cache) relative to over 1:
    the fastest of `repeats` runs of each, interleaved (other work on the machine only adds time)."""
    from jaxaccel.cache import KVCache

    cache = KVCache.create(model.config, 1, 64 + depth + 1).advance(jnp.int32(64))

    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens, cache):
        return nnx.merge(graphdef, params).forward(tokens, cache=cache).logits

    def seconds(n: int) -> float:
        tokens = jnp.zeros((1, n), jnp.int32)
        t0 = time.perf_counter()
        forward(params, tokens, cache).block_until_ready()
        return time.perf_counter() - t0

    seconds(1), seconds(depth + 1)  # compiles
    times = np.array([[seconds(1), seconds(depth + 1)] for _ in range(repeats)])
    return float(times[:, 1].min() / times[:, 0].min())


class Scorer:
    """Mean accepted tokens of many skip sets at once: rows = sets x prompts, one compilation."""

    def __init__(self, model, prompts: list[list[int]], *, depth: int, sets_per_batch: int, max_new_tokens: int):
        from jaxaccel.decoding.speculative import SpeculativeDecoder

        self.prompts, self.sets_per_batch, self.max_new_tokens = prompts, sets_per_batch, max_new_tokens
        self.num_layers = model.config.num_layers
        self.decoder = SpeculativeDecoder(model, GatedLayerSkip(depth))

    def __call__(self, skip_sets: list[tuple[int, ...]]) -> list[float]:
        scores = []
        for at in range(0, len(skip_sets), self.sets_per_batch):
            scores += self._batch(skip_sets[at:at + self.sets_per_batch])
        return scores

    def _batch(self, skip_sets) -> list[float]:
        padded = list(skip_sets) + [skip_sets[0]] * (self.sets_per_batch - len(skip_sets))
        keep_sl = np.ones((len(padded), self.num_layers), bool)
        for s, skip in enumerate(padded):
            keep_sl[s, list(skip)] = False
        rows = [p for _ in padded for p in self.prompts]
        state, stop_ids = self.decoder.start(rows, policy=_greedy(), max_new_tokens=self.max_new_tokens)
        state = state.replace(draft=jnp.asarray(np.repeat(keep_sl, len(self.prompts), axis=0)))
        result = jax.device_get(self.decoder.finish(state, stop_ids, policy=_greedy()).result)
        tokens_s = np.asarray(result.num_generated_b).reshape(len(padded), -1).sum(axis=1)
        # The prefill's token is no verify pass's: count passes and tokens after it.
        passes_s = np.asarray(result.num_steps_b).reshape(len(padded), -1).sum(axis=1) - len(self.prompts)
        return [float(t - len(self.prompts)) / max(int(p), 1) for t, p in zip(tokens_s, passes_s)][:len(skip_sets)]


def _greedy():
    from jaxaccel.decoding.sampling import Greedy

    return Greedy()


def search_skip(model, prompts: list[list[int]], *, depth: int, rounds: int = 4, sets_per_batch: int = 16,
                max_new_tokens: int = 32, seed: int = 0, verify: float | None = None, log=print) -> dict:
    """The skip set with the most accepted tokens per unit of step cost (module doc): a dict with
    `skip`, `depth`, `mean_accepted_tokens`, `step_cost`, `objective` (tokens per base 1-token
    step: above 1, faster than plain decoding in this model of costs), `skip_nothing` (the same
    for the base drafting for itself: every draft accepted, the reference) and the candidates tried.
    `verify`: the verify pass's cost relative to a 1-token pass (None: measured here)."""
    num_layers = model.config.num_layers
    edge = max(1, num_layers // 8)
    middle = list(range(edge, num_layers - edge))
    if not middle:
        raise ValueError(f"a model of {num_layers} layers has no middle layers to skip")
    rng = np.random.default_rng(seed)
    scorer = Scorer(model, prompts, depth=depth, sets_per_batch=sets_per_batch, max_new_tokens=max_new_tokens)
    verify = verify_cost(model, depth) if verify is None else verify
    log(f"verify over {depth + 1} tokens costs {verify:.2f} 1-token passes")
    tried: dict[tuple[int, ...], dict] = {}

    def score(candidates) -> None:
        fresh = list(dict.fromkeys(tuple(sorted(c)) for c in candidates if tuple(sorted(c)) not in tried))
        for skip, accepted in zip(fresh, scorer(fresh) if fresh else []):
            cost = verify + depth * draft_step_cost(model, skip)
            tried[skip] = {"skip": list(skip), "mean_accepted_tokens": accepted, "step_cost": cost,
                           "objective": accepted / cost}

    def best() -> tuple[int, ...]:
        # Skipping nothing accepts every draft but drafts at a full step's cost: scored as the
        # reference, never chosen.
        return max((s for s in tried if s), key=lambda s: tried[s]["objective"])

    def top(k: int) -> str:
        ranked = sorted(tried.values(), key=lambda t: -t["objective"])[:k]
        return "; ".join(f"skip {t['skip']}: {t['mean_accepted_tokens']:.2f} tokens/pass, "
                         f"{t['objective']:.3f} tokens/cost" for t in ranked)

    first = [default_skip(num_layers), ()]
    first += [tuple(middle[len(middle) // 2 - k // 2:][:k]) for k in (len(middle) // 4, len(middle) // 2)]
    while len(first) < sets_per_batch:
        k = int(rng.integers(1, len(middle) + 1))
        first.append(tuple(rng.choice(middle, k, replace=False).tolist()))
    score(first)
    log(f"round 0: {top(3)}")
    for r in range(1, rounds + 1):
        center = set(best())
        moves = [center | {i} for i in middle if i not in center] + [center - {i} for i in center]
        moves += [(center - {i}) | {j} for i in center for j in middle if j not in center]
        moves = [m for m in moves if m and tuple(sorted(m)) not in tried]
        if not moves:
            break
        picks = rng.permutation(len(moves))[:sets_per_batch]
        before = best()
        score([moves[i] for i in picks])
        log(f"round {r}: {top(3)}")
        if best() == before and len(moves) <= sets_per_batch:
            break  # every neighbour was scored and none is better
    return {**tried[best()], "depth": depth, "verify_cost": verify, "skip_nothing": tried[()],
            "tried": sorted(tried.values(), key=lambda t: -t["objective"])}
