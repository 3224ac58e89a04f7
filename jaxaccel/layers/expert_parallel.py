"""Expert parallelism: the dropless experts of a MoE block split over the mesh's `expert` axis.

Tokens are split over the batch axes (which include `expert`), experts over `expert`. Inside a
`jax.shard_map`, each device sorts its (token, expert) choices by the device that owns the
expert, sends them with one `all_to_all`, runs its local experts on what it received (sorted by
local expert, `ragged_dot`), and sends the results back with a second `all_to_all`.

The send buffers are sized for the worst case (every choice of every local token landing on one
device: T_local * min(k, E_local) rows per destination), so nothing is ever dropped and the
result equals the single-device one; the price is buffer memory P times the average need.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxaccel.sharding import logical_to_mesh

EXPERT_AXIS = "expert"


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _batch_axes(mesh) -> tuple[str, ...]:
    spec = logical_to_mesh(("batch",), (0,), mesh)[0]
    return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def use_expert_parallel(batch_size: int, num_experts: int) -> bool:
    """Whether the current mesh (`jax.set_mesh`) calls for expert parallelism that fits: an
    `expert` axis > 1 that divides the experts, on which the batch is split evenly."""
    mesh = _context_mesh()
    if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) <= 1:
        return False
    axes = _batch_axes(mesh)
    devices = math.prod(mesh.shape[a] for a in axes)
    return EXPERT_AXIS in axes and num_experts % mesh.shape[EXPERT_AXIS] == 0 and batch_size % devices == 0


def expert_parallel_experts(grouped_experts: Callable, x_btd, weights_btk, experts_btk, w_gate_edf, w_up_edf,
                            w_down_efd) -> jax.Array:
    """sum_k weights * expert(x) per token [B, T, d], computed expert-parallel on the context mesh
    (see `use_expert_parallel` for when it applies). grouped_experts(rows_md, group_sizes_e,
    w_gate, w_up, w_down) runs rows grouped contiguously by (local) expert."""
    mesh = _context_mesh()
    batch = P(_batch_axes(mesh))
    experts = P(EXPERT_AXIS)
    fn = jax.shard_map(functools.partial(_local, grouped_experts), mesh=mesh,
                       in_specs=(batch, batch, batch, experts, experts, experts), out_specs=batch, check_vma=False)
    return fn(x_btd, weights_btk, experts_btk, w_gate_edf, w_up_edf, w_down_efd)


def _local(grouped_experts, x_btd, weights_btk, experts_btk, w_gate_edf, w_up_edf, w_down_efd):
    """One device's share: its tokens in, the same tokens' expert outputs out."""
    b, t, d = x_btd.shape
    k = experts_btk.shape[-1]
    num_devices = jax.lax.axis_size(EXPERT_AXIS)
    local_experts = w_gate_edf.shape[0]
    n = b * t
    x_nd = x_btd.reshape(n, d)
    experts_m = experts_btk.reshape(-1)  # m = n * k choices, token-major
    rows = n * min(k, local_experts)  # worst case per destination

    # Where each choice goes: destination device and its row in that device's send buffer.
    dest_m = experts_m // local_experts
    onehot_mp = jax.nn.one_hot(dest_m, num_devices, dtype=jnp.int32)
    row_m = ((jnp.cumsum(onehot_mp, axis=0) - 1) * onehot_mp).sum(-1)
    token_m = jnp.arange(n * k) // k
    send_prd = jnp.zeros((num_devices, rows, d), x_nd.dtype).at[dest_m, row_m].set(x_nd[token_m])
    # Local expert id at the destination; `local_experts` marks an empty row.
    send_ids_pr = jnp.full((num_devices, rows), local_experts, jnp.int32).at[dest_m, row_m].set(
        experts_m % local_experts)

    recv_prd = jax.lax.all_to_all(send_prd, EXPERT_AXIS, 0, 0, tiled=True)
    recv_ids_q = jax.lax.all_to_all(send_ids_pr, EXPERT_AXIS, 0, 0, tiled=True).reshape(-1)

    # Run the local experts on the received rows, sorted by local expert (empty rows last).
    order = jnp.argsort(recv_ids_q, stable=True)
    group_sizes_e = jnp.bincount(recv_ids_q, length=local_experts).astype(jnp.int32)
    y_sorted = grouped_experts(recv_prd.reshape(-1, d)[order], group_sizes_e, w_gate_edf, w_up_edf, w_down_efd)
    y_qd = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    y_qd = jnp.where((recv_ids_q < local_experts)[:, None], y_qd, 0)

    back_prd = jax.lax.all_to_all(y_qd.reshape(num_devices, rows, d), EXPERT_AXIS, 0, 0, tiled=True)
    y_md = back_prd[dest_m, row_m] * weights_btk.reshape(-1)[:, None].astype(x_nd.dtype)
    return y_md.reshape(n, k, d).sum(1).reshape(b, t, d)
