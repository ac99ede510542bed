"""The edge <-> cloud wire protocol: one typed module used by both sides. JSON over HTTP.

Only token ids travel, never text. A session is a sequence of verify rounds numbered `seq` 0, 1, ...
The cloud keeps the session's committed tokens; each round the edge says how many it believes the
cloud holds (`base_len`), adds any committed tokens the cloud lacks (`append`: the prompt in round 0,
or the whole context when re-syncing after a 409) and the draft. The cloud answers how many draft
tokens it accepted and the target's next token (the correction, or the bonus when all were accepted).
A repeated (session_id, seq) returns the stored result: rounds are idempotent, so retries are safe.

Late duplicates: a round older than the session's last one never changes the session. The cloud
keeps the answers of the session's last REPLAY_ROUNDS rounds; a repeat of one of them (same seq,
base_len, append and draft) gets that stored answer again, and anything else older than the last
round gets 409 with the current state (committed_len, last_seq). Why replay rather than always 409:
a duplicate is a retry whose first answer was lost (a timed-out POST, a dropped connection), and
the answer it gets must be the one the round really had, not a refusal that would make the edge
re-sync a session that is fine; why not recompute: that would rewind the session to that round.
`base_len` 0 starts a session, or restarts one (a re-sync after 409), only with a `seq` above the
session's last round: a `base_len` 0 round with seq <= last seq is a late duplicate of an old start.

Bad input is refused before any model work and before a session is created or changed: 400
(malformed JSON), 415 (not application/json UTF-8), 422 (fields, token ids outside the vocabulary,
also inside draft_dists), 413 (context over the window, draft over max_draft, body too large).

An empty draft asks only for the target's next token: the edge sends round 0 with the prompt and no
draft at once, so the cloud prefills while the edge does (switches.parallel_prefill).

Draft-ahead: while round seq-1 is on the wire the edge may already send round seq, drafted after
that round's whole draft and `guess`, its guess of the cloud's next token (base_len counts them, append
is empty). It is verified only if round seq-1 accepts its whole draft and its next token is `guess`;
otherwise the answer is 412 (nothing verified, nothing changed) and the edge sends round seq afresh.

Endpoints (cloud): POST /v1/verify, POST /v1/generate (target-only, NDJSON stream),
DELETE /v1/sessions/{id}, GET /health, GET /stats, GET /metrics.
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROTOCOL_VERSION = 1

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]   # llama.cpp's int32 token ids; checked against n_vocab too
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]       # numpy's default_rng needs >= 0; 64-bit for engines
REPLAY_ROUNDS = 8                                        # answers kept per session for late duplicates
SessionId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class _Message(BaseModel):
    # strict: no "5" -> 5 or 1 -> True coercion; extra: unknown fields are an error; no inf/NaN floats
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SamplingParams(_Message):
    temperature: float = Field(0.0, ge=0.0, le=10.0)   # 0: greedy
    top_k: int = Field(0, ge=0)                          # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[Seed] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class DraftDist(_Message):
    """The draft distribution q at one position, sparse: the edge samples from these `ids` only."""
    ids: list[TokenId] = Field(min_length=1, max_length=1024)
    probs: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _check(self):
        if len(self.ids) != len(self.probs):
            raise ValueError("ids and probs differ in length")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids repeat")
        if abs(sum(self.probs) - 1.0) > 1e-3:
            raise ValueError(f"probs sum to {sum(self.probs):.6f}, not 1")
        return self


class VerifyRequest(_Message):
    session_id: SessionId
    seq: int = Field(ge=0, le=2**63 - 1)
    base_len: int = Field(ge=0, le=2**31 - 1)  # committed tokens the edge believes the cloud holds
    append: list[TokenId] = Field(default_factory=list)   # committed tokens the cloud lacks
    draft: list[TokenId] = Field(default_factory=list)    # upper bound checked against cloud.max_draft; empty:
                                               # only the target's next token (round 0 sent before the edge drafts)
    draft_dists: Optional[list[DraftDist]] = None          # required iff sampling (temperature > 0)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    reuse_cache: bool = True                   # False: the cloud recomputes the whole context (ablation)
    rtt_ms: Optional[float] = Field(None, ge=0.0)          # the edge's latest RTT estimate (RFC 6298 SRTT)
    rttvar_ms: Optional[float] = Field(None, ge=0.0)       # ... and its mean deviation (RTTVAR): the jitter
    guess: Optional[TokenId] = None            # draft-ahead: round seq-1's next token, as the edge guessed it
    prompt_len: Optional[int] = Field(None, ge=1)  # a re-sync (base_len 0): how much of `append` is the prompt,
                                               # so an exact cloud re-evaluates it as the target alone did

    @model_validator(mode="after")
    def _check(self):
        if self.base_len == 0 and not self.append:
            raise ValueError("a session's first round needs the prompt in 'append'")
        if self.prompt_len is not None and self.prompt_len > len(self.append):
            raise ValueError(f"prompt_len {self.prompt_len} exceeds the {len(self.append)} tokens in 'append'")
        if self.guess is not None and (self.base_len == 0 or self.append or self.seq == 0):
            raise ValueError("a draft-ahead round ('guess') follows a round in the same session: "
                             "it needs base_len > 0, seq > 0 and no 'append'")
        if self.sampling.greedy:
            if self.draft_dists is not None:
                raise ValueError("draft_dists must be omitted for greedy verification")
        else:
            if self.draft_dists is None or len(self.draft_dists) != len(self.draft):
                raise ValueError("sampling needs one draft_dists entry per draft token")
            for i, (tok, dist) in enumerate(zip(self.draft, self.draft_dists)):
                if tok not in dist.ids:
                    raise ValueError(f"draft[{i}]={tok} is not in draft_dists[{i}].ids")
        return self


class Timing(_Message):
    queue_ms: float = 0.0     # waiting for the verifier (admission queue / lock)
    compute_ms: float = 0.0   # the model
    server_ms: float = 0.0    # whole handler: parse, queue, compute, serialise


class VerifyResponse(_Message):
    session_id: SessionId
    seq: int
    accepted: int = Field(ge=0)      # draft tokens accepted
    next_token: TokenId              # target's correction (rejection) or bonus (all accepted)
    committed_len: int = Field(ge=0) # tokens the cloud now holds for the session
    timing: Timing = Timing()


class GenerateRequest(_Message):
    """Target-only generation (the cloud_only mode and the lossless reference)."""
    session_id: SessionId
    prompt: list[TokenId] = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=8192)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stop: list[TokenId] = Field(default_factory=list)


class GenerateChunk(_Message):
    """One NDJSON line of /v1/generate: tokens as they are produced, then a final line with done=True
    (and `error` when the generation failed after the stream had started)."""
    token_ids: list[TokenId] = Field(default_factory=list)
    done: bool = False
    timing: Optional[Timing] = None
    error: Optional[str] = None


MAX_BATCH = 256          # messages in one batch frame (the cloud's WS_ROUNDS_IN_FLIGHT)


class Batch(_Message):
    """switches.rtt_batching: several messages of one WebSocket in one frame, {"batch": [msg, ...]}: edge ->
    cloud VerifyRequests, cloud -> edge VerifyResponses or error objects. Each is handled as if it had
    come in a frame of its own (a bad one gets its own error); a single message still travels bare."""
    batch: list[dict] = Field(min_length=1, max_length=MAX_BATCH)


def batch_frame(texts: list[str]) -> str:
    """One frame of several messages already serialised as JSON objects (not parsed again)."""
    return '{"batch":[' + ",".join(texts) + "]}"


def unbatch(data) -> list:
    """The messages of a parsed frame: a batch's items, or the frame itself."""
    if isinstance(data, dict) and isinstance(data.get("batch"), list) and len(data) == 1:
        return data["batch"]
    return [data]


class ErrorResponse(_Message):
    error: str
    field: Optional[str] = None


def validation_message(e: ValidationError) -> tuple[str, Optional[str]]:
    """A one-line reason and the first offending field of a pydantic error."""
    errs = e.errors()
    parts, first = [], None
    for err in errs[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        first = first or loc or None
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts), first
