"""Mixture-of-Experts feed-forward block: top-k router, SwiGLU experts, optional shared expert.

Dispatch (MoESpec.dispatch):
  dropless  the T*k (token, expert) choices are sorted by expert and each expert's contiguous
            rows go through `jax.lax.ragged_dot` (or, with grouped_matmul="tiled", a batched
            matmul over tiles padded per expert: CPU XLA lowers ragged_dot to a masked dense
            product over all experts). No token is dropped.
  capacity  each expert gets a fixed buffer of C = ceil(capacity_factor * T * k / E) rows; choices
            are admitted first-choice-first (all top-1 choices, then the top-2 ones, ...) in token
            order, and those that find their expert's buffer full are dropped (counted). A
            token's output then depends on the rest of the batch: a training option; decode
            dropless (load_hf and exports are dropless) for speculative == autoregressive.
Under a mesh whose `expert` axis is > 1 (`jax.set_mesh`), the dropless experts run expert-parallel
(jaxaccel.layers.expert_parallel). During training the block also records router statistics
(load-balancing loss, z-loss, per-expert load, dropped fraction) as `MoEStats` variables, which
`call_with_moe_stats` switches on and gathers (see jaxaccel.training.losses).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.config import ModelConfig, MoESpec
from jaxaccel.layers.expert_parallel import expert_parallel_experts, use_expert_parallel
from jaxaccel.layers.linear import INIT_STD, dense
from jaxaccel.layers.mlp import MLP


class MoEStats(nnx.Intermediate):
    """Router statistics of one forward pass of one MoE block (sown only while collecting)."""


class MoE(nnx.Module):
    """The Mixture-of-Experts block (module doc): router, experts, optional shared expert, dispatch by MoESpec."""
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        spec = self.spec = config.moe
        d, f, e = config.hidden_size, config.moe_intermediate_size, spec.num_experts
        pdt = jnp.dtype(config.param_dtype)
        self.dtype = jnp.dtype(config.dtype)
        self.gate = dense(config, d, e, ("embed", None), False, rngs)  # the router; HF name `gate`

        def experts(shape, axes):
            init = nnx.with_partitioning(nnx.initializers.normal(INIT_STD), axes, eager_sharding=False)
            return nnx.Param(init(rngs.params(), shape, pdt))

        self.experts = nnx.Dict(
            gate_proj=experts((e, d, f), ("expert", "embed", "mlp")),
            up_proj=experts((e, d, f), ("expert", "embed", "mlp")),
            down_proj=experts((e, f, d), ("expert", "mlp", "embed")),
        )
        self.shared_expert = (MLP(config.replace(intermediate_size=spec.shared_intermediate_size, mlp_bias=False),
                                  rngs=rngs) if spec.shared_intermediate_size else None)
        self.shared_expert_gate = dense(config, d, 1, ("embed", None), False, rngs) if spec.shared_expert_gate else None
        self.collect_stats = False  # switched on by call_with_moe_stats (training only)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        x_nd = x_btd.reshape(b * t, d)
        logits_ne = self.gate(x_nd).astype(jnp.float32)
        weights_nk, experts_nk, probs_ne = route(logits_ne, self.spec)
        w_gate, w_up, w_down = (self.experts[k][...] for k in ("gate_proj", "up_proj", "down_proj"))
        dropped = jnp.zeros((), jnp.float32)
        if self.spec.dispatch == "capacity":
            y_nd, kept_nk = capacity_experts(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down,
                                             self.spec.capacity_factor)
            dropped = 1.0 - kept_nk.mean()
        elif use_expert_parallel(b, self.spec.num_experts):
            y_btd = expert_parallel_experts(grouped_swiglu(self.spec), x_btd, weights_nk.reshape(b, t, -1),
                                            experts_nk.reshape(b, t, -1), w_gate, w_up, w_down)
            y_nd = y_btd.reshape(b * t, d)
        else:
            y_nd = dropless_experts(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, grouped_swiglu(self.spec))
        if self.shared_expert is not None:
            shared_nd = self.shared_expert(x_nd)
            if self.shared_expert_gate is not None:
                shared_nd = jax.nn.sigmoid(self.shared_expert_gate(x_nd)) * shared_nd
            y_nd = y_nd + shared_nd
        if self.collect_stats:
            self.sow(MoEStats, "stats", router_stats(logits_ne, probs_ne, experts_nk, dropped))
        return y_nd.reshape(b, t, d).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# routing


def route(logits_ne: jax.Array, spec: MoESpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing in float32: (weights [n, k], expert ids [n, k] int32, scores [n, E]).

    softmax: probabilities over all experts, the k largest (Mixtral, Qwen-MoE); sigmoid:
    independent scores. `normalize_top_k` rescales the k weights to sum to one. The returned
    scores are what the load-balancing loss averages (sigmoid scores normalised per token).
    """
    if spec.router == "softmax":
        scores_ne = jax.nn.softmax(logits_ne, axis=-1)
        balance_ne = scores_ne
    else:
        scores_ne = jax.nn.sigmoid(logits_ne)
        balance_ne = scores_ne / scores_ne.sum(-1, keepdims=True)
    weights_nk, experts_nk = jax.lax.top_k(scores_ne, spec.top_k)
    if spec.normalize_top_k:
        weights_nk = weights_nk / weights_nk.sum(-1, keepdims=True)
    return weights_nk, experts_nk.astype(jnp.int32), balance_ne


