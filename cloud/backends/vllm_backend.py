"""Target on vLLM (GPU): the portable request-per-round baseline.

Each verify round is one vLLM request: prompt = context + draft, `max_tokens=1`,
`prompt_logprobs=K` and `logprobs=K`, `skip_reading_prefix_cache=False` so the session's context
comes from the prefix cache and only the uncached tail is computed (vLLM then returns prompt
logprobs for that tail only, aligned to the end of the prompt, first entry None). A per-session
`cache_salt` keeps other sessions' identical text from serving our positions (and closes a
cross-tenant timing channel). Requests carry `priority` from the edge's health factor;
`scheduling_policy="priority"` runs lower values first.

Exactness: greedy verification needs only each position's argmax (rank 1, always in the top-K):
exact. Sampled verification sees the target's distribution truncated to its top-K per position
(renormalised), so it is exact up to the mass outside the top-K.

vLLM is imported lazily; tested with vLLM 0.26.0 (see README). The target weights are the GGUF
dequantized to a bf16 HF folder (cached), since vLLM 0.26 has no GGUF loader of its own.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from cloud.backends.base import Backend
from cloud.backends.vllm_args import engine_kwargs
from common.config import VllmConfig


def logprob_rows(prompt_logprobs: list, sample_logprobs: Optional[dict], n_prompt: int, n_logits: int,
                 n_vocab: int) -> np.ndarray:
    """vLLM logprobs -> float32 [n_logits, n_vocab] 'logits' (log-probs; -inf outside the top-K).

    Row i predicts the token after prompt position n_prompt - n_logits + i. Rows 0..n_logits-2 are
    the prompt-logprob entries of positions n_prompt - n_logits + 1 .. n_prompt - 1 (entry for
    position p holds the top-K of the distribution that predicted token p); the last row is the
    distribution of the one generated token. `prompt_logprobs` may cover only the uncached tail of
    the prompt: entry j belongs to position n_prompt - len(prompt_logprobs) + j.
    """
    rows = np.full((n_logits, n_vocab), -np.inf, dtype=np.float32)
    offset = n_prompt - len(prompt_logprobs)
    for i in range(n_logits - 1):
        pos = n_prompt - n_logits + 1 + i
        entry = prompt_logprobs[pos - offset] if pos >= offset else None
        if entry is None:
            raise LookupError(f"no prompt logprobs for position {pos} (served from the prefix cache)")
        for tok, lp in entry.items():
            rows[i, tok] = lp.logprob if hasattr(lp, "logprob") else lp
    if sample_logprobs is None:
        raise LookupError("no logprobs for the generated token")
    for tok, lp in sample_logprobs.items():
        rows[-1, tok] = lp.logprob if hasattr(lp, "logprob") else lp
    return rows


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, gguf: Path, cfg: VllmConfig, n_ctx: int, cache: str | None = None):
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")   # flashinfer may be absent
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from cloud.backends.torch_backend import dequantized_dir
        model_dir = cfg.model_dir or str(dequantized_dir(gguf, "bfloat16", cache))
        self.k = cfg.prompt_logprobs
        self.max_inflight = cfg.max_inflight
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
            **engine_kwargs(model_dir, cfg, n_ctx, max_logprobs=self.k)))
        from transformers import AutoConfig
        self.n_vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        self.n_ctx = n_ctx

    def logits(self, session_id, tokens, n_logits, reuse):
        raise NotImplementedError("the vLLM backend is async: use alogits")

    async def alogits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool,
                      priority: int) -> tuple[np.ndarray, int]:
        from vllm import SamplingParams
        for skip_cache in ((False, True) if reuse else (True,)):
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.k, prompt_logprobs=self.k,
                                    skip_reading_prefix_cache=skip_cache, detokenize=False)
            final = None
            async for out in self.engine.generate({"prompt_token_ids": tokens, "cache_salt": session_id}, params,
                                                  request_id=uuid.uuid4().hex, priority=priority):
                final = out
            try:
                rows = logprob_rows(final.prompt_logprobs or [], final.outputs[0].logprobs[0], len(tokens),
                                    n_logits, self.n_vocab)
                return rows, final.num_cached_tokens or 0
            except LookupError:
                continue     # a draft position came from cache (e.g. a replayed round): recompute
        raise RuntimeError("vLLM returned no logprobs for the draft positions")

    def close(self) -> None:
        self.engine.shutdown()
