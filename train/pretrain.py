"""Pretrain a base model: `python -m train.pretrain --preset {tiny,small} --out DIR`.

Trains a byte-level BPE tokenizer on the corpus's train split, trains the model with AdamW
on a device mesh, checkpoints to DIR/checkpoints (rerun the same command to resume),
validates periodically, evaluates the test split (DIR/eval.json) and exports DIR/model
(Hugging Face layout). Metrics: DIR/metrics.jsonl and TensorBoard events in DIR/tb.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jaxaccel.config import ModelConfig
from train.common import Progress, guarded_main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="tiny (tests) or small (default base model)")
    p.add_argument("--out", required=True, help="run directory (created; rerun to resume)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="model config override, e.g. --set num_layers=4 hidden_size=320 (repeatable)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=4 (default: all devices on data)")
    p.add_argument("--extra-data", action="append", default=[], metavar="DIR",
                   help="another directory of text files to add to the corpus (repeatable)")
    p.add_argument("--no-stdlib", action="store_true", help="leave the Python standard library out of the corpus")
    p.add_argument("--cache-dir", default=None, help="token-stream cache (default DIR/data)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (multi-host; implied by JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-export", action="store_true", help="skip the test-split evaluation and DIR/model export")
    moe = p.add_argument_group("mixture of experts (replaces every layer's MLP; exported as Mixtral or Qwen3-MoE)")
    moe.add_argument("--moe-experts", type=int, default=None, metavar="E", help="routed experts per MoE layer")
    moe.add_argument("--moe-top-k", type=int, default=2, metavar="K", help="experts per token (default 2)")
    moe.add_argument("--moe-dispatch", choices=("dropless", "capacity"), default="dropless",
                     help="dropless (sort + ragged_dot) or fixed-capacity buffers that drop overflow")
    moe.add_argument("--moe-capacity-factor", type=float, default=1.25, help="buffer size factor of --moe-dispatch capacity")
    att = p.add_argument_group("attention kinds (jaxaccel.layers.attention_kinds)")
    att.add_argument("--attention", default=None, metavar="KIND[,KIND...]",
                     help="full, duo, block_sparse or linear for every layer, or one kind per layer (a hybrid)")
    att.add_argument("--attention-set", dest="attention_options", action="append", nargs="+", default=[],
                     metavar="FIELD=VALUE", help="AttentionSpec field, e.g. --attention-set sparsity=0.25 recent_size=64")
    hp = p.add_argument_group("training (defaults from the preset)")
    for flag, typ, what in [
        ("--steps", int, "optimizer updates in total"),
        ("--seed", int, "init and data-order seed"),
        ("--checkpoint-every", int, "save a checkpoint every K steps"),
        ("--keep-checkpoints", int, "keep the newest N checkpoints"),
        ("--batch-size", int, "sequences per update (global)"),
        ("--seq-len", int, "tokens per sequence"),
        ("--accum-steps", int, "gradient-accumulation micro-batches per update"),
        ("--lr", float, "peak learning rate"),
        ("--min-lr-ratio", float, "final lr / peak lr of the cosine decay"),
        ("--warmup-steps", int, "linear warmup steps"),
        ("--weight-decay", float, "AdamW weight decay"),
        ("--clip-norm", float, "global gradient-norm clip"),
        ("--eval-every", int, "validate every N steps (0: never)"),
        ("--eval-windows", int, "validation windows per evaluation"),
        ("--test-windows", int, "test windows in the final evaluation (0: the whole split)"),
    ]:
        hp.add_argument(flag, type=typ, default=None, help=what)
    return p.parse_args(argv)


def parse_value(raw: str):
    """Command-line text -> JSON value (numbers, true/false, null, objects) or the string itself."""
    aliases = {"none": None, "null": None, "true": True, "false": False}
    if raw.lower() in aliases:
        return aliases[raw.lower()]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
          "RopeScaling": (dict,), "MoESpec": (dict,)}


def model_overrides(pairs: list[str]) -> dict:
    """['num_layers=4', ...] -> {'num_layers': 4}; an unknown field or a wrongly typed value is named."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        if name not in fields:
            raise ValueError(f"unknown model config field {name!r} in --set; known fields: {sorted(fields)}")
        value = parse_value(raw)
        allowed = tuple(t for part in str(fields[name].type).split("|") for t in _TYPES.get(part.strip(), ()))
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            raise ValueError(f"--set {name}: expected {fields[name].type}, got {raw!r}")
        out[name] = value
    return out


