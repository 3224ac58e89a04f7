"""Peers for `python -m infer.spec_bench --peers transformers llama.cpp`, batch 1, greedy, stopping
on the same stop ids, each method's precision stated beside its figures.

transformers: `generate` on the same model directory's weights (float32, torch CPU), plain and with
prompt lookup decoding (`prompt_lookup_num_tokens=10`); forward passes counted with a hook.

llama.cpp (llama-cpp-python, the `bench` extra): on the named model's original GGUF file (its
quantization, e.g. Q4_1) and on a float32 copy of it (`jaxaccel.gguf_import.f32`: exactly the
weights our float32 model runs, written once beside the model in the cache), each plain and with
its prompt lookup decoding (`LlamaPromptLookupDecoding`); forward passes counted at `Llama.eval`.
llama.cpp keeps its KV cache in float16 by default; on the float32 copy it keeps it in float32 too, so
that run is float32 throughout, like ours (with float16 K/V its greedy text drifted from ours on long
prompts).

Mean accepted tokens means what it means for our rows (prefill counted as a pass).
"""

from __future__ import annotations

import time
from pathlib import Path

TRANSFORMERS = (("transformers generate", {}), ("transformers prompt lookup", {"prompt_lookup_num_tokens": 10}))
PEER_NAMES = ("transformers", "llama.cpp")
LOOKUP_TOKENS = 10  # draft length of both peers' prompt lookup (transformers' default)


def cut_at_stop(tokens: list[int], stop: list[int]) -> list[int]:
    """The tokens up to and including the first stop token."""
    cut = next((i + 1 for i, t in enumerate(tokens) if t in stop), len(tokens))
    return tokens[:cut]


class TransformersPeer:
    """One transformers method on one loaded model: `run(prompt)` -> (tokens, seconds, forward passes)."""

    precision = "float32 (torch CPU)"

    def __init__(self, hf_model, stop: list[int], max_new_tokens: int, extra: dict):
        self.hf, self.stop, self.max_new_tokens, self.extra = hf_model, stop, max_new_tokens, extra
        self.calls = 0
        hf_model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def run(self, prompt: list[int]) -> tuple[list[int], float, int]:
        import torch

        ids = torch.tensor([prompt], dtype=torch.long)
        self.calls = 0
        start = time.perf_counter()
        with torch.no_grad():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=self.max_new_tokens, eos_token_id=self.stop or None,
                                   pad_token_id=self.stop[0] if self.stop else 0, **self.extra)
        seconds = time.perf_counter() - start
        return cut_at_stop(out[0, len(prompt):].tolist(), self.stop), seconds, self.calls


class LlamaCppPeer:
    """llama.cpp on one GGUF file, plain or with prompt lookup: `run(prompt)` as TransformersPeer's."""

    def __init__(self, gguf_file: Path, precision: str, stop: list[int], max_new_tokens: int, *, lookup: bool,
                 context: int, threads: int | None, float32_cache: bool):
        import os

        from llama_cpp import GGML_TYPE_F32, Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if lookup else None
        # Prompt lookup verifies its drafts from every position's logits, so it needs them all kept.
        self.llm = Llama(model_path=str(gguf_file), n_ctx=context, n_threads=threads or os.cpu_count(),
                         draft_model=draft, logits_all=lookup, verbose=False,
                         **({"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if float32_cache else {}))
        self.precision, self.stop, self.max_new_tokens = precision, stop, max_new_tokens
        self.calls = 0
        evaluate = self.llm.eval

        def counted(tokens):
            self.calls += 1
            return evaluate(tokens)

        self.llm.eval = counted

    def run(self, prompt: list[int]) -> tuple[list[int], float, int]:
        self.calls, tokens = 0, []
        self.llm.reset()
        start = time.perf_counter()
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if token in self.stop or len(tokens) >= self.max_new_tokens:
                break
        return tokens, time.perf_counter() - start, self.calls


def llama_cpp_files(model_name: str) -> list[tuple[Path, str]]:
    """(GGUF file, precision) for llama.cpp: the named model's original file and its float32 copy
    (written on first use beside the original)."""
    import gguf

    from jaxaccel.gguf_import.f32 import write_f32_gguf
    from jaxaccel.models import REGISTRY, gguf_path, prepare

    if model_name not in REGISTRY:
        raise ValueError(f"--peers llama.cpp needs a model name with a GGUF file ({', '.join(sorted(REGISTRY))}), "
                         f"not {model_name}")
    prepare(model_name)
    original = gguf_path(model_name)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(original).tensors}
    f32 = original.with_name(f"{original.stem}.F32.gguf")
    if not f32.is_file():
        write_f32_gguf(original, f32)
    return [(original, f"{'/'.join(sorted(kinds))} GGUF, float16 KV cache (llama.cpp CPU)"),
            (f32, "float32 GGUF and KV cache (llama.cpp CPU)")]


def make_peers(names: list[str], model_name: str, model_dir: Path, stop: list[int], max_new_tokens: int,
               context: int, threads: int | None) -> dict:
    """Method name -> peer, for each --peers name (weights loaded once per file)."""
    peers = {}
    if "transformers" in names:
        import torch
        import transformers

        if threads:
            torch.set_num_threads(threads)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # Greedy: sampling settings from the directory's generation_config would only draw warnings.
        hf.generation_config.temperature = hf.generation_config.top_p = hf.generation_config.top_k = None
        # The methods share the weights; each peer reads only its own pass counter.
        peers |= {method: TransformersPeer(hf, stop, max_new_tokens, extra) for method, extra in TRANSFORMERS}
    if "llama.cpp" in names:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("--peers llama.cpp needs llama-cpp-python: pip install -e '.[bench]'")
        for path, precision in llama_cpp_files(model_name):
            label = "F32" if path.stem.endswith(".F32") else path.stem.rsplit(".", 1)[-1]
            for lookup in (False, True):
                method = f"llama.cpp {'prompt lookup' if lookup else 'generate'} ({label})"
                peers[method] = LlamaCppPeer(path, precision, stop, max_new_tokens, lookup=lookup, context=context,
                                             threads=threads, float32_cache=label == "F32")
    return peers
