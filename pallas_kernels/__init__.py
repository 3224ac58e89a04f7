"""Pallas kernels, each beside the pure-JAX reference it must equal (tested in interpret mode on CPU).

- decode_attention: tree-verify / decode attention over a KV cache (flash-decoding, GQA)
- flash_attention: training / prefill attention with causal and block-sparse masks, with backward
- chunked_linear_attention: decayed linear attention, chunked (reference backward)
- grouped_matmul: MoE grouped matmul (`lax.ragged_dot` semantics)

GPU: the kernels lower through Pallas's Triton lowering (checked by exporting for "cuda" on
CPU; their tests pass compiled on an H200, benchmarks/h200/). TPU: each public function hands
over to a Mosaic version — decode_attention_tpu and chunked_linear_attention_tpu (ours), splash
attention and megablox (JAX's) — tested under the TPU interpreter (interpret=pltpu.InterpretParams()) and exported
for "tpu" on CPU, never run on a TPU here. attention_impl="auto" means Pallas on GPU and TPU.
"""

from pallas_kernels._common import KernelArgumentError
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_attention_tpu import decode_attention_tpu
from pallas_kernels.flash_attention import (causal_block_mask, flash_attention, flash_attention_reference,
                                            flash_attention_tpu, streaming_block_mask)
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference, grouped_matmul_tpu
from pallas_kernels.linear_attention import (chunked_linear_attention, chunked_linear_attention_reference,
                                             linear_attention_quadratic)
from pallas_kernels.linear_attention_tpu import chunked_linear_attention_tpu

__all__ = [
    "KernelArgumentError",
    "causal_block_mask",
    "chunked_linear_attention",
    "chunked_linear_attention_reference",
    "chunked_linear_attention_tpu",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_tpu",
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_tpu",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_tpu",
    "linear_attention_quadratic",
    "streaming_block_mask",
]
