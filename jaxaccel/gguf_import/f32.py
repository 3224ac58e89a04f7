"""A float32 copy of a GGUF file: the same metadata and tensor names, every tensor dequantized.

Peers that read GGUF (llama.cpp) can then be measured on exactly the weights our converted float32
model runs, not only on the quantized original: `write_f32_gguf(src, dst)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxaccel.files import write_atomically


def write_f32_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Writes `dst` (atomically): `src`'s metadata and tensors, each tensor dequantized to float32
    in llama.cpp's own layout (so q/k stay as llama.cpp permuted them)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        for field in reader.fields.values():
            # The reader's own bookkeeping, the architecture and the file type (the writer adds both) stay behind.
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tensor in reader.tensors:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            writer.add_tensor(tensor.name, values.reshape(tuple(reversed([int(n) for n in tensor.shape]))))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(dst, write)
    return Path(dst)
