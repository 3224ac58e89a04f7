"""Chat templates: a model directory's Jinja template, rendered and encoded as transformers does.

    chat = ChatTemplate.from_model_dir(model_dir)
    ids = chat.encode([{"role": "user", "content": "Hi!"}])   # == tokenizer.apply_chat_template(..., tokenize=True)
    stop = chat.stop_ids                                     # end of the assistant's turn, e.g. <|im_end|>

The template is found where transformers looks: `chat_template.jinja` (what `save_pretrained` writes),
else `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: the "default").
It is untrusted code from the model's publisher, so it runs in Jinja's immutable sandbox with the
settings and helpers transformers gives it (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML). The rendered text is encoded without the
tokenizer's own special tokens: a template that wants a BOS writes `{{ bos_token }}` itself.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens transformers passes to every template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Message = Mapping[str, str]


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The Jinja template object of `source`, in a sandbox set up as transformers sets it up."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _eos_ids(file: Path) -> list[int]:
    """`eos_token_id` of a config.json / generation_config.json (an int, a list or absent)."""
    if not file.is_file():
        return []
    eos = json.loads(file.read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [] if eos is None else [eos]


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether the directory names a chat template (a base model has none)."""
    model_dir = Path(model_dir)
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return (model_dir / TEMPLATE_FILE).is_file() or bool(config.get("chat_template"))


def read_template(model_dir: Path, tokenizer_config: dict) -> str:
    """The directory's default chat template source; ValueError naming the directory if it has none."""
    if (model_dir / TEMPLATE_FILE).is_file():  # transformers gives the file priority over the config
        return (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{model_dir}: tokenizer_config.json lists chat templates {sorted(named)} "
                             "but none named 'default'")
    if not isinstance(template, str) or not template:
        raise ValueError(f"{model_dir} has no chat template (no {TEMPLATE_FILE}, no 'chat_template' in "
                         "tokenizer_config.json): it is not a chat model")
    return template


@dataclass(frozen=True, eq=False)
class ChatTemplate:
    """A model's chat template with its tokenizer: render, encode, and the end-of-turn stop ids."""

    source: str  # the Jinja template
    special_tokens: Mapping[str, str]  # bos_token, eos_token, ... as the template sees them
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]  # tokens that end the assistant's turn
    model_dir: Path

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, tokenizer: Tokenizer | None = None) -> ChatTemplate:
        """Reads the template, special tokens and stop ids of a model directory (Hugging Face layout)."""
        from jaxaccel.decoding.text import load_model_tokenizer

        model_dir = Path(model_dir)
        config_file = model_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = read_template(model_dir, tokenizer_config)
        tokenizer = tokenizer or load_model_tokenizer(model_dir)
        special = {name: _token_text(tokenizer_config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        special = {name: text for name, text in special.items() if isinstance(text, str)}
        chat = cls(source, special, tokenizer, (), model_dir)
        eos = tokenizer.token_to_id(special["eos_token"]) if "eos_token" in special else None
        ids = {eos, chat._turn_end_id(), *_eos_ids(model_dir / "generation_config.json"),
               *_eos_ids(model_dir / "config.json")}
        object.__setattr__(chat, "stop_ids", tuple(sorted(i for i in ids if i is not None)))
        return chat

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it; with add_generation_prompt, ending where the
        assistant's answer begins. A template's own complaint (`raise_exception`) is a ValueError."""
        import jinja2

        # As transformers: keys whose value is None are dropped (templates test for presence).
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        if not messages:
            raise ValueError("a chat needs at least one message")
        try:
            return compile_template(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template of {self.model_dir} refused the conversation: {e}") from None

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation. The tokenizer adds nothing of its own (no second
        BOS): the template already wrote every special token, as apply_chat_template(tokenize=True)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def _turn_end_id(self) -> int | None:
        """The special token the template writes right after an assistant message's content (ChatML's
        <|im_end|>, Gemma's <end_of_turn>, Llama 3's <|eot_id|>), found by rendering a probe; None if
        the template writes none there or refuses the probe."""
        marker = "\u2063probe\u2063"
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                               add_generation_prompt=False)
        except ValueError:
            return None
        after = text.split(marker, 1)[-1] if marker in text else ""
        ids = self.tokenizer.encode(after, add_special_tokens=False).ids if after else []
        special = {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}
        return ids[0] if ids and ids[0] in special else None

    def conversation(self, user_text: str, system: str | None = None) -> list[dict[str, str]]:
        """One user message, after a system message when `system` is given."""
        return ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": user_text}]