def router_stats(logits_ne, probs_ne, experts_nk, dropped) -> dict[str, jax.Array]:
    """load_balance: E * sum_e f_e P_e (Switch Transformer; 1 when perfectly balanced), with f_e the
    fraction of choices routed to e and P_e the mean router probability of e; z_loss: mean
    logsumexp(logits)^2 (ST-MoE); load: f_e [E]; dropped: fraction of choices dropped."""
    e = probs_ne.shape[-1]
    load_e = jnp.zeros((e,), jnp.float32).at[experts_nk.reshape(-1)].add(1.0) / experts_nk.size
    return {
        "load_balance": e * jnp.sum(load_e * probs_ne.mean(0)),
        "z_loss": jnp.mean(jax.nn.logsumexp(logits_ne, axis=-1) ** 2),
        "load": load_e,
        "dropped": dropped,
    }


# ---------------------------------------------------------------------------------------------
# expert computation


def swiglu_ragged_dot(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd):
    """SwiGLU of rows grouped contiguously by expert (group_sizes_e rows each) via ragged_dot.
    Rows past sum(group_sizes_e) come out as zeros."""
    gate_mf = jax.lax.ragged_dot(x_md, w_gate_edf.astype(x_md.dtype), group_sizes_e)
    up_mf = jax.lax.ragged_dot(x_md, w_up_edf.astype(x_md.dtype), group_sizes_e)
    return jax.lax.ragged_dot(nnx.silu(gate_mf) * up_mf, w_down_efd.astype(x_md.dtype), group_sizes_e)


