"""An edge node: the drafter, the cloud client and the generator, with text in and text out."""
from __future__ import annotations

import asyncio
import codecs
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from common.assets import model_path
from common.config import TandemConfig
from common.llama_runtime import LlamaRunner
from common.prompts import chat
from common.protocol import SamplingParams
from edge.cloud_client import CloudClient
from edge.drafter import Drafter
from edge.generator import GenStats, Generator, Mode, resolve_mode


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stats: GenStats

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, **self.stats.as_dict()}


class EdgeNode:
    def __init__(self, cfg: TandemConfig, cloud_url: Optional[str]):
        self.cfg = cfg
        runner = LlamaRunner(model_path(cfg.models.draft, cfg.models.cache_dir), cfg.draft.n_ctx, cfg.draft.n_threads)
        self.drafter = Drafter(runner, cfg.draft, cfg.confidence, cfg.switches)
        self.client = CloudClient(cloud_url, cfg.edge) if cloud_url else None
        self.generator = Generator(self.drafter, self.client, cfg)
        self._busy = asyncio.Lock()     # one llama.cpp context: one generation at a time

    async def __aenter__(self) -> "EdgeNode":
        if self.client:
            await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.client:
            await self.client.close()
        self.drafter.runner.llm.close()

    def encode(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of a user message wrapped in the chat template (raw: the text as is)."""
        return self.drafter.runner.tokenize(text if raw else chat(text))

    def sampling(self, temperature=None, seed=None) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(temperature=s.temperature if temperature is None else temperature,
                              top_k=s.top_k, top_p=s.top_p, seed=s.seed if seed is None else seed)

    async def stream(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                     mode: Optional[Mode], stats_out: list) -> AsyncIterator[tuple[list[int], str]]:
        """Yield (token_ids, text) pieces as they are committed; appends the GenStats to stats_out."""
        mode = resolve_mode(self.cfg, mode)
        if mode is not Mode.EDGE_ONLY and self.client is None:
            raise ValueError(f"mode {mode.value} needs a cloud URL")
        limit = self.cfg.draft.n_ctx - len(prompt_ids)
        if limit < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the edge context of {self.cfg.draft.n_ctx}")
        stats = GenStats(mode=mode.value)
        stats_out.append(stats)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async with self._busy:
            async for ids in self.generator.stream(prompt_ids, min(max_tokens, limit), sampling, stats):
                yield ids, decoder.decode(self.drafter.runner.detokenize(ids))
        tail = decoder.decode(b"", final=True)
        if tail:
            yield [], tail

    async def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                       mode: Optional[Mode] = None, on_text: Optional[Callable[[str], None]] = None) -> Result:
        """The whole answer; `on_text` sees each text piece as it is committed."""
        ids, parts, box = [], [], []
        async for toks, text in self.stream(prompt_ids, max_tokens, sampling, mode, box):
            ids += toks
            parts.append(text)
            if on_text:
                on_text(text)
        return Result("".join(parts), ids, box[0])
