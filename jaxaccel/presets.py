"""Named model + training presets for `python -m train.pretrain --preset NAME`.

tiny   for tests: a 2-layer d=64 model on a few hundred KB of text; seconds on a CPU.
small  the project's default base model for demos and benchmarks, sized for ~30 minutes
       of training on 2 CPU cores (see the README for its measured figures).
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxaccel.config import ModelConfig
from jaxaccel.training.pretrain import TrainConfig


@dataclass(frozen=True)
class Preset:
    """A named pair of model architecture and pretraining hyper-parameters."""

    name: str
    model: ModelConfig
    train: TrainConfig


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=128),
        TrainConfig(steps=30, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=10, eval_windows=16,
                    eval_batch_size=8, test_windows=32, checkpoint_every=10, tokenizer_max_bytes=200_000,
                    corpus_max_bytes=300_000),
    ),
    "small": Preset(
        "small",
        ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=512, tie_embeddings=True),
        # ~1400 tokens/s on 2 idle CPU cores: 550 steps x 4096 tokens ~ 27 min, + ~2 min of test eval.
        TrainConfig(steps=550, batch_size=8, seq_len=512, lr=2e-3, warmup_steps=50, eval_every=100,
                    eval_windows=16, eval_batch_size=8, checkpoint_every=50),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is an error listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def attention_spec(kinds: str | tuple[str, ...], model_config: ModelConfig, **options):
    """An AttentionSpec for `kinds` (one kind, or one per layer) with windows sized to the model's
    context C (unit u = max(4, C // 32)): duo sink u + recent 4u tokens; block_sparse Λ of
    1 sink + 4 local blocks of u, Quest pages of u, a budget of 4u; linear chunks of min(64, 4u).
    `options` override any field (e.g. sparsity=0.25, token_budget=256)."""
    from jaxaccel.config import AttentionSpec

    kinds = tuple(kinds.split(",")) if isinstance(kinds, str) else tuple(kinds)
    unit = max(4, model_config.max_position_embeddings // 32)
    sized = dict(sink_size=unit, recent_size=4 * unit, block_size=unit, sink_blocks=1, local_blocks=4,
                 page_size=unit, token_budget=4 * unit, chunk_size=min(64, 4 * unit))
    return AttentionSpec(kinds=kinds, **{**sized, **options})
