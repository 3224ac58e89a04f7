"""The shared parts of the feature-cache head trainers' CLIs (train.eagle3, train.hydra): their
common flags and one run over cached features (jaxaccel.training.feature_cache).

    OUT/draft_vocab.npy             d2t, fixed at the run's first start (absent over the whole vocabulary)
    OUT/checkpoints/                orbax train states: rerun the same command to resume (--steps may grow)
    OUT/metrics.jsonl, tb/          loss and per-depth top-1 per step
    OUT/heads.safetensors, heads_config.json, eval.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from jaxaccel.training.prompts import HOLDOUT_MOD
from train.common import Progress


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A trainer's parser with the flags every feature-cache trainer takes first: the base, the
    features, the output directory and the draft vocabulary."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model directory or model name")
    p.add_argument("--features", type=Path, nargs="+", required=True,
                   help="train.features output directories (more than one: the first's held-out answers are "
                        "evaluated on, the others' are skipped)")
    p.add_argument("--out", type=Path, required=True, help="heads directory (created; rerun to resume)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size N (0: the whole vocabulary)")
    return p


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """--no-progress and --no-eval (skip the held-out evaluation)."""
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")


def add_training_flags(p: argparse.ArgumentParser, depth_decay_help: str) -> None:
    """The training hyper-parameters, last (jaxaccel.training.feature_cache.FeatureTrainConfig's:
    `train_config` reads them back), and guarded_main's --distributed."""
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)  # guarded_main's flag
    hp = p.add_argument_group("training")
    for flag, typ, default, what in [
        ("--steps", int, 1000, "optimizer updates in total"),
        ("--batch-size", int, 8, "windows per update"),
        ("--seq-len", int, 128, "positions per window"),
        ("--lr", float, 1e-3, "peak learning rate"),
        ("--warmup-steps", int, 50, "linear warmup steps"),
        ("--weight-decay", float, 0.0, "AdamW weight decay"),
        ("--depth-decay", float, 0.8, depth_decay_help),
        ("--seed", int, 0, "init and data-order seed"),
        ("--prompt-weight", float, 0.0, "> 0: train on windows anywhere in a sequence, its prompt tokens weighing "
                                         "this much in the loss (answer tokens 1); may change on resumption"),
        ("--holdout-mod", int, HOLDOUT_MOD, "hold out the sequences whose key hashes to 0 mod this"),
        ("--checkpoint-every", int, 50, "save a checkpoint every K steps"),
        ("--keep-checkpoints", int, 2, "keep the newest N checkpoints"),
    ]:
        hp.add_argument(flag, type=typ, default=default, help=what)


def load_base(args: argparse.Namespace):
    """The base model of --model (a directory or a model name; args.model becomes its directory)."""
    from jaxaccel.hf import load_hf
    from jaxaccel.models import resolve_model

    args.model = resolve_model(args.model)
    return load_hf(args.model)


def train_config(args: argparse.Namespace):
    """The run's FeatureTrainConfig from `add_training_flags`' flags."""
    from jaxaccel.training.feature_cache import FeatureTrainConfig

    if args.prompt_weight < 0:
        raise ValueError(f"--prompt-weight must be >= 0, got {args.prompt_weight}")
    return FeatureTrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, depth_decay=args.depth_decay,
        seed=args.seed, holdout_mod=args.holdout_mod, prompt_weight=args.prompt_weight,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints)


