"""Target on llama.cpp (CPU). One context whose KV cache holds one token sequence: a session's next
round reuses everything up to its last committed token; switching sessions re-prefills from the
longest shared prefix. The k+1 positions of a round are evaluated in one batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cloud.backends.base import Backend
from common.llama_runtime import LlamaRunner


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(self, gguf: Path, n_ctx: int, n_threads: int = 0):
        self.runner = LlamaRunner(gguf, n_ctx=n_ctx, n_threads=n_threads)
        self.n_vocab = self.runner.n_vocab
        self.n_ctx = n_ctx

    def logits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool) -> tuple[np.ndarray, int]:
        return self.runner.extend_to(tokens, n_logits, reuse=reuse)

    def close(self) -> None:
        self.runner.llm.close()
