"""Training Hydra / Hydra++ heads (jaxaccel.heads.hydra) on cached base features, never re-running the base.

The features (train.features) hold, per token of the base's own greedy answers, its final hidden
state after the final norm: exactly what the Hydra drafter feeds the heads at inference (the
prefill's and every verify pass's `hidden`). The base contributes only its token embeddings (the
heads' frozen token inputs) and its LM-head columns of the draft vocabulary (the teacher).

Loss (teacher distillation): head k at row t reads the heads' state at t (Hydra++: the prefix
layer run causally over the window's hidden states) and the text's tokens t+1 .. t+k+1, and drafts
the token at t + k + 2. Its target is the base's next-token distribution at t + k + 1 restricted
to the draft vocabulary (softmax of the cached hidden state over those LM-head columns): the KL
divergence from it, on answer tokens only, head k weighted `depth_decay ** k`. The text is the
base's greedy answer, so teacher forcing on it is drafting along an accepted path.

The run's layout is train.eagle3's (the feature set, the draft vocabulary, the held-out split, the
loss and the training state are the feature-cache trainers' shared ones: jaxaccel.training.feature_cache):

    OUT/draft_vocab.npy             d2t, fixed at the run's first start (absent with --draft-vocab 0)
    OUT/checkpoints/                orbax train states: rerun the same command to resume
    OUT/metrics.jsonl, tb/          loss and per-head top-1 per step
    OUT/heads.safetensors, heads_config.json, eval.json
"""

from __future__ import annotations

from flax import nnx

from jaxaccel.heads.common import base_logits_over
from jaxaccel.heads.hydra import HydraHeads
from jaxaccel.model import Transformer
from jaxaccel.training import feature_cache
from jaxaccel.training.feature_cache import DepthOutputs, FeatureSet, FeatureTraining, depth_targets


def teacher_forced_outputs(heads: HydraHeads, base: Transformer, batch: dict, depth: int) -> DepthOutputs:
    """Over a batch of windows (tokens, hidden, answer): the heads' logits over the draft
    vocabulary [K, B, T, N], the base's logits for the token each row drafts, restricted to the
    draft vocabulary [K, B, T, N], that token (the base's greedy answer) [K, B, T] and the rows
    that count (it is an answer token inside the window) [K, B, T]."""
    tokens_bt, hidden_btd = batch["tokens"], batch["hidden"]
    logits_kbtn = heads.teacher_forced(base, hidden_btd, tokens_bt, depth).logits_kbtv
    teacher_btn = base_logits_over(base, hidden_btd, heads.draft_map())  # the base's next token after each position
    return DepthOutputs(logits_kbtn, *depth_targets(teacher_btn, batch, depth))


def loss_and_metrics(heads: HydraHeads, base: Transformer, batch: dict, depth: int, depth_decay: float):
    """(head-weighted KL divergence from the base's restricted distribution, {loss_k, top1_k})."""
    return feature_cache.loss_and_metrics(teacher_forced_outputs(heads, base, batch, depth), heads.draft_map(),
                                          depth_decay)


def agreement_counts(heads: HydraHeads, base: Transformer, batch: dict, depth: int):
    """Per head: (greedy tokens matched, rows); chains: (sum of consecutive matches from head 0,
    chains with every head's token inside the answer)."""
    return feature_cache.agreement_counts(teacher_forced_outputs(heads, base, batch, depth), heads.draft_map())


def heldout_agreement(heads: HydraHeads, base: Transformer, features: FeatureSet, seq_len: int,
                      batch_size: int) -> dict:
    """Per-head top-1 agreement with the base's greedy answers on the held-out sequences, and the
    mean accepted tokens of a chain drafted with the heads (the base's own token counted)."""
    depth = heads.config.num_heads
    counts = nnx.jit(lambda heads, base, batch: agreement_counts(heads, base, batch, depth))
    return feature_cache.heldout_agreement(lambda batch: counts(heads, base, _without_layers(batch)), features,
                                           seq_len, batch_size, depth, heads.draft_vocab_size)


def _without_layers(batch: dict) -> dict:
    """A FeatureSet batch without the low/middle/high layer states (hydra reads the final hidden state only)."""
    return {name: value for name, value in batch.items() if name != "layers"}


class HydraFeatureTraining(FeatureTraining):
    """One run of Hydra / Hydra++ heads. The base's state is an argument of the step, never
    differentiated: only its embedding table and LM head are read (the rest of it is pruned from
    the compiled step)."""

    KIND = "hydra"

    def base_context(self, base: Transformer, d2t) -> nnx.State:
        """The base's state (its graph, static, is kept as `base_graphdef`)."""
        self.base_graphdef, base_state = nnx.split(base)
        return base_state

    def base(self) -> Transformer:
        """The base as a module."""
        return nnx.merge(self.base_graphdef, self.context)

    def loss(self, heads: HydraHeads, context: nnx.State, batch: dict):
        base = nnx.merge(self.base_graphdef, context)
        return loss_and_metrics(heads, base, batch, self.heads_config.num_heads, self.config.depth_decay)

    def prepare(self, batch: dict) -> dict:
        return _without_layers(batch)

    def evaluate(self, trainable) -> dict:
        """Held-out agreement of the heads (`heldout_agreement`)."""
        return heldout_agreement(self.heads(trainable), self.base(), self.features, self.config.seq_len,
                                 self.config.batch_size)
