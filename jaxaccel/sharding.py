"""Device mesh and the one table that maps logical axes to mesh axes.

Parameters and activations name logical axes (`embed`, `heads`, `vocab`, `batch`, ...); which mesh
axes shard them is decided here and nowhere else. Mesh axes: `data` (replicated weights, split
batch), `fsdp` (split batch and split weights), `tensor` (split heads / mlp / vocab), `expert`.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or axes), the project's single table of sharding rules.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "expert": "expert",
    "norm": None,
}

log = logging.getLogger(__name__)


def parse_mesh(spec: str | dict[str, int] | None) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1}; None: all devices on `data`."""
    if spec is None or spec == "":
        sizes = {"data": jax.device_count()}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, _, size = part.partition("=")
            if not size.strip().isdigit():
                raise ValueError(f"bad mesh spec {spec!r}: expected axis=size pairs such as 'data=2,fsdp=4'")
            sizes[name.strip()] = int(size)
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; known: {list(MESH_AXES)}")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over all (or the given) devices with the project's axis names."""
    sizes = parse_mesh(spec)
    devices = np.asarray(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != devices.size:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {devices.size} are available")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=list(devices.flat),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes.

    A dimension that the mesh axes do not divide evenly (e.g. 2 KV heads over tensor=4) is
    replicated rather than padded; a mesh axis already used by an earlier dimension is skipped.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        rule = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ())
                     if mesh.shape[a] > 1 and a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            log.info("replicating a dimension of size %d (%s): mesh axes %s do not divide it", size, name, axes)
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def sharding_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """The NamedSharding of an array with these logical axes under the rules table."""
    return NamedSharding(mesh, logical_to_mesh(logical, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh):
    """NamedShardings for every variable of an nnx State, from the logical axes it was created with."""
    def one(variable):
        logical = variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim
        return sharding_for(tuple(logical), variable.get_value().shape, mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Places every variable of `state` on the mesh by the rules table."""
    shardings = state_shardings(state, mesh)
    return jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s)), state, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """The model with its parameters placed on the mesh (a new module; the input is not modified)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, shard_state(state, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] activation or token array."""
    return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), (0,) * ndim, mesh))


def cache_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Sharding of one layer's KV cache [B, T, Hkv, D]."""
    return sharding_for(("batch", "length", "kv_heads", "head_dim"), shape, mesh)