def run(args: argparse.Namespace, base, heads_config, make_training: Callable, *, label: str, record: dict,
        summary: str = "", per: str = "depth", written: str = "head", evaluate: Callable | None = None,
        export: Callable | None = None) -> int:
    """Trains heads of `heads_config` for `base` on `args.features` into `args.out` (resuming from
    its checkpoints), writes them and their held-out evaluation; returns the exit status (0).

    make_training(config, features, d2t): the head kind's FeatureTraining (d2t None when the heads
    cover the whole vocabulary: heads_config.draft_vocab_size 0). label: the summary line's name
    of the heads; summary: what it says of them before their draft vocabulary. record: eval.json's
    leading fields (kind, ...). per / written: the held-out line's words for a draft step and for
    the heads. evaluate(training, params): the held-out evaluation's fields (default
    `training.evaluate(params)`); export(heads): the heads as written (default: as trained)."""
    import jax

    from jaxaccel.checkpoint import TrainCheckpointer, restore_or_init
    from jaxaccel.files import write_json_atomically
    from jaxaccel.heads.io import base_fingerprint, save_heads
    from jaxaccel.training import MetricsLogger, loop
    from jaxaccel.training.feature_cache import FeatureSet, fixed_draft_vocab
    from jaxaccel.training.features import feature_layers

    config = train_config(args)
    fingerprint = base_fingerprint(args.model)
    features = FeatureSet(args.features, fingerprint, feature_layers(base.config.num_layers), config.holdout_mod)
    vocab_size = base.config.vocab_size
    if heads_config.draft_vocab_size:
        d2t, vocab = fixed_draft_vocab(args.out, features, heads_config.draft_vocab_size, vocab_size)
    else:
        d2t, vocab = None, {"size": vocab_size, "sha256": None, "coverage_train": 1.0, "coverage_heldout": 1.0}
    training = make_training(config, features, d2t)
    metadata = {"heads": heads_config.to_dict(), "train": config.to_dict(), "base": fingerprint,
                "draft_vocab_sha256": vocab["sha256"]}
    with TrainCheckpointer(args.out / "checkpoints", metadata=metadata,
                           ignore_keys=[f"train.{k}" for k in config.RESUMABLE],
                           max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every) as ckpt:
        state, start = restore_or_init(ckpt, jax.jit(training.init_state))
        if start > config.steps:
            raise ValueError(f"{ckpt.directory} holds step {start}, past --steps {config.steps}")
        n_params = sum(v.size for v in jax.tree.leaves(state["params"]))
        n_tokens = sum(end - start_ for _, start_, end, _ in features.train_seqs)
        print(f"{label}: {n_params / 1e6:.2f}M head params, {summary}draft vocabulary {vocab['size']} "
              f"(covers {vocab['coverage_train']:.3f} of the training answers, {vocab['coverage_heldout']:.3f} "
              f"held out), {len(features.train_seqs)} training / {len(features.heldout_seqs)} held-out sequences "
              f"({n_tokens / 1e6:.2f}M tokens) in {len(features.shards)} shards; "
              f"{f'resuming from step {start}' if start else 'starting'}", file=sys.stderr)
        progress = Progress(start, config.steps, config.batch_size * config.seq_len, enabled=not args.no_progress)
        with MetricsLogger(args.out, start_step=start) as metrics:
            def on_metrics(step, values):
                metrics.log(step, {**values, **progress(step, values)})

            try:
                state = loop.train_loop(state, training.step, training.batch, start_step=start, num_steps=config.steps,
                                        on_metrics=on_metrics, checkpointer=ckpt,
                                        checkpoint_every=config.checkpoint_every)
            finally:
                progress.close()
            heads = training.heads(state["params"])
            save_heads(heads if export is None else export(heads), args.out, args.model, fingerprint)
            if not args.no_eval:
                params = state["params"]
                evaluation = training.evaluate(params) if evaluate is None else evaluate(training, params)
                result = {**record, "step": int(state["step"]), "draft_vocab": vocab,
                          "features": [str(p) for p in features.paths], **evaluation}
                write_json_atomically(args.out / "eval.json", result)
                metrics.log(result["step"], {f"heldout_top1_{d['depth']}": d["top1"] for d in result["depths"]})
                top1 = " ".join(f"{d['top1']:.3f}" for d in result["depths"])
                print(f"held out: top-1 agreement by {per} {top1}; mean accepted (chain of {heads_config.num_heads}) "
                      f"{result['mean_accepted_chain']:.2f}; {written} written to {args.out}", file=sys.stderr)
    return 0
