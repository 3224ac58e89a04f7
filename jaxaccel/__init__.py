"""jaxaccel: a JAX/XLA research framework for fast LLM decoding."""

from jaxaccel.cache import KVCache
from jaxaccel.config import ModelConfig, RopeScaling
from jaxaccel.gguf_import import load_gguf
from jaxaccel.hf import load_hf, save_hf
from jaxaccel.model import ForwardOutput, Transformer

__all__ = ["KVCache", "ModelConfig", "RopeScaling", "Transformer", "ForwardOutput", "load_gguf", "load_hf", "save_hf"]
