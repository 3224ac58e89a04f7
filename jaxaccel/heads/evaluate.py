"""How often draft heads agree with the base model's greedy continuation (test split).

Definition. Take N prompts of P tokens (consecutive windows of the split's token stream) and let
the base model continue each greedily for M tokens (jaxaccel.decoding, temperature 0): the path
s_0 .. s_{P+M-1}. One base forward over the path gives its hidden states h_t. At every position t
from P - 1 (the last prompt token) to P + M - K - 2 (K = the deepest depth, so every depth is
scored on the same positions), the base's own next token is s_{t+1}, and depth k (1-based: depth
1 is the first drafted token) drafts s_{t+k+1} from h_t and, for hydra and eagle, the path tokens
s_{t+1} .. s_{t+k} (eagle also from its own predicted features of depths 1..k-1). That is the
speculative loop's situation when every earlier draft of the chain was accepted.

    top1[k]   fraction of positions where depth k's argmax is s_{t+k+1}
    topk[k]   ... where s_{t+k+1} is among depth k's `top_k` most likely tokens
    chain[k]  ... where depths 1..k all have the right argmax (a k-token chain fully accepted)
    mean_accepted_chain = 1 + sum_k chain[k]: tokens per verify step of greedy chain drafting of
              depth K, counting the base's own token (the Spec-Bench "mean accepted tokens")
    path_consistency: fraction of continuation tokens equal to the full forward's argmax (cached
              and uncached greedy can differ at near-ties; expect ~1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxaccel.decoding import AutoregressiveDecoder, Greedy, pad_batch
from jaxaccel.heads.registry import HeadParts
from jaxaccel.model import Transformer
from jaxaccel.training.steps import ModelParts, put_global, tokens_sharding


@dataclass(frozen=True)
class AgreementConfig:
    """Evaluation settings: `prompts` prompts of `prompt_len` tokens, continued by `new_tokens`."""

    prompts: int = 64
    prompt_len: int = 64
    new_tokens: int = 64
    top_k: int = 5
    batch_size: int = 16

    def __post_init__(self):
        for name in ("prompts", "prompt_len", "new_tokens", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval {name} must be >= 1, got {getattr(self, name)}")

    def check(self, depth: int, context: int) -> None:
        """Errors that name the problem, before anything is trained."""
        if self.prompt_len + self.new_tokens > context:
            raise ValueError(f"eval prompts of {self.prompt_len} + {self.new_tokens} new tokens do not fit in the "
                             f"base model's context ({context} positions)")
        if self.new_tokens < depth + 1:
            raise ValueError(f"eval continuations of {self.new_tokens} tokens cannot score draft depth {depth}: "
                             f"they need at least {depth + 1}")


def greedy_paths(base: Transformer, prompts_np: np.ndarray, new_tokens: int, batch_size: int,
                 mesh: Mesh | None = None) -> np.ndarray:
    """[N, P + new_tokens]: each prompt followed by the base's greedy continuation (no stop token)."""
    decoder = AutoregressiveDecoder(base, mesh)
    rows = []
    for start in range(0, len(prompts_np), batch_size):
        chunk = prompts_np[start:start + batch_size].tolist()
        result = decoder.generate(pad_batch(chunk, batch_size), policy=Greedy(), max_new_tokens=new_tokens)
        rows.append(np.asarray(result.tokens_bn)[:len(chunk)])
    return np.concatenate([prompts_np, np.concatenate(rows)], axis=1).astype(np.int32)


def make_agreement_fn(base_parts: ModelParts, head_parts: HeadParts, depth: int, prompt_len: int, top_k: int):
    """jit(head_params, base_params, paths_bs, weight_b) -> summed counts over weighted rows."""
    def counts(head_params, base_params, paths_bs, weight_b):
        base = base_parts.merge(base_params)
        out = base.forward(paths_bs)
        draft = head_parts.merge(head_params).teacher_forced(base, out.hidden, paths_bs, depth)
        s = paths_bs.shape[1]
        first, stop = prompt_len - 1, s - depth - 1  # positions t in [first, stop)
        logits_kbrv = draft.logits_kbtv[:, :, first:stop]
        targets_kbr = jnp.stack([paths_bs[:, first + k + 2:stop + k + 2] for k in range(depth)])
        top1_kbr = jnp.argmax(logits_kbrv, axis=-1) == targets_kbr
        topk_kbr = jnp.any(jax.lax.top_k(logits_kbrv, top_k)[1] == targets_kbr[..., None], axis=-1)
        chain_kbr = jnp.cumprod(top1_kbr, axis=0)
        consistent_bt = jnp.argmax(out.logits[:, first:s - 1], axis=-1) == paths_bs[:, prompt_len:]
        w = weight_b[:, None]
        return {"top1": jnp.sum(top1_kbr * w, axis=(1, 2)), "topk": jnp.sum(topk_kbr * w, axis=(1, 2)),
                "chain": jnp.sum(chain_kbr * w, axis=(1, 2)), "positions": jnp.sum(w) * (stop - first),
                "consistent": jnp.sum(consistent_bt * w), "continuation": jnp.sum(w) * (s - prompt_len)}

    return jax.jit(counts)


def agreement(base_parts: ModelParts, head_parts: HeadParts, head_params, base_params, paths_np: np.ndarray, *,
              prompt_len: int, depth: int, top_k: int, batch_size: int, mesh: Mesh) -> dict:
    """The module docstring's metrics over `paths_np` [N, P + M] (batches padded with weight-0 rows)."""
    fn = make_agreement_fn(base_parts, head_parts, depth, prompt_len, top_k)
    sharding = tokens_sharding(mesh, 2)
    weight_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
    totals = None
    for start in range(0, len(paths_np), batch_size):
        chunk = paths_np[start:start + batch_size]
        weight_b = np.zeros(batch_size, np.float32)
        weight_b[:len(chunk)] = 1
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
        got = jax.device_get(fn(head_params, base_params, put_global(chunk, sharding),
                                put_global(weight_b, weight_sharding)))
        totals = got if totals is None else jax.tree.map(np.add, totals, got)
    n = float(totals["positions"])
    per_depth = [{"depth": k + 1, "top1": float(totals["top1"][k]) / n, f"top{top_k}": float(totals["topk"][k]) / n,
                  "chain": float(totals["chain"][k]) / n} for k in range(depth)]
    return {"positions": int(n), "depths": per_depth,
            "mean_accepted_chain": 1.0 + sum(d["chain"] for d in per_depth),
            "path_consistency": float(totals["consistent"]) / float(totals["continuation"])}
