"""The speculative rows of `infer.bench`: ar vs each heads directory and drafter, and `--tune-tree`.

    python -m infer.bench --model runs/small/model --heads runs/small/heads/medusa --heads ... --out DIR
    python -m infer.bench --model smollm2-135m-instruct --drafter pld --drafter recycling
    python -m infer.bench --model runs/small/model --heads runs/small/heads/eagle --tune-tree

Each test-split prompt is decoded at batch 1 by our autoregressive loop and by the speculative
loop with each heads directory, at each temperature, in the same run on the same weights.
Rows: tokens/s, mean accepted tokens (tokens per forward pass, the base's own token counted),
speedup vs ar, and at T = 0 whether every token equals ar's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TUNE_SIZES = (2, 4, 8, 16, 24, 32, 48, 64)
TUNE_MAX_RANK = 8
TUNE_AUTOREGRESSIVE_DEPTH = 6  # how deep trees may grow for heads not bound to one head per level (eagle, eagle3)


def resolve_tree(spec: str | None, heads_dir: Path | None, heads):
    """--tree: None/'default' (the drafter's default), 'chain' (as deep as the heads), 'auto'
    (tuned, saved with the heads), 'dynamic' or 'dynamic:TOPK,DEPTH,NODES' (EAGLE-2, drafters
    that grow their own), or a JSON file. Without heads (a training-free drafter) 'chain' and
    'auto' are errors."""
    from jaxaccel.decoding.tree import DynamicTree, Tree

    if spec in (None, "default"):
        return None
    if spec in ("chain", "auto") and heads is None:
        raise ValueError(f"--tree {spec} needs --heads; a drafter without heads takes default, dynamic or FILE.json")
    if spec == "chain":
        return Tree.chain(heads.config.num_heads)
    if spec.startswith("dynamic"):
        fields = spec.partition(":")[2]
        try:
            return DynamicTree(*(int(x) for x in fields.split(","))) if fields else DynamicTree()
        except (TypeError, ValueError) as e:
            raise ValueError(f"--tree {spec}: expected dynamic or dynamic:TOPK,DEPTH,NODES ({e})") from None
    path = heads_dir / "tree.json" if spec == "auto" else Path(spec)
    if not path.is_file():
        hint = f"; run `python -m infer.bench --model MODEL --heads {heads_dir} --tune-tree` first" if spec == "auto" else ""
        raise FileNotFoundError(f"no tree file {path}{hint}")
    return Tree.load(path)


def time_prompts(decoder, prompts, *, policy, max_new_tokens: int, stop, repeats: int) -> dict:
    """Each prompt alone (batch 1): total tokens over total time, tokens per forward pass."""
    from jaxaccel.decoding.timing import time_decode

    decoder.compile([prompts[0]], policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop)
    seconds = tokens = passes = 0
    sequences = []
    for prompt in prompts:
        run = time_decode(decoder, [prompt], policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop,
                          repeats=repeats)
        seconds += run["total_s"]
        tokens += run["tokens"]
        passes += int(run["result"].num_steps_b.sum())
        sequences += run["result"].sequences()
    return {"tokens_per_s": tokens / seconds, "mean_accepted_tokens": tokens / passes, "tokens": tokens,
            "seconds": seconds, "sequences": sequences}


def make_decoders(model, model_dir: Path, heads_dirs: list[Path], tree_specs,
                  drafter_specs=()) -> dict[str, tuple[object, dict]]:
    """Method name -> (decoder, info), "ar" first; info: num_nodes, depth, heads, tree, drafter ({}
    for ar). One decoder per (heads directory, tree spec), then one per --drafter spec
    ('pld', 'recycling:...': training-free, their default trees) and, for a drafter that composes
    with heads, one per heads directory, static tree spec and drafter spec (the union tree).
    Among several tree specs, a dynamic one is skipped for heads whose drafter cannot grow one (alone, it is the error it
    would be in infer.generate)."""
    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.speculative import SpeculativeDecoder
    from jaxaccel.drafters import get_record, make_drafter
    from jaxaccel.drafters.registry import composes
    from jaxaccel.heads import load_heads
    from jaxaccel.pretrained.shipped_heads import resolve_heads

    decoders = {"ar": (AutoregressiveDecoder(model), {})}
    heads_dirs = resolve_heads(heads_dirs, model_dir)  # 'auto': the heads shipped for this model

    def add(name, drafter, info):
        if name in decoders:
            name = f"{name} [{info.get('heads') or info['drafter']}]"
        decoders[name] = (SpeculativeDecoder(model, drafter), {"num_nodes": drafter.tree.num_nodes,
                                                               "depth": drafter.tree.depth, **info})

    loaded = {}
    for heads_dir in heads_dirs:
        heads = loaded[heads_dir] = load_heads(heads_dir, model_dir)
        kind = heads.config.kind
        for tree_spec in tree_specs:
            if len(tree_specs) > 1 and not get_record(kind).dynamic_trees and (tree_spec or "").startswith("dynamic"):
                continue  # dynamic trees are EAGLE-2's: in a list of trees they apply to heads that grow them
            drafter = make_drafter(heads=heads, tree=resolve_tree(tree_spec, heads_dir, heads))
            add(kind if len(tree_specs) == 1 else f"{kind} ({tree_spec or 'default'})", drafter,
                {"heads": str(heads_dir), "tree": tree_spec or "default", "drafter": kind})
    # The unions take each of the heads' static trees (a tuned one included); a grown (dynamic)
    # tree does not compose.
    static_specs = [t for t in tree_specs if not (t or "").startswith("dynamic")] or [None]
    for spec in drafter_specs:
        add(spec, make_drafter(spec, model_dir=model_dir), {"drafter": spec, "tree": "default"})
        for heads_dir, heads in loaded.items() if composes(spec) else ():
            for tree_spec in static_specs:  # the heads' tree and the drafter's branches, verified together
                kind = heads.config.kind if len(static_specs) == 1 else f"{heads.config.kind} ({tree_spec or 'default'})"
                name = f"{kind}+{spec}"
                add(name, make_drafter(spec, heads=heads, tree=resolve_tree(tree_spec, heads_dir, heads),
                                       model_dir=model_dir),
                    {"heads": str(heads_dir), "tree": tree_spec or "default", "drafter": name})
    return decoders


def speculative_report(model, model_dir: Path, heads_dirs: list[Path], prompts, *, tree_specs, temperatures,
                       max_new_tokens: int, repeats: int, seed: int, stop: list[int] | None = None,
                       drafter_specs=()) -> dict:
    """Rows for ar, every (heads directory, tree spec) pair and every drafter spec (see
    `make_decoders`); `tree_specs`: --tree values (a list; [None] for each kind's default);
    `stop`: stop ids (default: the model's EOS)."""
    from jaxaccel.decoding import make_policy
    from jaxaccel.decoding.text import stop_tokens

    stop = stop_tokens(model.config, model_dir) if stop is None else stop
    decoders = make_decoders(model, model_dir, heads_dirs, tree_specs, drafter_specs)
    rows = []
    for temperature in temperatures:
        policy = make_policy(temperature)
        runs = {name: time_prompts(d, prompts, policy=policy, max_new_tokens=max_new_tokens, stop=stop,
                                   repeats=repeats) for name, (d, _) in decoders.items()}
        for name, run in runs.items():
            rows.append({"method": name, "temperature": temperature, "tokens_per_s": run["tokens_per_s"],
                         "mean_accepted_tokens": run["mean_accepted_tokens"],
                         "speedup_vs_ar": run["tokens_per_s"] / runs["ar"]["tokens_per_s"],
                         "identical_to_ar": run["sequences"] == runs["ar"]["sequences"] if temperature == 0 else None,
                         **decoders[name][1]})
    return {"rows": rows, "num_prompts": len(prompts), "max_new_tokens": max_new_tokens}


def speculative_markdown(report: dict, header: str) -> str:
    lines = [header, "", "| method | T | tokens/s | mean accepted tokens | speedup vs ar | identical to ar | tree nodes |",
             "|---|---:|---:|---:|---:|:---:|---:|"]
    for r in report["rows"]:
        same = "" if r["identical_to_ar"] is None else ("yes" if r["identical_to_ar"] else "**no**")
        lines.append(f"| {r['method']} | {r['temperature']:g} | {r['tokens_per_s']:.1f} | "
                     f"{r['mean_accepted_tokens']:.2f} | {r['speedup_vs_ar']:.2f}x | {same} | {r.get('num_nodes', '')} |")
    return "\n".join(lines) + "\n"


def tune_tree(model, model_dir: Path, heads_dir: Path, tuning_prompts, timing_prompt, *, max_new_tokens: int) -> dict:
    """Measures acceptance (`tuning_prompts`: never evaluated on) and step cost per tree size on this device;
    saves the best tree as heads_dir/tree.json (what `--tree auto` loads) with the table beside it."""
    import jax

    from jaxaccel.decoding import AutoregressiveDecoder
    from jaxaccel.decoding.speculative import SpeculativeDecoder
    from jaxaccel.decoding.tune import choose_tree, draft_ranks, tree_from_ranks
    from jaxaccel.drafters import get_record
    from jaxaccel.heads import load_heads

    heads = load_heads(heads_dir, model_dir)
    depth = heads.config.num_heads if get_record(heads.config.kind).depth_per_head else TUNE_AUTOREGRESSIVE_DEPTH
    continuations = AutoregressiveDecoder(model).generate(tuning_prompts, max_new_tokens=max_new_tokens).sequences()
    width = max(len(p) + len(c) for p, c in zip(tuning_prompts, continuations))
    tokens_bt = np.zeros((len(tuning_prompts), width), np.int32)
    for row, (p, c) in zip(tokens_bt, zip(tuning_prompts, continuations)):
        row[:len(p) + len(c)] = p + c
    ranks = draft_ranks(model, heads, tokens_bt, np.array([len(p) for p in tuning_prompts]),
                        np.array([len(p) + len(c) for p, c in zip(tuning_prompts, continuations)]), depth, TUNE_MAX_RANK)
    seconds = {}
    for n in TUNE_SIZES:
        tree = tree_from_ranks(ranks, n, TUNE_MAX_RANK)
        if tree.num_nodes in seconds:
            continue
        seconds[tree.num_nodes] = SpeculativeDecoder(model, heads, tree).step_seconds([timing_prompt])
    best, table = choose_tree(ranks, seconds, TUNE_MAX_RANK)
    best.save(heads_dir / "tree.json")
    rows = [{k: v for k, v in row.items() if k != "tree"} for row in table]
    report = {"heads": str(heads_dir), "device": str(jax.devices()[0]), "positions": int(len(ranks)),
              "chosen_num_nodes": best.num_nodes, "table": rows}
    from jaxaccel.files import write_report

    write_report(heads_dir, "tree_tuning", report)
    return report
