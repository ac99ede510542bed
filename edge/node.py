"""An edge node: the shared drafter, the session slots, one link to the cloud and the generator, with
text in and text out. Many generations run at once, each on a sequence of its own."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from common.assets import model_file
from common.coalesce import from_config as coalesce_policy
from common.chat_template import ChatTemplate, validate_messages
from common.config import TandemConfig
from common.llama_runtime import LlamaRunner
from common.protocol import SamplingParams
from common.tokenizer_check import check_pair, fingerprint
from edge.drafter import Drafter
from edge.generator import GenStats, Generator, Mode, Piece, resolve_mode
from edge.link import CloudLink
from edge.network_context import with_network_context
from edge.sessions import SessionSlots


@dataclass
class Result:
    text: str
    token_ids: list[int]
    sources: list[str]
    stats: GenStats

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, **self.stats.as_dict()}


class EdgeNode:
    def __init__(self, cfg: TandemConfig, cloud_url: Optional[str]):
        self.cfg = cfg
        self.runner = LlamaRunner(model_file(cfg.models, "draft"), cfg.draft.n_ctx, cfg.draft.n_threads,
                                  n_seq=cfg.edge.max_sessions)
        self.template = ChatTemplate.from_llama(self.runner.llm)      # the GGUF's own chat template
        self.network_context = cfg.switches.network_context_prompt  # the user's RTT in the chat prompt
        self.drafter = Drafter(self.runner, cfg.draft, cfg.confidence, cfg.switches)
        self.slots = SessionSlots(cfg.edge.max_sessions, cfg.edge.max_queue, self.drafter.release)
        self.link = CloudLink(cloud_url, cfg.edge, coalesce_policy(cfg)) if cloud_url else None
        self.generator = Generator(self.drafter, self.link, cfg, self.runner.stop_tokens())
        self.n_vocab = self.runner.n_vocab
        self.model_name = cfg.models.target

    async def __aenter__(self) -> "EdgeNode":
        if self.link:
            await self.link.__aenter__()
            if self.link.up:         # a cloud that is up must speak our draft's vocabulary
                health = await self.link.check_identity()
                if isinstance(health.get("tokenizer"), dict):
                    check_pair(fingerprint(self.runner.llm), health["tokenizer"])
        return self

    async def __aexit__(self, *exc) -> None:
        if self.link:
            await self.link.close()
        self.drafter.close()            # the worker leaves llama.cpp before the context is freed
        self.runner.llm.close()

    @property
    def active_sessions(self) -> int:
        return self.slots.active

    @property
    def queue_depth(self) -> int:
        return self.slots.waiting

    def drafting_stats(self) -> dict:
        """What the adaptive draft length is working from (edge/draft_length.py): the drafter's ms per step
        (the first of a draft, and each next one), the cloud's verify ms at a few draft lengths, and
        acceptance by the drafter's confidence."""
        return {"first_step_ms": self.drafter.first_ms, "step_ms": self.drafter.step_ms,
                "verify_ms_at_k": {k: round(self.generator.verify_cost(k), 2) for k in (1, 4, 8, 12)},
                "acceptance_by_confidence": self.generator.calibration.table()}

    def encode(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of a user message wrapped in the chat template (raw: the text as is)."""
        return self.runner.tokenize(text if raw else self.template.render([{"role": "user", "content": text}]))

    def encode_messages(self, messages: list[dict], user_rtt_ms: Optional[float] = None) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the assistant's turn
        (ValueError names a bad role or content). With switches.network_context_prompt the model is
        told the user's RTT (edge/network_context.py); else `user_rtt_ms` is not used."""
        if self.network_context:
            messages = with_network_context(validate_messages(messages), user_rtt_ms)
        return self.runner.tokenize(self.template.render(messages))

    def detokenize(self, ids: list[int]) -> bytes:
        return self.runner.detokenize(ids)

    def sampling(self, temperature=None, seed=None, top_p=None) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(temperature=s.temperature if temperature is None else temperature,
                              top_k=s.top_k, top_p=s.top_p if top_p is None else top_p,
                              seed=s.seed if seed is None else seed)

    async def stream(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                     mode: Optional[Mode], stats_out: list, arrived: Optional[float] = None) -> AsyncIterator[Piece]:
        """Yield Pieces as tokens are committed; appends the GenStats to stats_out. Raises EdgeBusy
        (before yielding) when every slot is taken and the queue is full. Closing the iterator stops
        the generation and frees its sequence."""
        arrived = time.perf_counter() if arrived is None else arrived
        mode = resolve_mode(self.cfg, mode)
        if mode is not Mode.EDGE_ONLY and self.link is None:
            raise ValueError(f"mode {mode.value} needs a cloud URL")
        limit = self.cfg.draft.n_ctx - len(prompt_ids)
        if limit < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the edge context of {self.cfg.draft.n_ctx}")
        stats = GenStats(mode=mode.value)
        stats_out.append(stats)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async with self.slots.slot() as seq:
            async for ids, sources in self.generator.stream(seq, prompt_ids, min(max_tokens, limit), sampling,
                                                            stats, arrived):
                yield Piece(ids, decoder.decode(self.runner.detokenize(ids)), sources)
        tail = decoder.decode(b"", final=True)
        if tail:
            yield Piece([], tail, [])

    async def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                       mode: Optional[Mode] = None, on_text: Optional[Callable[[str], None]] = None) -> Result:
        """The whole answer; `on_text` sees each text piece as it is committed."""
        ids, sources, parts, box = [], [], [], []
        async for piece in self.stream(prompt_ids, max_tokens, sampling, mode, box):
            ids += piece.token_ids
            sources += piece.sources
            parts.append(piece.text)
            if on_text:
                on_text(piece.text)
        return Result("".join(parts), ids, sources, box[0])
