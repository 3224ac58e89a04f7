"""A float32 copy of a quantized GGUF file holds the same model: every tensor dequantized as our
converter dequantizes it, the same metadata, and the same weights after conversion."""

import gguf
import numpy as np
from gguf_fixtures import write_gguf
from safetensors.numpy import load_file

from jaxaccel.gguf_import import convert_gguf
from jaxaccel.gguf_import.f32 import write_f32_gguf


def test_the_f32_copy_converts_to_the_same_weights(tmp_path):
    quantized = write_gguf(tmp_path / "q.gguf", "llama", "Q4_1", tied=False, seed=5)
    copy = write_f32_gguf(quantized, tmp_path / "f32.gguf")
    src, dst = gguf.GGUFReader(quantized), gguf.GGUFReader(copy)
    assert {t.tensor_type for t in dst.tensors} == {gguf.GGMLQuantizationType.F32}
    assert dst.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    for key in ("llama.block_count", "llama.attention.head_count", "tokenizer.ggml.tokens"):
        assert dst.fields[key].contents() == src.fields[key].contents()
    a = load_file(convert_gguf(quantized, tmp_path / "a") / "model.safetensors")
    b = load_file(convert_gguf(copy, tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
