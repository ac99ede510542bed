"""What a verifier backend provides: the target's logits for the last positions of a session's tokens.

A backend keeps whatever KV/prefix state it can per session and reuses the longest cached prefix
when `reuse` is true. Calls are blocking and made one at a time per backend (the verifier runs them
in a worker thread behind its admission queue).
"""
from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from typing import Optional

import numpy as np


class Backend(ABC):
    name: str
    n_vocab: int
    n_ctx: int
    max_inflight: int = 1      # calls the backend computes at once (the admission queue's width)
    verifies: bool = False     # True: the backend verifies rounds itself (averify/agenerate, in-engine vLLM)
    exact: bool = False        # True: logits() evaluates each token after the prompt alone (cloud.exact)

    @abstractmethod
    def logits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool) -> tuple[np.ndarray, int]:
        """float32 logits [n_logits, n_vocab] for the last n_logits positions of `tokens` (row i
        predicts the token after tokens[len - n_logits + i]), and how many tokens came from cache."""

    _lock: Optional[asyncio.Lock] = None

    async def alogits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool,
                      priority: int, **exact_kw) -> tuple[np.ndarray, int]:
        """The async entry the verifier uses. Blocking backends run one call at a time in a worker
        thread; engines that batch (vLLM) override this and take `priority` (lower runs first).
        exact_kw: `prompt_len` for exact backends (how much of a fresh session is its prompt)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await asyncio.to_thread(self.logits, session_id, tokens, n_logits, reuse, **exact_kw)

    def post_ahead(self, session_id: str, context: list[int], expect: list[int], draft: list[int], rtt_ms):
        """Draft-ahead (a verifying backend): take a round now that follows the round in flight, which
        started after `context`, if that round leaves `expect` (its draft + the guessed next token).
        None: not here (the verifier runs it in turn, after that one)."""
        return None

    def drop(self, session_id: str) -> None:
        """Forget a session's cached state (no-op where state is shared)."""

    def expire(self, session_id: str) -> None:
        """The front end forgot a session it had not heard from (TTL or LRU eviction). Where several
        front ends share one engine, another may have the session now (cloud/frontends.py)."""
        self.drop(session_id)

    def close(self) -> None:
        pass


class SessionEnded(RuntimeError):
    """A verifying backend lost the session's state (its engine request ended) mid-round."""


class DraftStale(RuntimeError):
    """A draft-ahead round whose previous round did not end as the edge guessed: nothing verified."""


def make_backend(cfg) -> Backend:
    """cfg: TandemConfig. Imports the chosen backend lazily (torch and vLLM are optional).

    cloud.exact (read here, once): greedy output bit for bit the target alone's on this backend.
    llama_cpp and torch evaluate every token after the prompt in a decode of its own, as the target
    alone does (the verifier asks for one position at a time and stops at the first mismatch); vLLM
    runs its batch-invariant kernels (VLLM_BATCH_INVARIANT=1, with the TRITON_ATTN attention backend
    unless another is set), so a spec step and a one-token decode compute the same numbers."""
    from common.assets import model_file
    kind, exact = cfg.cloud.backend, cfg.cloud.exact
    if kind == "llama_cpp":
        from cloud.backends.llamacpp_backend import LlamaCppBackend
        return LlamaCppBackend(model_file(cfg.models, "target"), cfg.cloud.n_ctx, cfg.cloud.n_threads,
                               cfg.cloud.n_seq, exact)
    if kind == "torch":
        from cloud.backends.torch_backend import TorchBackend
        return TorchBackend(model_file(cfg.models, "target"), cfg.cloud.n_ctx,
                            cfg.cloud.torch_device, cfg.cloud.torch_dtype, cfg.cloud.max_sessions, cfg.models.cache_dir,
                            exact)
    vcfg = cfg.cloud.vllm
    if exact:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"          # before vLLM is imported; the engine process inherits it
        vcfg = vcfg.model_copy(update={"attention_backend": vcfg.attention_backend or "TRITON_ATTN"})
    if kind == "vllm" and vcfg.design == "in_engine":
        gguf = None if vcfg.model_dir else model_file(cfg.models, "target")
        return make_vllm_engine(gguf, vcfg, cfg.cloud.n_ctx, cfg.models.cache_dir)
    if kind == "vllm":
        from cloud.backends.vllm_backend import VllmBackend
        return VllmBackend(model_file(cfg.models, "target"), vcfg, cfg.cloud.n_ctx,
                           cfg.models.cache_dir)
    raise ValueError(f"unknown backend '{kind}'")


def make_vllm_engine(gguf, vcfg, n_ctx: int, cache=None) -> Backend:
    """The in-engine vLLM backend: in a child process (`cloud.vllm.engine_process`) or in this one."""
    from cloud.backends.vllm_engine_backend import VllmEngineBackend
    from cloud.backends.vllm_engine_process import VllmEngineProcess
    return (VllmEngineProcess if vcfg.engine_process else VllmEngineBackend)(gguf, vcfg, n_ctx, cache)
