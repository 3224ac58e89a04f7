"""Training an EAGLE-3 head (jaxaccel.heads.eagle3) on cached base features, never re-running the base.

The features (train.features: the base's states after its low/middle/high layers and its final
hidden state over its own greedy answers) are all the base contributes, plus its embedding table
(frozen token inputs) and its LM-head rows of the draft vocabulary (the targets). The loss, at
each of the `depth` unrolled draft steps (training-time test), is the cross-entropy of the head's
draft-vocabulary distribution against the base's next-token distribution restricted to the
draft vocabulary (softmax of the cached hidden state over those LM-head rows; reported as the
KL divergence, the same gradient), on answer tokens
(and prompt tokens, weighted, with `prompt_weight`), step s weighted `depth_decay ** s`. No feature regression (EAGLE-3 drops it).

    FEATURES_DIR/features-0000k/    train.features shards (one base, the head's feature layers)
    OUT/draft_vocab.npy             d2t, fixed at the run's first start (answer-token counts of its shards)
    OUT/checkpoints/                orbax train states: rerun the same command to resume
    OUT/metrics.jsonl, tb/          loss and per-depth top-1 per step
    OUT/heads.safetensors, heads_config.json, eval.json

The feature set, the draft vocabulary, the held-out split, the loss and the training state are
the feature-cache trainers' shared ones (jaxaccel.training.feature_cache); here is how an EAGLE-3
head drafts over a window (its unrolled steps) and what it reads of the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.heads.common import base_lm_kernel, shift_left
from jaxaccel.heads.eagle3 import Eagle3Heads, truncate_draft_vocab
from jaxaccel.training import feature_cache
from jaxaccel.training.feature_cache import DepthOutputs, FeatureSet, FeatureTraining, depth_targets


def unrolled_outputs(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, batch: dict,
                     depth: int) -> DepthOutputs:
    """The head's draft logits [D, B, T, N] over a batch of windows, the base's target logits for
    each step restricted to the draft vocabulary (`rows_dn`: its LM-head rows) [D, B, T, N], the
    greedy token each entry drafts [D, B, T] and the entries that count (answer tokens) [D, B, T]."""
    fused_btd = heads.fuse(batch["layers"])
    embeds_btd = embed_vd[shift_left(batch["tokens"], 1)]
    logits_kbtn = heads.draft_logits(heads.unrolled(fused_btd, embeds_btd, depth))
    target_btn = batch["hidden"] @ rows_dn  # the base's logits after each position, draft rows only
    return DepthOutputs(logits_kbtn, *depth_targets(target_btn, batch, depth))


def loss_and_metrics(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, batch: dict, depth: int,
                     depth_decay: float):
    """(weighted KL divergence from the base's restricted distribution, {loss_k, top1_k}) over a batch of windows."""
    out = unrolled_outputs(heads, embed_vd, rows_dn, batch, depth)
    return feature_cache.loss_and_metrics(out, heads.d2t[...], depth_decay)


def agreement_counts(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, batch: dict, depth: int):
    """Per step: (greedy tokens matched, entries); chains: (sum of consecutive matches from step 0,
    chains with every step inside the answer)."""
    return feature_cache.agreement_counts(unrolled_outputs(heads, embed_vd, rows_dn, batch, depth), heads.d2t[...])


def heldout_agreement(heads: Eagle3Heads, embed_vd: jax.Array, rows_dn: jax.Array, features: FeatureSet,
                      seq_len: int, batch_size: int) -> dict:
    """Per-depth top-1 agreement with the base's greedy answers on the held-out sequences, and the
    mean accepted tokens of a chain drafted with the head (the base's own token counted)."""
    depth = heads.config.num_heads
    graphdef, state = nnx.split(heads)
    counts = jax.jit(lambda state, batch: agreement_counts(nnx.merge(graphdef, state), embed_vd, rows_dn, batch, depth))
    return feature_cache.heldout_agreement(lambda batch: counts(state, batch), features, seq_len, batch_size,
                                           depth, heads.draft_vocab_size)


class Eagle3Training(FeatureTraining):
    """One run of an EAGLE-3 head: the base contributes its (frozen) token embeddings and its
    LM-head rows of the draft tokens, nothing else."""

    KIND = "eagle3"

    def base_context(self, base, d2t) -> tuple[jax.Array, jax.Array]:
        """(embed_vd, rows_dn): the base's token embeddings and its LM-head rows of the draft tokens."""
        return jnp.asarray(base.embed_tokens.embedding[...]), base_lm_kernel(base)[:, jnp.asarray(d2t)]

    def loss(self, heads: Eagle3Heads, context, batch: dict):
        embed_vd, rows_dn = context
        return loss_and_metrics(heads, embed_vd, rows_dn, batch, self.heads_config.num_heads, self.config.depth_decay)

    def evaluate(self, trainable, size: int | None = None) -> dict:
        """Held-out agreement (`heldout_agreement`) of the head, or of it cut to its `size` most
        frequent draft tokens (`truncate_draft_vocab`)."""
        (embed_vd, rows_dn), heads = self.context, self.heads(trainable)
        if size is not None:
            heads, rows_dn = truncate_draft_vocab(heads, size), rows_dn[:, :size]
        return heldout_agreement(heads, embed_vd, rows_dn, self.features, self.config.seq_len, self.config.batch_size)
