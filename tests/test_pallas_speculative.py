"""attention_impl="pallas": the whole speculative loop (prefill, tree verification, cache
compaction) runs its attention in the decode kernel (interpret mode on CPU) and gives the same
tokens as attention_impl="xla"; likewise the TPU kernels under the TPU interpreter."""

import importlib

import jax
import numpy as np
import pytest
from flax import nnx

import jaxaccel.layers.attention as attention_module
from jaxaccel import ModelConfig, Transformer
from jaxaccel.config import resolve_attention_impl
from jaxaccel.decoding.speculative import SpeculativeDecoder
from jaxaccel.heads import HeadsConfig, make_heads

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=64)


def speculative_tokens(impl):
    graphdef, state = nnx.split(Transformer(CONFIG.replace(attention_impl=impl), rngs=nnx.Rngs(0)))
    # weights scaled up so that greedy outputs vary (as in test_speculative.py)
    base = nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, state))
    heads = make_heads(HeadsConfig(kind="medusa"), base.config, rngs=nnx.Rngs(1))
    heads.init_from_base(base)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 11, 3)]
    return SpeculativeDecoder(base, heads).generate(prompts, max_new_tokens=12, stop_tokens=[7])


def test_pallas_speculative_loop_gives_the_xla_tokens(monkeypatch):
    kernel_calls = []
    kernel = attention_module.decode_attention
    monkeypatch.setattr(attention_module, "decode_attention", lambda *a, **kw: kernel_calls.append(1) or kernel(*a, **kw))
    xla = speculative_tokens("xla")
    assert not kernel_calls
    pallas = speculative_tokens("pallas")
    assert kernel_calls, "the pallas path never called the kernel"
    assert pallas.sequences() == xla.sequences()
    assert xla.mean_accepted_tokens() > 1.2  # drafts were accepted: trees were verified


def test_attention_impl_selection():
    assert CONFIG.attention_impl == "auto"
    assert resolve_attention_impl("auto") == ("pallas" if jax.default_backend() in ("gpu", "tpu") else "xla")
    assert resolve_attention_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match="unknown attention_impl 'cuda'"):
        CONFIG.replace(attention_impl="cuda")


def test_attention_impl_flag():
    from infer.generate import attention_override, parse_args

    args = ["--model", "m", "--prompt", "p"]
    assert attention_override(parse_args(args)) == {}
    assert attention_override(parse_args(args + ["--attention-impl", "pallas"])) == {"attention_impl": "pallas"}
    with pytest.raises(SystemExit):
        parse_args(args + ["--attention-impl", "cuda"])


def test_tpu_route_speculative_loop_gives_the_xla_tokens(monkeypatch, as_if_on_tpu):
    """As on a TPU under "auto": prefill and tree verification over the cache in decode_attention_tpu
    (both kv heads of head size 8 in one block of the row), simulated by the TPU interpreter."""
    from jax.experimental.pallas import tpu as pltpu

    xla = speculative_tokens("xla")  # the reference needs no TPU: "xla" is XLA anywhere
    decode_module = importlib.import_module("pallas_kernels.decode_attention")  # the name is also a function

    calls = []
    kernel = decode_module.decode_attention_tpu
    monkeypatch.setattr(decode_module, "decode_attention_tpu", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    with pltpu.force_tpu_interpret_mode():
        tpu = speculative_tokens("auto")
    assert calls, "the TPU route never called decode_attention_tpu"
    assert tpu.sequences() == xla.sequences()
