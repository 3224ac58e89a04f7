"""The output buffers of a decode loop, the per-row stop rule, and the loop's result.

Any loop (one token per step, or an accepted path of a speculative tree) appends tokens with
`DecodeResult.append`, which cuts each row after its first stop token and at the buffer's end
and marks the row done. `num_steps_b` counts the model forward passes a row took part in
(prefill included, since it yields the first token), so tokens per forward pass, the
"mean accepted tokens" of speculative decoding, is exactly 1.0 for plain decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PAD_ID = 0  # fills the buffer past each row's generated tokens


@struct.dataclass
class DecodeResult:
    """Fixed-size output buffers of a decode loop: tokens, counts, and which rows are done."""
    tokens_bn: jax.Array  # [B, max_new_tokens] int32; PAD_ID past num_generated_b
    num_generated_b: jax.Array  # [B] int32, stop token included
    num_steps_b: jax.Array  # [B] int32: forward passes that produced tokens for the row
    done_b: jax.Array  # [B] bool: stopped (stop token or max_new_tokens)

    @classmethod
    def empty(cls, batch_size: int, max_new_tokens: int) -> DecodeResult:
        """Buffers for batch_size rows of up to max_new_tokens tokens, nothing written."""
        zeros_b = jnp.zeros((batch_size,), jnp.int32)
        return cls(tokens_bn=jnp.full((batch_size, max_new_tokens), PAD_ID, jnp.int32),
                   num_generated_b=zeros_b, num_steps_b=zeros_b, done_b=jnp.zeros((batch_size,), bool))

    @property
    def max_new_tokens(self) -> int:
        """Tokens a row can hold."""
        return self.tokens_bn.shape[1]

    def append(self, new_bk: jax.Array, count_b: jax.Array, stop_ids: jax.Array) -> DecodeResult:
        """Appends new_bk[b, :count_b[b]] to each unfinished row, as one forward pass's output.

        A row keeps its tokens up to and including the first stop token (any id in `stop_ids`;
        negative ids match nothing) and no more than fit in the buffer; then it is done.
        """
        b, k = new_bk.shape
        offset_k = jnp.arange(k)
        active_b = ~self.done_b
        is_stop_bk = jnp.isin(new_bk, stop_ids) & (offset_k < count_b[:, None])
        # Tokens up to the first stop token (all of them if there is none).
        upto_stop_b = jnp.where(is_stop_bk.any(axis=1), jnp.argmax(is_stop_bk, axis=1) + 1, k)
        room_b = self.max_new_tokens - self.num_generated_b
        count_b = jnp.where(active_b, jnp.minimum(jnp.minimum(count_b, upto_stop_b), room_b), 0)
        stopped_b = (is_stop_bk & (offset_k < count_b[:, None])).any(axis=1)

        slot_bk = jnp.where(offset_k < count_b[:, None], self.num_generated_b[:, None] + offset_k,
                            self.max_new_tokens)  # out of range: dropped
        tokens_bn = self.tokens_bn.at[jnp.arange(b)[:, None], slot_bk].set(new_bk, mode="drop")
        num_generated_b = self.num_generated_b + count_b
        return DecodeResult(
            tokens_bn=tokens_bn,
            num_generated_b=num_generated_b,
            num_steps_b=self.num_steps_b + active_b,
            done_b=self.done_b | stopped_b | (num_generated_b >= self.max_new_tokens),
        )

    def mean_accepted_tokens(self) -> float:
        """Generated tokens per forward pass over the whole batch (1.0 for plain decoding)."""
        return float(np.sum(self.num_generated_b)) / max(int(np.sum(self.num_steps_b)), 1)

    def sequences(self) -> list[list[int]]:
        """Each row's generated tokens as a Python list (stop token included)."""
        tokens_bn, n_b = np.asarray(self.tokens_bn), np.asarray(self.num_generated_b)
        return [row[:n].tolist() for row, n in zip(tokens_bn, n_b)]


def stop_id_array(stop_tokens, size: int = 8) -> jax.Array:
    """Stop token ids as an int32 array padded with -1 (matches nothing) to a fixed size, so that
    the number of stop tokens does not change the compiled loop's input shapes."""
    ids = sorted({int(t) for t in stop_tokens if t is not None})
    size = max(size, len(ids))
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)
