"""Jitted training and evaluation steps over a flat parameter dict.

The train state is a plain dict pytree, ``{"params": {name: array}, "opt": optax state,
"step": int32}``, keyed by dotted parameter paths ("layers.0.mlp.up_proj.kernel"): orbax
saves it as is, optax masks and shards it by name, and `ModelParts.merge` rebuilds the
NNX module inside the traced function (the graph walk happens once, at trace time).
Steps are plain `jax.jit` with the train state donated.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxaccel.config import ModelConfig
from jaxaccel.data import bits_per_byte
from jaxaccel.model import Transformer
from jaxaccel.sharding import batch_sharding, state_shardings
from jaxaccel.training.losses import moe_aux_loss, moe_metrics, next_token_nll, next_token_nll_and_moe_stats

Params = dict[str, jax.Array]
TrainState = dict  # {"params": Params, "opt": optax.OptState, "step": jax.Array}


def param_name(path: tuple) -> str:
    """('layers', 0, 'mlp', 'up_proj', 'kernel') -> 'layers.0.mlp.up_proj.kernel'."""
    return ".".join(str(p) for p in path)


class ModelParts:
    """A module's static graph plus its parameter templates, to go between modules and flat dicts.

    `make(rngs)` builds the module; it is only traced abstractly here (no memory spent).
    """

    def __init__(self, make: Callable[[nnx.Rngs], nnx.Module]):
        self.make = make
        self.graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
        self._abstract_state = state
        self.templates = {param_name(p): (p, v) for p, v in nnx.to_flat_state(state)}

    @classmethod
    def transformer(cls, config: ModelConfig) -> ModelParts:
        """The parts of a plain Transformer of this config (the pretraining model)."""
        return cls(lambda rngs: Transformer(config, rngs=rngs))

    def params(self, module: nnx.Module) -> Params:
        """{name: array} of a concrete module."""
        return {param_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module))}

    def merge(self, params: Params) -> nnx.Module:
        """The module with these parameter values (works on tracers: call it inside jit)."""
        flat = [(path, var.replace(params[name])) for name, (path, var) in self.templates.items()]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

    def init(self, seed: int) -> Params:
        """Freshly initialised parameters (call inside jit to create them sharded)."""
        return self.params(self.make(nnx.Rngs(seed)))

    def shardings(self, mesh: Mesh) -> dict[str, NamedSharding]:
        """Each parameter's sharding, from its logical axes through the rules table."""
        by_path = dict(nnx.to_flat_state(state_shardings(self._abstract_state, mesh)))
        return {name: by_path[path] for name, (path, _) in self.templates.items()}


def train_state_shardings(abstract_state: TrainState, param_shardings: dict[str, NamedSharding],
                          mesh: Mesh):
    """Shardings of a whole train state: optimizer moments follow their parameter (found by the
    name in their path), everything else (counters, step) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if name in param_shardings and leaf.ndim > 0:
                return param_shardings[name]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def init_state_fn(parts: ModelParts, optimizer: optax.GradientTransformation, seed: int,
                  shardings=None) -> Callable[[], TrainState]:
    """A jitted () -> fresh train state, created directly with its shardings."""
    def init():
        params = parts.init(seed)
        return {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=shardings)


def make_train_step(parts: ModelParts, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    state_shardings=None, tokens_sharding=None):
    """jit(state, tokens_abt1) -> (state, metrics); the state is donated.

    tokens_abt1 [accum, micro_batch, T+1]: the gradients of the `accum` micro-batches are
    averaged (a scan, so activation memory is one micro-batch's) before one optimizer update.
    metrics: loss (mean next-token NLL of the whole batch), grad_norm, lr (of this update); for a
    MoE model also the router statistics (see losses.moe_metrics), whose weighted load-balancing
    and z-losses are added to the NLL that is differentiated.
    """
    def loss_fn(params, tokens_bt1):
        model = parts.merge(params)
        nll_bt, stats = next_token_nll_and_moe_stats(model, tokens_bt1)
        nll = nll_bt.mean()
        aux = moe_aux_loss(stats, model.config) if stats else 0.0
        return nll + aux, {"loss": nll, **moe_metrics(stats)}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, tokens_abt1):
        params = state["params"]
        accum = tokens_abt1.shape[0]
        if accum == 1:
            (_, values), grads = grad_fn(params, tokens_abt1[0])
        else:
            def micro(grads_sum, tokens_bt1):
                (_, values), grads = grad_fn(params, tokens_bt1)
                return jax.tree.map(jnp.add, grads_sum, grads), values

            grads, values = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), tokens_abt1)
            grads = jax.tree.map(lambda g: g / accum, grads)
            values = jax.tree.map(jnp.mean, values)
        updates, opt_state = optimizer.update(grads, state["opt"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt": opt_state, "step": state["step"] + 1}
        metrics = {**values, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, tokens_sharding),
                   out_shardings=(state_shardings, None))


def make_eval_step(parts: ModelParts, param_shardings=None, tokens_sharding=None):
    """jit(params, tokens_bt1, weight_b) -> summed NLL (nats) of rows weighted by weight_b (0: padding)."""
    def step(params, tokens_bt1, weight_b):
        nll_bt = next_token_nll(parts.merge(params), tokens_bt1)
        return jnp.sum(nll_bt * weight_b[:, None])

    weight_sharding = None if tokens_sharding is None else NamedSharding(
        tokens_sharding.mesh, PartitionSpec(tokens_sharding.spec[0]))
    return jax.jit(step, in_shardings=(param_shardings, tokens_sharding, weight_sharding))


def within_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` called (and so traced) with `mesh` as the context mesh (`jax.set_mesh`): how MoE
    blocks learn that they may run expert-parallel over the mesh's `expert` axis."""
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def tokens_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a token batch: [B, T+1] (ndim 2) or [accum, B, T+1] (ndim 3), split on batch."""
    spec = batch_sharding(mesh, 2).spec
    return NamedSharding(mesh, PartitionSpec(*(None,) * (ndim - 2), *spec))


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global array with this sharding
    (each process transfers only its own devices' slices; works single- and multi-host)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def evaluate(eval_step, params: Params, windows_nt1: np.ndarray, batch_size: int,
             byte_lengths_v: np.ndarray, sharding: NamedSharding) -> dict[str, float]:
    """Mean NLL per token and bits per byte over eval windows (last batch padded, pad rows weighted 0)."""
    n = windows_nt1.shape[0]
    nll_sum = 0.0
    for start in range(0, n, batch_size):
        chunk = windows_nt1[start:start + batch_size]
        weight_b = np.zeros(batch_size, np.float32)
        weight_b[:len(chunk)] = 1.0
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
        nll_sum += float(eval_step(params, put_global(chunk, sharding),
                                   put_global(weight_b, NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0])))))
    targets = windows_nt1[:, 1:]
    num_bytes = int(byte_lengths_v[targets].sum())
    return {"loss": nll_sum / targets.size, "bits_per_byte": bits_per_byte(nll_sum, num_bytes)}
