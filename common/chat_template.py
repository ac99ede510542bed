"""A model's chat template, read from its GGUF (`tokenizer.chat_template`) and rendered with Jinja2 the
way Hugging Face transformers and llama-cpp-python render it: a sandboxed environment, trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, and the variables `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`. A GGUF without a template gets ChatML.

Messages are validated first: a list of {"role": "system" | "user" | "assistant", "content": str};
anything else is a ValueError naming the message and the field.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_KEY = "tokenizer.chat_template"
ROLES = ("system", "user", "assistant")

# llama.cpp's and transformers' ChatML: what a GGUF without a template of its own gets.
CHATML = ("{%- for message in messages %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as plain {"role", "content"} dicts, or a ValueError naming what is wrong."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, not "
                             f"{'missing' if content is None else type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


class ChatTemplate:
    """render(messages) -> the prompt text, special tokens written out (tokenize it with special=True)."""

    def __init__(self, template: str, bos: str = "", eos: str = ""):
        self.source = template
        self.bos, self.eos = bos, eos
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template does not compile: {e}") from None

    @property
    def is_chatml_fallback(self) -> bool:
        return self.source == CHATML

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], bos: str = "", eos: str = "") -> "ChatTemplate":
        """From a GGUF's key-value metadata (llama_cpp.Llama(...).metadata); ChatML when it has none."""
        return cls(metadata.get(TEMPLATE_KEY) or CHATML, bos, eos)

    @classmethod
    def from_model(cls, model) -> "ChatTemplate":
        """From a llama.cpp model (llama_cpp._internals.LlamaModel): its metadata's template and its
        BOS/EOS token texts."""
        def text(token: int) -> str:
            return model.token_get_text(token) if token >= 0 else ""
        return cls.from_metadata(model.metadata(), text(model.token_bos()), text(model.token_eos()))

    @classmethod
    def from_llama(cls, llm) -> "ChatTemplate":
        """From a loaded llama_cpp.Llama (e.g. LlamaRunner.llm)."""
        return cls.from_model(llm._model)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ChatTemplate":
        """From a GGUF file, loading its vocabulary and metadata only (no weights)."""
        from common.tokenizer_check import vocab_only
        with vocab_only(path) as model:
            return cls.from_model(model)

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        msgs = validate_messages(messages)
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos, eos_token=self.eos)
        except (jinja2.TemplateError, TypeError) as e:
            raise ValueError(f"the chat template refused these messages: {e}") from None
