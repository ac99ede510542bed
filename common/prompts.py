"""Prompt sets (HumanEval, MT-Bench first turns) and the Qwen2.5 chat template.

Split: every 4th prompt (index % 4 == 3) is held out: tuning scripts (thresholds, weights) use
split="tune", reports of tuned settings use split="heldout". "all" is everything.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass

from common.assets import humaneval_file, mtbench_file

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def chat(user: str, system: str = SYSTEM) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


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
