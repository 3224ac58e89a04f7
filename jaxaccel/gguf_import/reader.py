"""Opening a GGUF file: its metadata as plain Python values, its tensors as float32 numpy arrays.

Every failure here is a `GGUFError` naming the file, so callers (the converter, the CLI) report one
line instead of a traceback from deep inside numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file is not a GGUF we can convert (bad magic, truncated, unsupported architecture, tensor
    type or tokenizer, tensors that disagree with the metadata)."""


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A reader over `path`, checked: the magic, and that every tensor's bytes lie inside the file."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # numpy/struct errors of a header that ends early or lies about its sizes
        raise GGUFError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from None
    for t in reader.tensors:
        # The reader maps the file lazily: a tensor cut short by truncation is just a shorter view.
        if t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path} is truncated: tensor {t.name!r} has {t.data.nbytes} of its {t.n_bytes} bytes")
    return reader


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key-value field as a Python value (strings, numbers, bools, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def read_tensor(t: gguf.ReaderTensor, path: Path) -> np.ndarray:
    """The tensor dequantized to float32, in numpy (row-major) order: GGUF lists dims fastest-first."""
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"tensor {t.name!r} in {path} has type {t.tensor_type.name}, which gguf cannot "
                        f"dequantize") from None
    return np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