# A dense family -> the Hugging Face MoE family with the same attention (what the export writes).
MOE_FAMILY = {"llama": "mixtral", "mistral": "mixtral", "mixtral": "mixtral", "qwen3": "qwen3_moe",
              "qwen3_moe": "qwen3_moe"}


def moe_overrides(args: argparse.Namespace, model_config: ModelConfig) -> dict:
    """--moe-* flags -> {moe: MoESpec, family: its MoE family}; {} without --moe-experts."""
    from jaxaccel.config import MoESpec

    if args.moe_experts is None:
        return {}
    if model_config.family not in MOE_FAMILY:
        raise ValueError(f"--moe-experts: no MoE export format for family {model_config.family!r}; "
                         f"supported: {sorted(MOE_FAMILY)}")
    spec = MoESpec(num_experts=args.moe_experts, top_k=args.moe_top_k, dispatch=args.moe_dispatch,
                   capacity_factor=args.moe_capacity_factor)
    return {"moe": spec, "family": MOE_FAMILY[model_config.family]}


def attention_overrides(args: argparse.Namespace, model_config: ModelConfig) -> dict:
    """{"attention": AttentionSpec} from --attention / --attention-set (windows sized to the context)."""
    if args.attention is None:
        if args.attention_options:
            raise ValueError("--attention-set needs --attention")
        return {}
    from jaxaccel.config import AttentionSpec
    from jaxaccel.presets import attention_spec

    fields = {f.name for f in dataclasses.fields(AttentionSpec)}
    options = {}
    for pair in (p for group in args.attention_options for p in group):
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"bad --attention-set {pair!r}; expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        options[name] = parse_value(raw)
    return {"attention": attention_spec(args.attention, model_config, **options)}


def train_overrides(args: argparse.Namespace) -> dict:
    names = ["steps", "seed", "checkpoint_every", "keep_checkpoints", "batch_size", "seq_len", "accum_steps", "lr",
             "min_lr_ratio", "warmup_steps", "weight_decay", "clip_norm", "eval_every", "eval_windows",
             "test_windows"]
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if out.get("test_windows") == 0:
        out["test_windows"] = None
    return out


def run(args: argparse.Namespace) -> int:
    """Builds (or resumes) the run, trains, evaluates the test split and exports the model."""
    import jax

    from jaxaccel.presets import get_preset
    from jaxaccel.sharding import make_mesh
    from jaxaccel.training import MetricsLogger, Pretraining

    preset = get_preset(args.preset)
    model_config = preset.model.replace(**model_overrides([p for group in args.overrides for p in group]))
    model_config = model_config.replace(**moe_overrides(args, model_config))
    model_config = model_config.replace(**attention_overrides(args, model_config))
    train_config = preset.train.replace(**train_overrides(args))
    mesh = make_mesh(args.mesh)
    with Pretraining(model_config, train_config, args.out, mesh=mesh, extra_dirs=args.extra_data,
                     include_stdlib=not args.no_stdlib, cache_dir=args.cache_dir) as pretraining:
        main_process = jax.process_index() == 0
        if main_process:
            where = f"resuming from step {pretraining.start_step}" if pretraining.start_step else "starting"
            print(f"{args.preset}: {pretraining.model_config.num_params() / 1e6:.2f}M params, "
                  f"{pretraining.train_tokens.size / 1e6:.2f}M train tokens, mesh {dict(mesh.shape)}; {where}",
                  file=sys.stderr)
        progress = Progress(pretraining.start_step, train_config.steps, pretraining.tokens_per_step,
                            enabled=main_process and not args.no_progress)
        with MetricsLogger(args.out, start_step=pretraining.start_step) as metrics:
            def on_metrics(step, values):
                extra = progress(step, values)
                metrics.log(step, {**values, **extra})

            try:
                pretraining.train(on_metrics)
            finally:
                progress.close()
            if not args.no_export:
                result = pretraining.final_eval()
                metrics.log(result["step"], {"test_loss": result["loss"],
                                             "test_bits_per_byte": result["bits_per_byte"]})
                path = pretraining.export()
                if main_process:
                    print(f"test split: loss {result['loss']:.4f}, {result['bits_per_byte']:.4f} bits/byte "
                          f"({result['tokens']} tokens); model exported to {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return guarded_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
