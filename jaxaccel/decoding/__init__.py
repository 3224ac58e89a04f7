"""Decoding: sampling policies, prompt batching, the autoregressive loop and its result type."""

from jaxaccel.decoding.autoregressive import AutoregressiveDecoder, LoopState, generate, prefill_and_sample
from jaxaccel.decoding.prompts import bucket_length, pad_batch, pad_prompts
from jaxaccel.decoding.result import DecodeResult, stop_id_array
from jaxaccel.decoding.sampling import Greedy, Policy, Sampler, make_policy

__all__ = ["AutoregressiveDecoder", "DecodeResult", "Greedy", "LoopState", "Policy", "Sampler", "bucket_length",
           "generate", "make_policy", "pad_batch", "pad_prompts", "prefill_and_sample", "stop_id_array"]
