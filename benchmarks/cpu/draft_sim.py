"""What REST + prompt lookup would accept along the model's own greedy answers to Spec-Bench, for
any chain depths, and for depths chosen per step from what the drafters matched: acceptance
without timing anything, to pick what is worth timing.

    PYTHONPATH=. python benchmarks/cpu/draft_sim.py --limit 5 --answers runs/sim/answers.json
    PYTHONPATH=. python benchmarks/cpu/draft_sim.py --heldout 320     # to choose a policy on

At T = 0 a step's output is greedy decoding's whatever is drafted, so the text is fixed: the
model's greedy answer (our AR loop, cached in --answers). At every point of it the drafters'
chains are computed by the drafters themselves (`PromptLookup.chains`, with the n-gram length it
matched; REST's `lookup` on its store), and a step accepts the longest matching prefix of the
chains (the union's trie). A policy picks each step's chain lengths (REST's most frequent
continuation, its second, prompt lookup's) from that n-gram length and from whether the last step
accepted all of prompt lookup's chain; the `share` drafter's split
(`jaxaccel.drafters.share.layouts`) is one of them. Reported per policy: tokens per step (what
`infer.spec_bench` calls mean accepted tokens) and the mean nodes a step verifies (1 + the chains'
lengths). What a step of so many nodes costs is timed elsewhere (`infer.bench --step-costs`,
`infer.spec_bench`). The `bound` rows are no drafter: the fewest steps that cover each answer when a
step may accept the longest of every copy prompt lookup could make and REST's continuations,
chosen knowing the answer, so what no rule drafting from these sources in as many nodes can beat.
Evaluation only: nothing here trains on Spec-Bench.
A policy is chosen with `--heldout N` instead: the model's own greedy answers to N held-out training
prompts (the last shard of each of REST's corpus directories, its store built from the others).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MAX_DEPTH = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=5, help="first N Spec-Bench questions of each category")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--answers", type=Path, help="cache of the greedy answers to Spec-Bench (written if missing)")
    p.add_argument("--heldout", type=int, default=0,
                   help="instead of Spec-Bench: N answers to held-out training prompts (REST's store without them)")
    p.add_argument("--rest-max-ngram", type=int, default=4, help="REST's longest context (its max_ngram)")
    p.add_argument("--pld-max-ngram", type=int, default=3, help="prompt lookup's longest n-gram (its max_ngram)")
    p.add_argument("--out", type=Path, help="write the report here as JSON")
    return p.parse_args(argv)


def greedy_answers(args, model, model_dir):
    """[(subtask, prompt ids, answer ids)], from --answers or decoded and written there."""
    from infer.spec_bench import encode_questions
    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.text import stop_tokens
    from jaxaccel.spec_bench import first_per_category, read_questions, subtask_of

    if args.answers.exists():
        return [tuple(x) for x in json.loads(args.answers.read_text())]
    qs = first_per_category(read_questions(), args.limit)
    prompts, turn_end = encode_questions(qs, model_dir, True)
    stop = sorted(set(stop_tokens(model.config, model_dir)) | set(turn_end))
    decoder = AutoregressiveDecoder(model)
    items = [(subtask_of(q.category), p, decoder.generate([p], max_new_tokens=args.max_new_tokens,
                                                          stop_tokens=stop).sequences()[0])
             for q, p in zip(qs, prompts)]
    args.answers.parent.mkdir(parents=True, exist_ok=True)
    args.answers.write_text(json.dumps(items))
    return items


def heldout_answers(corpus: str, n: int, max_new_tokens: int):
    """(REST's corpus without each directory's last shard, [("held-out", prompt ids, answer ids)]
    for n of that shard's answers, drawn with a fixed seed, cut at max_new_tokens)."""
    shards = [sorted(Path(d).glob("shard-*.jsonl")) for d in corpus.split(os.pathsep)]
    rows = [json.loads(line) for files in shards for line in files[-1].read_text().splitlines()]
    kept = os.pathsep.join(str(f) for files in shards for f in files[:-1])
    pick = sorted(np.random.default_rng(0).permutation(len(rows))[:n])
    return kept, [("held-out", rows[i]["prompt_ids"], rows[i]["response_ids"][:max_new_tokens]) for i in pick]


def positions(prompt, answer):
    """Per step root (answer position t): the text so far [A, L] (NO_TOKEN after) and its length.
    A and L are rounded up (rows past the answer hold its first position), so that the lookups
    compile for a few shapes, not one per answer."""
    from jaxaccel.drafters.common import NO_TOKEN

    text = np.array(list(prompt) + list(answer), np.int32)
    a, size = len(answer), -(-(len(text) + MAX_DEPTH) // 256) * 256
    length_t = len(prompt) + 1 + np.minimum(np.arange(-(-a // 64) * 64), a - 1)
    tokens_tl = np.full((len(length_t), size), NO_TOKEN, np.int32)
    for t in range(len(length_t)):
        tokens_tl[t, :length_t[t]] = text[:length_t[t]]
    return tokens_tl, length_t


def pld_chains(tokens_tl, length_t, max_ngram):
    """[A, MAX_DEPTH] prompt lookup's chain at each root, [A] the longest n-gram it matched (0: none)."""
    from jaxaccel.drafters.pld import LookupState

    chain_trd, ngram_t = _pld_chains(LookupState(jnp.asarray(tokens_tl), jnp.asarray(length_t)), max_ngram)
    return np.asarray(chain_trd)[:, 0], np.asarray(ngram_t)


@functools.partial(jax.jit, static_argnums=1)
def _pld_chains(state, max_ngram):
    from jaxaccel.drafters.pld import PromptLookup

    return PromptLookup(depth=MAX_DEPTH, max_ngram=max_ngram).chains(state)


def rest_chains(stores, tokens_tl, length_t, max_ngram):
    """{depth: [A, 2, depth] REST's two most frequent continuations at each root}."""
    from jaxaccel.drafters.common import NO_TOKEN

    slot_tk = length_t[:, None] - max_ngram + np.arange(max_ngram)
    recent_tk = np.where(slot_tk >= 0, np.take_along_axis(tokens_tl, np.maximum(slot_tk, 0), axis=1), NO_TOKEN)
    return {d: np.asarray(_rest_lookup(store, jnp.asarray(recent_tk))[0]) for d, store in stores.items()}


@jax.jit
def _rest_lookup(store, recent_tk):
    from jaxaccel.drafters.rest_store import lookup

    return lookup(store, recent_tk)


def prefix_match(chain, future) -> int:
    n = 0
    while n < len(chain) and n < len(future) and chain[n] == future[n]:
        n += 1
    return n


def simulate(seq, policy):
    """(tokens, steps, nodes verified) of stepping along one answer under `policy`."""
    answer, pld, pld_n, rest, _ = seq
    t = tokens = steps = nodes = 0
    copied = False  # the last step accepted all of prompt lookup's chain
    while t < len(answer):
        first, second, depth_pld, store = policy(pld_n[t], copied)
        future = answer[t + 1:]
        # REST's chains from the store of `store` tokens (default their own length; 1 reads 2's).
        rest_cd = rest[store or max(first, second, 2)][t]
        copy = prefix_match(pld[t][:depth_pld], future)
        accepted = max(copy, prefix_match(rest_cd[0][:first], future), prefix_match(rest_cd[1][:second], future))
        copied = depth_pld > 0 and copy == depth_pld
        tokens, steps, t = tokens + accepted + 1, steps + 1, t + accepted + 1
        nodes += 1 + first + second + depth_pld
    return tokens, steps, nodes


def best_drafts(seq, depth) -> np.ndarray:
    """[A] at each answer position, the most drafted tokens any of these would have accepted,
    `depth` deep: every copy of the text so far that follows an earlier occurrence of the root
    token (what prompt lookup drafts, for any choice of match and n-gram; a copy that runs into the
    present repeats its period, as prompt lookup's does), and REST's continuations in each store."""
    answer, _, _, rest, prompt = seq
    text = np.asarray(list(prompt) + list(answer))
    best = np.zeros(len(answer), np.int64)
    for t in range(len(answer)):
        root = len(prompt) + t
        future = text[root + 1:root + 1 + depth]
        best[t] = max(prefix_match(list(chain[:depth]), list(future)) for store in rest.values() for chain in store[t])
        ends = np.nonzero(text[:root] == text[root])[0]  # earlier occurrences of the root token
        if len(ends) and len(future):
            period = root - ends[:, None]
            at = ends[:, None] + 1 + np.arange(len(future))
            at -= period * np.maximum(-(-(at - root) // period), 0)
            best[t] = max(best[t], int(np.cumprod(text[at] == future, axis=1).sum(axis=1).max()))
    return best


def simulate_bound(seq, depth):
    """(tokens, steps, nodes verified) of the fewest steps that cover the answer when a step at t
    may accept up to `best_drafts`' count there: chosen knowing the answer, so not a drafter but
    an upper bound on what any choice of chains from these sources, `depth` deep, accepts a step
    (a tree of depth + 1 nodes accepts one root-to-leaf chain, so no more either)."""
    reach = best_drafts(seq, depth)
    steps = np.zeros(len(reach) + 1, np.int64)
    for t in reversed(range(len(reach))):  # accepting a drafts moves the root from t to t + a + 1
        steps[t] = 1 + steps[t + 1:t + 2 + reach[t]].min()
    return len(reach), int(steps[0]), int(steps[0]) * (1 + depth)


def static(depth_rest, depth_pld):
    return lambda pld_n, copied: (depth_rest, 0, depth_pld, None)


@dataclass(frozen=True)
class Bound:
    depth: int  # see simulate_bound


def gated(deep_pld, min_n, small=(2, 2), rest_then=None):
    """A `deep_pld` prompt-lookup chain (beside a REST chain of `rest_then`, default small's) where
    prompt lookup matched at least `min_n` tokens, else `small`."""
    rest_then = small[0] if rest_then is None else rest_then
    return lambda pld_n, copied: (rest_then, 0, deep_pld, None) if pld_n >= min_n else (small[0], 0, small[1], None)


def shared(nodes):
    """The share drafter's split of `nodes` (REST's chains read from its one store, as it does)."""
    from jaxaccel.drafters.share import Share

    drafter = Share(nodes=nodes)
    table, store = drafter.table, drafter.rest.depth
    return lambda pld_n, copied: (*map(int, table[pld_n]), store)


def streak(nodes, deep_pld, min_n=1):
    """share(nodes), but prompt lookup's chain alone `deep_pld` deep where the last step accepted all
    of its chain and it matched at least `min_n` tokens again: text that repeats itself, copied far."""
    share = shared(nodes)
    return lambda pld_n, copied: (0, 0, deep_pld, None) if copied and pld_n >= min_n else share(pld_n, copied)


POLICIES = {
    "rest 2 + pld 2 (5 nodes)": static(2, 2),
    "rest 2 + pld 3": static(2, 3),
    "rest 3 + pld 2": static(3, 2),
    "rest 1 + pld 4": static(1, 4),
    "rest 3 + pld 3": static(3, 3),
    "rest 2 + pld 4": static(2, 4),
    "rest 1 + pld 2": static(1, 2),
    "rest 2 + pld 1": static(2, 1),
    "rest 2": static(2, 0),
    "pld 2": static(0, 2),
    # Six nodes every step, shared out by what the drafters matched.
    "pld 5 if 3-gram, else rest 2 + pld 3": gated(5, 3, (2, 3), rest_then=0),
    "rest 1 + pld 4 if 3-gram, else rest 2 + pld 3": gated(4, 3, (2, 3), rest_then=1),
    "rest 1 + pld 4 if 2-gram, else rest 2 + pld 3": gated(4, 2, (2, 3), rest_then=1),
    "rest 4 + pld 1 if no 2-gram, else rest 2 + pld 3": gated(3, 2, (4, 1), rest_then=2),
    "rest 3 + pld 2 if no 2-gram, else rest 2 + pld 3": gated(3, 2, (3, 2), rest_then=2),
    "share (6 nodes): pld 5 if 3-gram, rest 3 + its second 2 if none, else rest 2 + pld 3": shared(6),
    "share (5 nodes)": shared(5),
    "share (7 nodes)": shared(7),
    "share (8 nodes)": shared(8),
    # Upper bounds: the best copy, chosen knowing the answer (a chain of depth + 1 nodes).
    "bound: any copy from the text or REST, 5 deep (6 nodes)": Bound(5),
    "bound: any copy from the text or REST, 7 deep (8 nodes)": Bound(7),
    # More nodes where prompt lookup matched.
    "share, but pld 11 (12 nodes) after a step that copied all of its chain": streak(6, 11),
    "share, but pld 15 (16 nodes) after a step that copied all of its chain": streak(6, 15),
    "share, but pld 11 after a whole copy and a 3-gram": streak(6, 11, 3),
    "share, but pld 15 after a whole copy and a 3-gram": streak(6, 15, 3),
    "pld 8 if 3-gram, else rest 2 + pld 2": gated(8, 3),
    "pld 6 if 3-gram, else rest 2 + pld 3": gated(6, 3, (2, 3)),
}


def main(argv=None) -> int:
    from jaxaccel.drafters.rest import _store, recorded_options
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model

    args = parse_args(argv)
    model_dir = resolve_model(args.model)
    model = load_hf(model_dir)
    corpus = recorded_options(model_dir)["corpus"]
    if args.heldout:
        corpus, items = heldout_answers(corpus, args.heldout, args.max_new_tokens)
    elif args.answers:
        items = greedy_answers(args, model, model_dir)
    else:
        raise SystemExit("draft_sim.py needs --answers FILE (Spec-Bench) or --heldout N")
    max_ngram = args.rest_max_ngram
    stores = {d: _store(corpus, max_ngram, d, 2, model.config.vocab_size) for d in (2, 3, 4, 5)}
    seqs = []
    for subtask, prompt, answer in items:
        tokens_tl, length_t = positions(prompt, answer)
        pld, pld_n = pld_chains(tokens_tl, length_t, args.pld_max_ngram)
        rest = rest_chains(stores, tokens_tl, length_t, max_ngram)
        seqs.append((subtask, (answer, pld, pld_n, rest, prompt)))
    subtasks = sorted({s for s, _ in seqs})
    matched = np.concatenate([seq[2][:len(seq[0])] for _, seq in seqs])
    print("prompt lookup matched, share of answer positions:",
          ", ".join(f"{n}-gram {np.mean(matched == n):.2f}" for n in range(args.pld_max_ngram + 1)))
    report = {"command": "python benchmarks/cpu/draft_sim.py " + " ".join(argv or sys.argv[1:]),
              "questions": len(seqs), "rows": []}
    print("| policy | " + " | ".join(subtasks) + " | overall tokens/step | nodes/step |")
    print("|---|" + "---:|" * (len(subtasks) + 2))
    for name, policy in POLICIES.items():
        runs = {s: np.zeros(3) for s in subtasks}
        for subtask, seq in seqs:
            runs[subtask] += simulate_bound(seq, policy.depth) if isinstance(policy, Bound) else simulate(seq, policy)
        total = sum(runs.values())
        row = {"policy": name, "tokens_per_step": {s: r[0] / r[1] for s, r in runs.items()},
               "overall_tokens_per_step": total[0] / total[1], "nodes_per_step": total[2] / total[1]}
        report["rows"].append(row)
        print(f"| {name} | " + " | ".join(f"{row['tokens_per_step'][s]:.2f}" for s in subtasks) +
              f" | {row['overall_tokens_per_step']:.2f} | {row['nodes_per_step']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