def swiglu_tiled(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, *, tile_rows: int):
    """`swiglu_ragged_dot` as one batched matmul over row tiles: each expert's rows are padded to
    whole tiles of `tile_rows`, every tile is multiplied by its expert's weights (gathered per
    tile: num_tiles x d x f of memory), and the rows are put back. FLOPs are the active ones plus
    at most one partial tile per expert, where CPU XLA's ragged_dot computes every expert densely."""
    m, d = x_md.shape
    e = group_sizes_e.shape[0]
    tile = min(tile_rows, m)
    num_tiles = -(-m // tile) + e  # sum_e ceil(size_e / tile) <= m / tile + e
    ends_e = jnp.cumsum(group_sizes_e)
    padded_e = -(-group_sizes_e // tile) * tile
    padded_ends_e = jnp.cumsum(padded_e)
    rows_m = jnp.arange(m)
    group_m = jnp.searchsorted(ends_e, rows_m, side="right")  # e for rows past every group
    g_m = jnp.minimum(group_m, e - 1)
    spill = num_tiles * tile  # rows past every group land here and are cut off
    dest_m = jnp.where(group_m < e, padded_ends_e[g_m] - padded_e[g_m] + rows_m - (ends_e[g_m] - group_sizes_e[g_m]),
                       spill)
    x_tbd = jnp.zeros((spill + 1, d), x_md.dtype).at[dest_m].set(x_md)[:spill].reshape(num_tiles, tile, d)
    expert_t = jnp.minimum(jnp.searchsorted(padded_ends_e, jnp.arange(num_tiles) * tile, side="right"), e - 1)
    dt = x_md.dtype
    h_tbf = nnx.silu(jnp.einsum("tbd,tdf->tbf", x_tbd, w_gate_edf.astype(dt)[expert_t])) * jnp.einsum(
        "tbd,tdf->tbf", x_tbd, w_up_edf.astype(dt)[expert_t])
    y_rd = jnp.einsum("tbf,tfd->tbd", h_tbf, w_down_efd.astype(dt)[expert_t]).reshape(spill, d)
    return jnp.concatenate([y_rd, jnp.zeros((1, d), dt)])[dest_m]


def swiglu_pallas(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd):
    """`swiglu_ragged_dot` with `pallas_kernels.grouped_matmul` (same meaning, kernel forward)."""
    from pallas_kernels.grouped_matmul import grouped_matmul

    gate_mf = grouped_matmul(x_md, w_gate_edf.astype(x_md.dtype), group_sizes_e)
    up_mf = grouped_matmul(x_md, w_up_edf.astype(x_md.dtype), group_sizes_e)
    return grouped_matmul(nnx.silu(gate_mf) * up_mf, w_down_efd.astype(x_md.dtype), group_sizes_e)


def grouped_swiglu(spec: MoESpec):
    """The grouped SwiGLU that spec.grouped_matmul names."""
    if spec.grouped_matmul == "tiled":
        return functools.partial(swiglu_tiled, tile_rows=spec.tile_rows)
    if spec.grouped_matmul == "pallas":
        return swiglu_pallas
    return swiglu_ragged_dot


def dropless_experts(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd,
                     grouped=swiglu_ragged_dot) -> jax.Array:
    """sum_k weights[n, k] * expert_{experts[n, k]}(x[n]) for every token, no drops: the n*k
    choices are sorted by expert so that each expert's rows are one contiguous group, run by
    `grouped` (swiglu_ragged_dot: ragged_dot; swiglu_tiled; swiglu_pallas)."""
    n, k = experts_nk.shape
    num_experts = w_gate_edf.shape[0]
    flat_experts = experts_nk.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of_row = order // k
    group_sizes_e = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    y_md = grouped(x_nd[token_of_row], group_sizes_e, w_gate_edf, w_up_edf, w_down_efd)
    y_md = y_md * weights_nk.reshape(-1)[order][:, None].astype(y_md.dtype)
    return jnp.zeros_like(x_nd).at[token_of_row].add(y_md)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per expert buffer: ceil(factor * tokens * k / experts), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_slots(experts_nk: jax.Array, num_experts: int, cap: int) -> tuple[jax.Array, jax.Array]:
    """Each choice's row in its expert's buffer, first choices first (slot-major, then token
    order), and whether it fits (row < cap)."""
    onehot_kne = jax.nn.one_hot(experts_nk.T, num_experts, dtype=jnp.int32)
    flat = onehot_kne.reshape(-1, num_experts)
    row_kn = ((jnp.cumsum(flat, axis=0) - 1) * flat).sum(-1).reshape(experts_nk.shape[::-1])
    row_nk = row_kn.T
    return row_nk, row_nk < cap


def capacity_experts(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd,
                     capacity_factor: float) -> tuple[jax.Array, jax.Array]:
    """Fixed-buffer dispatch: ([n, d] output, kept [n, k] bool). Dropped choices contribute zero."""
    n, k = experts_nk.shape
    num_experts, d = w_gate_edf.shape[0], x_nd.shape[1]
    cap = capacity(n, k, num_experts, capacity_factor)
    row_nk, kept_nk = capacity_slots(experts_nk, num_experts, cap)
    row_nk = jnp.where(kept_nk, row_nk, cap)  # dropped choices go to a spill row that is cut off
    tokens_nk = jnp.broadcast_to(jnp.arange(n)[:, None], (n, k))
    buffer_ecd = jnp.zeros((num_experts, cap + 1, d), x_nd.dtype).at[experts_nk, row_nk].set(x_nd[tokens_nk])
    buffer_ecd = buffer_ecd[:, :cap]
    dt = x_nd.dtype
    h_ecf = nnx.silu(jnp.einsum("ecd,edf->ecf", buffer_ecd, w_gate_edf.astype(dt))) * jnp.einsum(
        "ecd,edf->ecf", buffer_ecd, w_up_edf.astype(dt))
    out_ecd = jnp.einsum("ecf,efd->ecd", h_ecf, w_down_efd.astype(dt))
    out_ecd = jnp.concatenate([out_ecd, jnp.zeros((num_experts, 1, d), dt)], axis=1)
    y_nkd = out_ecd[experts_nk, row_nk] * (weights_nk * kept_nk)[..., None].astype(dt)
    return y_nkd.sum(1), kept_nk


# ---------------------------------------------------------------------------------------------
# statistics plumbing for training


def call_with_moe_stats(fn, model: nnx.Module, *args) -> tuple[object, dict[str, jax.Array]]:
    """(fn(model, *args), router statistics of that call averaged over MoE blocks and their calls:
    {load_balance, z_loss, dropped: scalars; load: [E]}). Statistics are empty for a dense model.
    The blocks record only here (`nnx.capture`), so inference calls carry no extra state."""
    blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, MoE)]
    if not blocks:
        return fn(model, *args), {}
    for block in blocks:
        block.collect_stats = True
    try:
        out, recorded = nnx.capture(fn, MoEStats)(model, *args)
    finally:
        for block in blocks:
            block.collect_stats = False
    calls = [call for _, v in nnx.to_flat_state(recorded) for call in v.get_value()]
    return out, jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *calls)
