"""Prompt sets (HumanEval, MT-Bench first turns) and `chat()`: a user message through a model's own
chat template (by default the built-in draft model's, read from its GGUF).

Split: every 4th prompt (index % 4 == 3) is held out: tuning scripts (thresholds, weights) use
split="tune", reports of tuned settings use split="heldout". "all" is everything.
"""
from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from typing import Optional

from common.assets import humaneval_file, model_path, mtbench_file
from common.chat_template import ChatTemplate
from common.config import ModelsConfig


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


@functools.cache
def builtin_template() -> ChatTemplate:
    """The default draft model's template (both built-in models share it), read once from its GGUF."""
    defaults = ModelsConfig()
    return ChatTemplate.from_gguf(model_path(defaults.draft, defaults.cache_dir))


def chat(user: str, system: Optional[str] = None, template: Optional[ChatTemplate] = None) -> str:
    """The prompt text of one user message: what the template makes of it. No system prompt unless
    given: a template that has a default inserts it (Qwen2.5: "You are Qwen, created by Alibaba
    Cloud. You are a helpful assistant."), as llama-server and transformers do."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": user}]
    return (template or builtin_template()).render(messages)


def _split(items: list[Prompt], split: str) -> list[Prompt]:
    if split == "all":
        return items
    if split not in ("tune", "heldout"):
        raise ValueError(f"split must be all, tune or heldout, not '{split}'")
    held = split == "heldout"
    return [p for i, p in enumerate(items) if (i % 4 == 3) == held]


def humaneval(split: str = "all") -> list[Prompt]:
    with gzip.open(humaneval_file(), "rt") as f:
        rows = [json.loads(line) for line in f]
    return _split([Prompt(r["task_id"], "Complete the following Python function. Reply with code only.\n\n"
                          f"```python\n{r['prompt']}```") for r in rows], split)


def mtbench(split: str = "all") -> list[Prompt]:
    with open(mtbench_file()) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return _split([Prompt(f"mtbench/{r['question_id']}", r["turns"][0]) for r in rows], split)


def dataset(name: str, split: str = "all") -> list[Prompt]:
    if name == "humaneval":
        return humaneval(split)
    if name == "mtbench":
        return mtbench(split)
    raise ValueError(f"unknown dataset '{name}' (humaneval, mtbench)")
