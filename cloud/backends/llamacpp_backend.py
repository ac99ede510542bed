"""Target on llama.cpp (CPU). One context with `n_seq` sequences: each recent session owns one, so its
next round reuses everything up to its last committed token; a session beyond them takes the least
recently used sequence and re-prefills. The k+1 positions of a round are evaluated in one batch, or
one token per decode in exact mode (common/llama_runtime.py)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from cloud.backends.base import Backend
from common.llama_runtime import LlamaRunner
from common.tokens import common_prefix


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(self, gguf: Path, n_ctx: int, n_threads: int = 0, n_seq: int = 4, exact: bool = False):
        self.runner = LlamaRunner(gguf, n_ctx=n_ctx, n_threads=n_threads, n_seq=n_seq)
        self.n_vocab = self.runner.n_vocab
        self.n_ctx = n_ctx
        self.exact = exact
        self.seqs: OrderedDict[str, int] = OrderedDict()     # session -> sequence, least recently used first
        self.prompt_lens: dict[str, int] = {}                 # exact mode: each session's prompt, for re-prefills

    def _seq(self, session_id: str) -> int:
        seq = self.seqs.pop(session_id, None)
        if seq is None:
            free = set(range(self.runner.n_seq)) - set(self.seqs.values())
            seq = min(free) if free else self.seqs.popitem(last=False)[1]
            self.runner.reset(seq)
        self.seqs[session_id] = seq
        return seq

    def logits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool,
               prompt_len: int | None = None) -> tuple[np.ndarray, int]:
        if prompt_len is not None or session_id not in self.prompt_lens:
            self.prompt_lens[session_id] = prompt_len or len(tokens) - n_logits + 1
        return self.runner.extend_to(tokens, n_logits, reuse=reuse, seq=self._seq(session_id),
                                     exact=self.exact, prompt_len=self.prompt_lens[session_id])

    @property
    def max_batch(self) -> int:
        """Sessions one logits_many call may hold: one sequence each, none handed to another mid-batch."""
        return self.runner.n_seq

    def new_tokens(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool) -> int:
        """How many of `tokens` a call would evaluate (those past the session's cached prefix)."""
        seq = self.seqs.get(session_id)
        held = self.runner.seq_tokens[seq] if seq is not None and reuse else []
        return len(tokens) - max(min(common_prefix(held, tokens), len(tokens) - n_logits), 0)

    def logits_many(self, calls: list[tuple[str, list[int], int, bool]]) -> list[tuple[np.ndarray, int]]:
        """logits() of several sessions' rounds at once (switches.batched_verify; not in exact mode): each
        session's sequence is rolled back to its longest cached prefix, and every sequence's missing tokens
        go in one llama_decode (common/llama_runtime.py decode_batch). calls: (session_id, tokens,
        n_logits, reuse), distinct sessions, at most max_batch."""
        if self.exact:
            raise RuntimeError("exact mode evaluates each token alone: no batched verification")
        if len(calls) > self.max_batch or len({c[0] for c in calls}) != len(calls):
            raise ValueError(f"logits_many takes up to {self.max_batch} calls of distinct sessions")
        work, kept = [], []
        for session_id, tokens, n_logits, reuse in calls:
            seq = self._seq(session_id)
            held = self.runner.seq_tokens[seq]
            keep = max(min(common_prefix(held, tokens), len(tokens) - n_logits), 0) if reuse else 0
            self.runner.rollback(keep, seq)
            work.append((seq, tokens[keep:], n_logits))
            kept.append(keep)
        return list(zip(self.runner.decode_batch(work), kept))

    def drop(self, session_id: str) -> None:
        # Only forget the mapping: a sequence is cleared when it is handed out again, inside a logits
        # call (the one thread that touches llama.cpp), never while another session's decode runs.
        self.seqs.pop(session_id, None)
        self.prompt_lens.pop(session_id, None)

    def close(self) -> None:
        self.runner.llm.close()
