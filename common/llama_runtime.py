"""A llama.cpp context that knows which tokens its KV cache holds, rolls back, and returns logits.

Shared by the edge drafter (last-position logits) and the cloud's llama.cpp verifier (logits of the
last k+1 positions of one batch). Uses llama-cpp-python's low-level path: `llama_decode` on a batch
whose `logits` flags we set ourselves, `llama_get_logits_ith` read as a numpy view, and
`llama_memory_seq_rm` for rollback. Never `create_completion`/`generate` (slow, memory hungry).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from common.tokens import common_prefix


def llama_threads(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


class LlamaRunner:
    def __init__(self, model_path: str | Path, n_ctx: int, n_threads: int = 0, n_batch: int = 512):
        import llama_cpp  # lazy: protocol-only tests need no llama.cpp
        self._lib = llama_cpp
        threads = llama_threads(n_threads)
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch,
                                   n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                                   logits_all=False, verbose=False)
        self.n_ctx = n_ctx
        self.n_batch = self.llm.n_batch
        self.n_vocab = self.llm.n_vocab()
        self.tokens: list[int] = []          # exactly what the KV cache holds, position by position
        self.prefilled = 0                   # tokens evaluated (for cache statistics)

    # --- text <-> ids (tokenizer of the GGUF) -------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: list[int]) -> bytes:
        return self.llm.detokenize(ids)

    def token_id(self, piece: str) -> int | None:
        ids = self.tokenize(piece)
        return ids[0] if len(ids) == 1 else None

    def stop_tokens(self) -> set[int]:
        stops = {self.llm.token_eos()}
        for piece in ("<|im_end|>", "<|endoftext|>"):
            tid = self.token_id(piece)
            if tid is not None:
                stops.add(tid)
        return stops

    # --- KV cache --------------------------------------------------------------------------------
    def rollback(self, pos: int) -> None:
        """Drop KV entries at positions >= pos."""
        if pos >= len(self.tokens):
            return
        ok = self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.llm.ctx), 0, pos, -1)
        if not ok:
            raise RuntimeError(f"llama_memory_seq_rm failed rolling back to {pos}")
        del self.tokens[pos:]
        self.llm.n_tokens = pos

    def reset(self) -> None:
        self.rollback(0)

    def decode(self, tokens: list[int], n_logits: int = 1) -> np.ndarray:
        """Append `tokens` to the KV cache; return float32 logits [n_logits, n_vocab] for its last
        n_logits positions (row i predicts the token after tokens[len - n_logits + i])."""
        if not tokens:
            raise ValueError("decode needs at least one token")
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise ValueError(f"context {len(self.tokens) + len(tokens)} exceeds n_ctx {self.n_ctx}")
        n_logits = min(n_logits, len(tokens))
        first_logit = len(tokens) - n_logits
        rows = []
        batch = self.llm._batch.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            n_past = len(self.tokens)
            batch.n_tokens = len(chunk)
            want = []
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                flag = start + i >= first_logit
                batch.logits[i] = flag
                if flag:
                    want.append(i)
            rc = self._lib.llama_decode(self.llm.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.llm.input_ids[n_past:n_past + len(chunk)] = chunk
            self.tokens.extend(chunk)
            self.llm.n_tokens = len(self.tokens)
            for i in want:
                ptr = self._lib.llama_get_logits_ith(self.llm.ctx, i)
                view = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                             shape=(self.n_vocab,))
                rows.append(view.copy())
        self.prefilled += len(tokens)
        return np.stack(rows)

    def extend_to(self, tokens: list[int], n_logits: int = 1, reuse: bool = True) -> tuple[np.ndarray, int]:
        """Make the KV cache hold exactly `tokens`, reusing the longest cached prefix (if `reuse`);
        return logits of the last n_logits positions and how many tokens came from the cache.
        At least n_logits tokens are always re-evaluated, since only a decode yields logits."""
        keep = max(min(common_prefix(self.tokens, tokens), len(tokens) - n_logits), 0) if reuse else 0
        self.rollback(keep)
        return self.decode(tokens[keep:], n_logits), keep
