"""GGUF files (llama.cpp) -> ordinary Hugging Face model directories, without torch.

    convert_gguf("model.gguf", "model_dir")        # then load_hf("model_dir")
    model, tokenizer = load_gguf("model.gguf")

Modules: `reader` (the file, dequantized tensors, `GGUFError`), `families` (one table entry per
architecture), `names` (llama.cpp tensor names), `config` (metadata -> config.json), `layout`
(config.json and every tensor's shape,
validated by our model), `gemma` (Gemma 2 / 3: names, norm offset, config facts the metadata omits),
`tokenizer` (metadata -> tokenizer.json; `sentencepiece` for Gemma's), `convert` (the directory,
written atomically).
"""

from jaxaccel.gguf_import.convert import convert_gguf, load_gguf
from jaxaccel.gguf_import.families import GGUF_FAMILIES
from jaxaccel.gguf_import.reader import GGUFError

__all__ = ["GGUFError", "GGUF_FAMILIES", "convert_gguf", "load_gguf"]
