"""Model configuration: frozen, hashable dataclasses (usable as static `jit` arguments)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The names of jaxaccel.families' registry (tests/test_families.py checks), spelled out: the adapters import
# this module, so it cannot import them.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "gemma2", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU; GeGLU with the tanh-approximated GELU (Gemma)
LAYER_TYPES = ("full", "sliding")  # per-layer attention span: every earlier key, or the last sliding_window
ROPE_KINDS = ("default", "linear", "llama3")
ATTENTION_IMPLS = ("auto", "xla", "pallas")


def resolve_attention_impl(impl: str, *, kernel: str | None = None, head_dim: int | None = None) -> str:
    """"auto" -> "pallas" on GPU and TPU, "xla" on CPU (decided at trace time); others as given.

    One rule by shape: on GPU, callers that name the kernel and the head size get "xla" under
    "auto" where Triton cannot tile heads of this size (`pallas_kernels._common.
    triton_head_dim_problem`: a power-of-two head_dim); an explicit "pallas" there raises a
    KernelArgumentError naming the head size. The TPU kernels take any head size. "pallas" on CPU runs the
    kernels in the Pallas interpreter (slow; for tests), never silently XLA.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    import jax  # here, so that reading a config never initialises a backend

    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        return "xla"
    if backend == "gpu" and kernel is not None and head_dim is not None:
        from pallas_kernels._common import triton_head_dim_problem

        if triton_head_dim_problem(kernel, head_dim):
            return "xla"
    return "pallas"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` is Llama 3.1's piecewise rescaling; `linear` divides by `factor`."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_KINDS[1:]:
            raise ValueError(f"unsupported rope scaling kind {self.kind!r}; expected one of {ROPE_KINDS[1:]}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


ROUTERS = ("softmax", "sigmoid")
MOE_DISPATCH = ("dropless", "capacity")
GROUPED_MATMULS = ("ragged_dot", "tiled", "pallas")


@dataclass(frozen=True)
class MoESpec:
    """Mixture-of-Experts feed-forward layers (see jaxaccel.layers.moe).

    Layer i is MoE when (i + 1) % layer_step == 0 and i is not in dense_layers (the Qwen-MoE
    rule: decoder_sparse_step / mlp_only_layers; `dense_layers=(0,)` is a first-dense layer).
    `router`: softmax over all experts then top-k (Mixtral, Qwen), or sigmoid scores then top-k;
    `normalize_top_k` rescales the k chosen weights to sum to 1. `dispatch`: dropless (sort +
    ragged_dot) or capacity (fixed [experts, capacity] buffers; overflowing choices are dropped).
    `grouped_matmul` (dropless): `ragged_dot`, or `tiled` (each expert's rows padded to whole
    tiles, one batched matmul; for backends such as CPU XLA where ragged_dot is a masked dense
    product over every expert), or `pallas` (`pallas_kernels.grouped_matmul`: a Pallas kernel on
    GPU, megablox on TPU, the Pallas interpreter on CPU).
    """

    num_experts: int = 8
    top_k: int = 2
    intermediate_size: int | None = None  # per expert; None: ModelConfig.intermediate_size
    router: str = "softmax"
    normalize_top_k: bool = True
    shared_intermediate_size: int = 0  # an always-on shared expert of this width (0: none)
    shared_expert_gate: bool = False  # sigmoid(x w) scales the shared expert's output (Qwen2-MoE)
    dispatch: str = "dropless"
    grouped_matmul: str = "ragged_dot"
    tile_rows: int = 128  # rows per tile of grouped_matmul="tiled"
    capacity_factor: float = 1.25
    layer_step: int = 1
    dense_layers: tuple[int, ...] = ()
    load_balance_weight: float = 0.01  # weight of the load-balancing loss in the training loss
    z_loss_weight: float = 1e-3  # weight of the router z-loss

    def __post_init__(self):
        if self.num_experts <= 0:
            raise ValueError(f"moe num_experts must be > 0, got {self.num_experts}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"moe top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"moe intermediate_size must be > 0 or None, got {self.intermediate_size}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown moe router {self.router!r}; expected one of {ROUTERS}")
        if self.dispatch not in MOE_DISPATCH:
            raise ValueError(f"unknown moe dispatch {self.dispatch!r}; expected one of {MOE_DISPATCH}")
        if self.grouped_matmul not in GROUPED_MATMULS:
            raise ValueError(f"unknown moe grouped_matmul {self.grouped_matmul!r}; expected one of {GROUPED_MATMULS}")
        if self.tile_rows <= 0:
            raise ValueError(f"moe tile_rows must be > 0, got {self.tile_rows}")
        if self.capacity_factor <= 0:
            raise ValueError(f"moe capacity_factor must be > 0, got {self.capacity_factor}")
        if self.shared_intermediate_size < 0:
            raise ValueError(f"moe shared_intermediate_size must be >= 0, got {self.shared_intermediate_size}")
        if self.shared_expert_gate and not self.shared_intermediate_size:
            raise ValueError("moe shared_expert_gate needs a shared expert (shared_intermediate_size > 0)")
        if self.layer_step <= 0:
            raise ValueError(f"moe layer_step must be > 0, got {self.layer_step}")
        if self.load_balance_weight < 0 or self.z_loss_weight < 0:
            raise ValueError("moe load_balance_weight and z_loss_weight must be >= 0")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(int(i) for i in self.dense_layers))))


ATTENTION_KINDS = ("full", "duo", "block_sparse", "linear")
LINEAR_DECAYS = ("gated", "fixed")


@dataclass(frozen=True)
class AttentionSpec:
    """Which attention kind each layer runs, and the kinds' parameters (see jaxaccel.layers.attention_kinds).

    `kinds` has one entry per layer, or a single entry for every layer; different kinds per layer
    make a hybrid. `retrieval_heads[layer][kv_head]` marks the heads that keep the whole context:
    duo's retrieval heads (the others stream: sink + recent tokens) and block_sparse's dense heads
    (the others follow the Λ block mask); None: the last round(sparsity * num_kv_heads) heads of
    each layer stream.
    """

    kinds: tuple[str, ...] = ("full",)
    retrieval_heads: tuple[tuple[bool, ...], ...] | None = None
    sparsity: float = 0.5  # fraction of streaming heads when retrieval_heads is None
    sink_size: int = 64  # duo streaming heads: first tokens kept
    recent_size: int = 256  # duo streaming heads: last tokens kept (the query's own included)
    block_size: int = 64  # block_sparse Λ mask: sink blocks + local blocks of this many tokens
    sink_blocks: int = 1
    local_blocks: int = 4
    page_size: int = 64  # block_sparse decode (Quest): key min/max per page
    token_budget: int = 1024  # block_sparse decode: selected pages hold at most this many tokens
    chunk_size: int = 64  # linear: chunk length of the chunk-parallel form
    decay: str = "gated"  # linear: "gated" (data-dependent, logsigmoid) or "fixed" (one rate per head)

    def __post_init__(self):
        if isinstance(self.kinds, str):
            object.__setattr__(self, "kinds", (self.kinds,))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if self.retrieval_heads is not None:  # lists from JSON
            object.__setattr__(self, "retrieval_heads", tuple(tuple(bool(h) for h in layer)
                                                              for layer in self.retrieval_heads))
        unknown = sorted(set(self.kinds) - set(ATTENTION_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"unknown attention kind(s) {unknown or self.kinds}; expected one of {ATTENTION_KINDS}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"attention sparsity must be in [0, 1], got {self.sparsity}")
        for name in ("sink_size", "sink_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"attention {name} must be >= 0, got {getattr(self, name)}")
        for name in ("recent_size", "block_size", "local_blocks", "page_size", "token_budget", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"attention {name} must be > 0, got {getattr(self, name)}")
        if self.token_budget % self.page_size:
            raise ValueError(f"attention token_budget ({self.token_budget}) must be a multiple of "
                             f"page_size ({self.page_size})")
        if self.page_size > self.local_blocks * self.block_size:
            raise ValueError(f"attention page_size ({self.page_size}) must be at most the local window "
                             f"(local_blocks * block_size = {self.local_blocks * self.block_size})")
        if self.decay not in LINEAR_DECAYS:
            raise ValueError(f"unknown linear attention decay {self.decay!r}; expected one of {LINEAR_DECAYS}")

    def check(self, num_layers: int, num_kv_heads: int, max_positions: int) -> None:
        """Consistency with the model: per-layer tuples match, windows fit in the context."""
        if len(self.kinds) not in (1, num_layers):
            raise ValueError(f"attention kinds name {len(self.kinds)} layers, but the model has {num_layers}")
        if self.retrieval_heads is not None:
            shape = (len(self.retrieval_heads), {len(layer) for layer in self.retrieval_heads})
            if shape != (num_layers, {num_kv_heads}):
                raise ValueError(f"retrieval_heads must be [num_layers={num_layers}][num_kv_heads={num_kv_heads}] "
                                 f"booleans, got {shape[0]} layers with {sorted(shape[1])} heads")
        used = set(self.kinds)
        windows = []
        if "duo" in used:
            windows.append(("duo streaming window (sink_size + recent_size)", self.sink_size + self.recent_size))
        if "block_sparse" in used:
            windows.append(("block_sparse Λ window ((sink_blocks + local_blocks) * block_size)",
                            (self.sink_blocks + self.local_blocks) * self.block_size))
            windows.append(("block_sparse token_budget", self.token_budget))
        for what, size in windows:
            if size > max_positions:
                raise ValueError(f"{what} of {size} tokens is larger than the cache can ever be "
                                 f"(the model's context is {max_positions} positions)")

    def kind(self, layer: int) -> str:
        """The attention kind of `layer`."""
        return self.kinds[0] if len(self.kinds) == 1 else self.kinds[layer]

    def retrieval_mask(self, layer: int, num_kv_heads: int) -> tuple[bool, ...]:
        """Which KV heads of `layer` keep the whole context (True) or stream (False)."""
        if self.retrieval_heads is not None:
            return self.retrieval_heads[layer]
        streaming = round(self.sparsity * num_kv_heads)
        return tuple(h < num_kv_heads - streaming for h in range(num_kv_heads))

    def replace(self, **overrides: Any) -> AttentionSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Transformer: Llama, Qwen2, Qwen3, Mistral, their MoE variants, Gemma 2 and 3.

    The families differ only in flags: q/k/v bias (Qwen2), per-head QK RMSNorm (Qwen3, Gemma 3),
    a sliding attention window (Mistral: every layer; Gemma: the layers `layer_types` marks
    "sliding", with their own rope base `local_rope_theta`), tied embeddings (small Qwens, Gemma),
    and Gemma's: GeGLU (`hidden_act`), norms scaling by (1 + w) (`norm_offset`), norms after
    attention and MLP too (`sandwich_norms`), embeddings times sqrt(hidden_size) (`embed_scale`),
    scores scaled by query_pre_attn_scalar ** -0.5, tanh soft-capping of scores and logits (Gemma 2).
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    moe: MoESpec | None = None  # None: every layer has a dense MLP
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None  # keys a "sliding" layer sees (the query's own included)
    layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: all sliding iff a window is set
    local_rope_theta: float | None = None  # rope base of the sliding layers (unscaled); None: rope_theta
    hidden_act: str = "silu"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): Gemma stores w and scales by 1 + w
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too, and a pre-MLP norm (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the activation dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # scores times this ** -0.5; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> tanh(scores / c) * c (Gemma 2)
    final_softcap: float | None = None  # logits -> tanh(logits / c) * c (Gemma 2)
    family: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # see resolve_attention_impl
    attention: AttentionSpec | None = None  # None: full attention in every layer

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be > 0 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"unknown layer type(s) {unknown}; expected one of {LAYER_TYPES}")
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types name {len(self.layer_types)} layers, "
                                 f"but the model has {self.num_layers}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding layers but sliding_window is None")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}; expected one of {ACTIVATIONS}")
        for name in ("local_rope_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(self, name)}")
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.attention, dict):  # from JSON
            object.__setattr__(self, "attention", AttentionSpec(**self.attention))
        if self.attention is not None:
            self.attention.check(self.num_layers, self.num_kv_heads, self.max_position_embeddings)
            if self.attn_softcap is not None and set(self.attention.kinds) != {"full"}:
                raise ValueError(f"attn_softcap is implemented for full attention only, not {self.attention.kinds}")
        if isinstance(self.moe, dict):  # from JSON
            object.__setattr__(self, "moe", MoESpec(**self.moe))
        if self.moe is not None:
            bad = [i for i in self.moe.dense_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"moe dense_layers {bad} are not layers of a {self.num_layers}-layer model")
            if not any(self.is_moe_layer(i) for i in range(self.num_layers)):
                raise ValueError(f"moe config {self.moe} makes no layer of this {self.num_layers}-layer model MoE")

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer `index` has a MoE block (rather than a dense MLP)."""
        m = self.moe
        return m is not None and (index + 1) % m.layer_step == 0 and index not in m.dense_layers

    @property
    def moe_intermediate_size(self) -> int:
        """Width of one routed expert."""
        return self.moe.intermediate_size or self.intermediate_size

    def layer_kind(self, layer: int) -> str:
        """The attention kind of `layer` ("full" without an attention spec)."""
        return "full" if self.attention is None else self.attention.kind(layer)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None where it attends to every earlier key."""
        if self.layer_types is None or self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(rope base, scaling) of `layer`: sliding layers take local_rope_theta unscaled where it is set."""
        if self.local_rope_theta is not None and self.layer_window(layer) is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def resolved_head_dim(self) -> int:
        """head_dim, or hidden_size / num_heads when it is not set."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed; an unknown field is an error that names it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values (what model directories record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The config from `to_dict`'s output."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count (embeddings included)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        norms = (4 if self.sandwich_norms else 2) * d + 2 * hd * self.qk_norm
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        total = self.num_layers * (attn + mlp + norms) + d + embed
        if self.moe is not None:  # MoE layers: router + experts (+ shared expert and its gate) instead of the MLP
            m = self.moe
            moe = d * m.num_experts + 3 * d * self.moe_intermediate_size * m.num_experts
            moe += 3 * d * m.shared_intermediate_size + d * m.shared_expert_gate
            total += sum(moe - mlp for i in range(self.num_layers) if self.is_moe_layer(i))
        if self.attention is not None and self.attention.decay == "gated":  # linear layers' gate_proj
            total += (d + 1) * self.num_heads * sum(self.layer_kind(i) == "linear" for i in range(self.num_layers))
        return total
