"""Peers for `python -m infer.spec_bench --peers transformers`: transformers `generate` on the same
model directory's weights (float32, torch CPU), batch 1, greedy, stopping on the same stop ids.

Two methods: plain autoregressive `generate`, and prompt lookup decoding
(`generate(..., prompt_lookup_num_tokens=10)`). Forward passes are counted with a hook on the
model, so mean accepted tokens means what it means for our rows (prefill counted as a pass).
llama.cpp is not installed on these machines and is not measured.
"""

from __future__ import annotations

import time
from pathlib import Path

PEERS = {"transformers": (("transformers generate", {}),
                          ("transformers prompt lookup", {"prompt_lookup_num_tokens": 10}))}
PRECISION = "float32 (torch CPU)"


class TransformersPeer:
    """One transformers method on one loaded model: `run(prompt)` -> (tokens, seconds, forward passes)."""

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
        tokens = out[0, len(prompt):].tolist()
        # Cut after the first stop token (generate pads finished rows; batch 1 has none, but be exact).
        cut = next((i + 1 for i, t in enumerate(tokens) if t in self.stop), len(tokens))
        return tokens[:cut], seconds, self.calls


def make_peers(names: list[str], model_dir: Path, stop: list[int], max_new_tokens: int,
               torch_threads: int | None) -> dict[str, TransformersPeer]:
    """Method name -> peer, for each --peers name (the weights loaded once)."""
    import torch
    import transformers

    if torch_threads:
        torch.set_num_threads(torch_threads)
    if not names:
        return {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Greedy: sampling settings from the directory's generation_config would only draw warnings.
    hf.generation_config.temperature = hf.generation_config.top_p = hf.generation_config.top_k = None
    # The methods share the weights; each peer reads only its own pass counter.
    return {method: TransformersPeer(hf, stop, max_new_tokens, extra) for name in names for method, extra in PEERS[name]}
