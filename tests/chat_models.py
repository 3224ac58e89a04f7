"""Tiny chat model directories, built by the tests themselves: a BPE tokenizer trained on real text
(stdlib docstrings) with ChatML special tokens, a chat template in the Hugging Face places, and a
random tiny Transformer."""

import json
import pathlib

from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxaccel import ModelConfig, Transformer, save_hf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]  # ids 0..3
IM_END = 2

# SmolLM2's shape of ChatML: a default system message when the conversation has none.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A BOS written by the template (the tokenizer's post-processor adds one too), block tags on their own
# lines (trim_blocks / lstrip_blocks matter), a filter, and raise_exception.
CHATML_BOS = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def corpus() -> list[str]:
    """Real English text: the docstrings of some standard library modules, and a few non-ASCII words."""
    import argparse, collections, json as json_module, logging, pathlib as pathlib_module, unittest  # noqa: E401

    docs = [m.__doc__ or "" for m in (argparse, collections, json_module, logging, pathlib_module, unittest)]
    return docs + ["Café, naïve façade in Zürich — 東京 and 🙂 too."] * 5


def chat_tokenizer(bos_post_processor: bool = False) -> Tokenizer:
    """Byte-level BPE over `corpus()`, ChatML special tokens first; optionally a post-processor that
    adds <s> to every encoding (as Llama-style tokenizers do)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    if bos_post_processor:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return tokenizer


def build_chat_model(path, variant: str = "chatml", context: int = 256, seed: int = 0) -> pathlib.Path:
    """A model directory with a chat template.

    variant "chatml": template in tokenizer_config.json, eos <|im_end|> everywhere (as SmolLM2);
    "chatml_file": the same template in chat_template.jinja (as transformers' save_pretrained writes it);
    "chatml_list": tokenizer_config.json holds a list of named templates;
    "bos": CHATML_BOS, a BOS-adding post-processor, eos <|endoftext|> (the end of turn is only in the template);
    "plain": no chat template at all.
    """
    tokenizer = chat_tokenizer(bos_post_processor=variant == "bos")
    eos = 0 if variant == "bos" else IM_END
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=context, bos_token_id=3,
                         eos_token_id=eos)
    path = save_hf(Transformer(config, rngs=nnx.Rngs(seed)), path, tokenizer=tokenizer)
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config.update(bos_token="<s>", eos_token=SPECIALS[eos], pad_token="<|endoftext|>",
                      unk_token={"content": "<|endoftext|>", "special": True, "__type": "AddedToken"})
    if variant == "chatml":
        tok_config["chat_template"] = CHATML
    elif variant == "chatml_list":
        tok_config["chat_template"] = [{"name": "tool_use", "template": "unused {{ messages }}"},
                                       {"name": "default", "template": CHATML}]
    elif variant == "chatml_file":
        (path / "chat_template.jinja").write_text(CHATML)
    elif variant == "bos":
        tok_config["chat_template"] = CHATML_BOS
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    if variant != "bos":
        (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": eos}))
    return path
