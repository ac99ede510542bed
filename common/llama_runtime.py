"""A llama.cpp context with several sequences, each knowing which tokens its KV cache holds.

Shared by the edge drafter (many sessions drafted together: one `llama_decode` batch per step) and
the cloud's llama.cpp verifier (one sequence per session). Uses llama-cpp-python's low-level path:
`llama_decode` on a batch whose positions, sequence ids and `logits` flags we set ourselves,
`llama_get_logits_ith` read as a numpy view, and `llama_memory_seq_rm(mem, seq, pos, -1)` for
rollback. Never `create_completion`/`generate` (slow, memory hungry).

The KV cache is not unified: each sequence has its own stream of `n_ctx` cells, so one sequence's
attention never sees, or is shaped by, another's (a rollback in one session cannot change another's
logits, and a one-sequence decode computes exactly what it would in a context of its own).

Exact evaluation (`exact=True` on `extend_to`): llama.cpp's logits move with batch shape, so the
target alone (prompt prefilled in one batch, then one token per decode) and a k+1-token verification
batch round near-ties differently. In exact mode every token after a sequence's prompt is decoded
alone, so each position's logits come from the very computation the target-alone path performs.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np

from common.tokens import common_prefix


def llama_threads(n: int) -> int:
    """n, or 0: every CPU this process may run on (its affinity: a pinned edge's 2, not the host's 16)."""
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                  # no affinity on this OS
        return os.cpu_count() or 1


class LlamaRunner:
    def __init__(self, model_path: str | Path, n_ctx: int, n_threads: int = 0, n_batch: int = 512, n_seq: int = 1):
        """n_ctx: tokens per sequence; n_seq: sequences (sessions) the context holds at once."""
        import llama_cpp  # lazy: protocol-only tests need no llama.cpp
        from llama_cpp import _internals
        self._lib = llama_cpp
        threads = llama_threads(n_threads)
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch,
                                   n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                                   logits_all=False, verbose=False)
        if n_seq > 1:   # llama_cpp.Llama makes a one-sequence context: replace it by one with n_seq streams
            params = self.llm.context_params
            params.n_seq_max, params.kv_unified, params.n_ctx = n_seq, False, n_ctx * n_seq
            self.llm._ctx.close()
            self.llm._ctx = self.llm._stack.enter_context(contextlib.closing(
                _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)))
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.n_batch = self.llm.n_batch
        self.n_vocab = self.llm.n_vocab()
        self.seq_tokens: list[list[int]] = [[] for _ in range(n_seq)]   # what each sequence's KV holds
        self.prompt_len: list[int] = [0] * n_seq    # exact mode: the prefix evaluated as one batch
        self.prefilled = 0                          # tokens evaluated (for cache statistics)

    @property
    def tokens(self) -> list[int]:                  # sequence 0 (one-sequence users)
        return self.seq_tokens[0]

    @tokens.setter
    def tokens(self, value: list[int]) -> None:
        self.seq_tokens[0] = value

    # --- text <-> ids (tokenizer of the GGUF) -------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: list[int]) -> bytes:
        return self.llm.detokenize(ids)

    def token_id(self, piece: str) -> int | None:
        ids = self.tokenize(piece)
        return ids[0] if len(ids) == 1 else None

    def stop_tokens(self) -> set[int]:
        """Every end-of-generation token of the GGUF's vocabulary (EOS, <|im_end|>, <|eot_id|>, ...)."""
        vocab = self._lib.llama_model_get_vocab(self.llm.model)
        return {t for t in range(self.n_vocab) if self._lib.llama_vocab_is_eog(vocab, t)} | {self.llm.token_eos()}

    # --- KV cache --------------------------------------------------------------------------------
    def rollback(self, pos: int, seq: int = 0) -> None:
        """Drop sequence `seq`'s KV entries at positions >= pos."""
        held = self.seq_tokens[seq]
        if pos >= len(held):
            return
        ok = self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.llm.ctx), seq, pos, -1)
        if not ok:
            raise RuntimeError(f"llama_memory_seq_rm failed rolling sequence {seq} back to {pos}")
        del held[pos:]
        if seq == 0:
            self.llm.n_tokens = pos

    def reset(self, seq: int = 0) -> None:
        self.rollback(0, seq)

    def decode(self, tokens: list[int], n_logits: int = 1, seq: int = 0) -> np.ndarray:
        """Append `tokens` to sequence `seq`; return float32 logits [n_logits, n_vocab] for its last
        n_logits positions (row i predicts the token after tokens[len - n_logits + i])."""
        return self.decode_batch([(seq, tokens, n_logits)])[0]

    def decode_batch(self, work: list[tuple[int, list[int], int]]) -> list[np.ndarray]:
        """Append tokens to several sequences in one llama_decode per n_batch tokens (continuous
        batching); work = [(seq, tokens, n_logits)], each seq at most once. Returns each one's logits."""
        flat = []                                   # (seq, position, token, wants logits)
        for seq, tokens, n_logits in work:
            if not tokens:
                raise ValueError("decode needs at least one token")
            n_past = len(self.seq_tokens[seq])
            if n_past + len(tokens) > self.n_ctx:
                raise ValueError(f"context {n_past + len(tokens)} exceeds n_ctx {self.n_ctx}")
            first_logit = len(tokens) - min(n_logits, len(tokens))
            flat += [(seq, n_past + i, t, i >= first_logit) for i, t in enumerate(tokens)]
        rows: dict[int, list[np.ndarray]] = {seq: [] for seq, _, _ in work}
        batch = self.llm._batch.batch
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start:start + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, (seq, pos, tok, want) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
                batch.seq_id[i][0] = seq
            rc = self._lib.llama_decode(self.llm.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, (seq, pos, tok, want) in enumerate(chunk):
                self.seq_tokens[seq].append(tok)
                if want:
                    ptr = self._lib.llama_get_logits_ith(self.llm.ctx, i)
                    rows[seq].append(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                           shape=(self.n_vocab,)).copy())
        if 0 in rows:
            self.llm.n_tokens = len(self.seq_tokens[0])
        self.prefilled += len(flat)
        return [np.stack(rows[seq]) for seq, _, _ in work]

    def extend_to(self, tokens: list[int], n_logits: int = 1, reuse: bool = True, seq: int = 0,
                  exact: bool = False, prompt_len: int | None = None) -> tuple[np.ndarray, int]:
        """Make sequence `seq` hold exactly `tokens`, reusing its longest cached prefix (if `reuse`);
        return logits of the last n_logits positions and how many tokens came from the cache.
        At least n_logits tokens are always re-evaluated, since only a decode yields logits.

        exact: evaluate as the target alone does: the prompt (the first `prompt_len` tokens; by
        default all but the last n_logits - 1 of a fresh sequence) in one batch, each later token alone."""
        keep = max(min(common_prefix(self.seq_tokens[seq], tokens), len(tokens) - n_logits), 0) if reuse else 0
        self.rollback(keep, seq)
        if not exact:
            return self.decode(tokens[keep:], n_logits, seq), keep
        if keep == 0:
            self.prompt_len[seq] = prompt_len if prompt_len is not None else len(tokens) - n_logits + 1
        batched = min(max(self.prompt_len[seq] - keep, 0), len(tokens) - keep)
        rows = []
        if batched:
            rows.append(self.decode(tokens[keep:keep + batched], 1, seq))
        for tok in tokens[keep + batched:]:
            rows.append(self.decode([tok], 1, seq))
        return np.concatenate(rows)[-n_logits:], keep
