"""The edge's OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

The convention vLLM and llama-server serve, so an unmodified OpenAI client works against an edge:
  stream: true          -> SSE, `data: {chunk}` lines then `data: [DONE]`; the first chunk of a chat
                           carries the role; the last one the finish_reason; with
                           stream_options.include_usage a final chunk with empty choices and `usage`
  max_tokens | max_completion_tokens, temperature (0..2), top_p, seed (>= 0)
  stop                  -> a string or up to 4, matched on the decoded text across tokens (never cutting a
                           character), the stop string not emitted, finish_reason "stop"
  finish_reason         -> "stop" (end of answer or a stop string) | "length" (max_tokens or the context)
                           | "error" (the generation failed after it began; see below)
  usage                 -> prompt_tokens, completion_tokens (every token the model committed, the one that
                           completed a stop string included), total_tokens

Tandem's additions, ignored by OpenAI clients:
  "mode": "edge_cloud" | "edge_only" | "cloud_only" in a request picks the generation mode (default: config).
  `tandem` in a response and in the last chunk: the generation's figures (mode, rounds, drafted, accepted,
  mean_accepted_length (tau), tokens_by_source, rtt_ms, fallbacks, ttft_ms, ...); a whole response's
  also lists its token_ids and their sources. Each content chunk
  also has `tandem: {"token_ids", "sources", "texts"}`: its tokens, where each came from ("draft": drafted
  and accepted by the target, "target": the target's own token, "edge": the draft model alone) and each
  one's text (the chunk's content is their concatenation).

Request fields:
  supported  -> as above, plus model (optional; if given it must be the served model: else 404),
                messages (system|developer|user|assistant; content a string or text parts), prompt
                (a string, a list of one string, token ids, or a list of one list of token ids)
  neutral    -> accepted and ignored at their default values, as OpenAI clients send them: user, metadata,
                store, service_tier, parallel_tool_calls, n=1, presence_penalty=0, frequency_penalty=0,
                logit_bias={}, logprobs=false, top_logprobs=0, response_format={"type": "text"},
                modalities=["text"], echo=false, best_of=1, suffix="" (the last three: completions)
  anything else (tools, functions, n>1, logprobs, a JSON response_format, penalties, unknown names, ...)
             -> 400 invalid_request_error naming every such field; a typo is not silently ignored.

Streams are paced by the user's RTT (switches.rtt_batching; edge/sse_pacer.py, common/coalesce.py): the
`X-Client-RTT` header in ms (anything but a finite number >= 0: 400 invalid_value, param "X-Client-RTT"), else
the kernel's RTT of the user's TCP socket (edge/user_rtt.py). Below 300 ms every chunk goes at once; above,
up to 8 chunks (20 above 1 s) share one event, none held past its window; the first and the last never wait.
The last chunk's `tandem.stream` says the RTT used and how many chunks went in how many events.

A generation that fails after its first chunk was sent ends with a chunk whose finish_reason is
"error" and which carries an OpenAI `error` object (the openai SDK raises APIError on it), then
[DONE]; what was streamed before stands. Failing before any token: an HTTP error (502) instead.
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from contextlib import aclosing
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.coalesce import from_config as coalesce_policy
from common.protocol import SamplingParams, Seed, validation_message
from edge.generator import EdgeBusy, Mode
from edge.serving import (ARRIVED, NODE, ApiError, ClientGone, read_json_object, record_generation,
                          unless_client_gone)
from edge.sse_pacer import SsePacer
from edge.text_stream import Span, StopMatcher, TokenText
from edge.user_rtt import HEADER as USER_RTT_HEADER, BadClientRtt, user_rtt_ms

log = logging.getLogger("tandem.edge")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_STOPS = 4


def _is(*values):
    return lambda v: v in values


def _empty(v) -> bool:
    return v is None or v == {} or v == []


_ANY = lambda v: True  # noqa: E731
# field -> (accepted when, what we support): neutral values are dropped before validation
NEUTRAL = {
    "user": (_ANY, ""), "metadata": (_ANY, ""), "store": (_ANY, ""), "service_tier": (_ANY, ""),
    "parallel_tool_calls": (_ANY, ""),
    "n": (_is(None, 1), "only n=1"),
    "presence_penalty": (_is(None, 0), "only 0"), "frequency_penalty": (_is(None, 0), "only 0"),
    "logit_bias": (_empty, "only {}"),
    "logprobs": (_is(None, False, 0), "logprobs are not returned"),
    "top_logprobs": (_is(None, 0), "logprobs are not returned"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, 'only {"type": "text"}'),
    "modalities": (lambda v: v is None or v == ["text"], 'only ["text"]'),
}
NEUTRAL_COMPLETIONS = {**NEUTRAL, "echo": (_is(None, False), "echo is not supported"),
                       "best_of": (_is(None, 1), "only best_of=1"), "suffix": (_is(None, ""), "suffix is not supported")}
WHY = {"tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
       "functions": "function calling is not supported", "function_call": "function calling is not supported"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None        # sent by some SDKs; there is nothing to obfuscate


class _Request(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[Seed] = None
    stop: Optional[Union[Annotated[str, Field(min_length=1)],
                         Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    mode: Optional[Mode] = Field(None, strict=False)     # Tandem's: edge_cloud | edge_only | cloud_only


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: Union[str, list[TextPart]]
    name: Optional[str] = None                        # accepted; the chat template has no place for it

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Request):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=1)]]


def _parse(model: type[_Request], body: dict, neutral: dict) -> _Request:
    bad = []
    for key in list(body):
        if key in model.model_fields:
            continue
        if key in neutral and neutral[key][0](body[key]):
            del body[key]
            continue
        why = neutral[key][1] if key in neutral else WHY.get(key, "unknown or unsupported")
        bad.append((key, why))
    if bad:
        raise ApiError(400, "unsupported parameter" + "s" * (len(bad) > 1) + ": " +
                       "; ".join(f"'{k}' ({why})" for k, why in bad), param=bad[0][0], code="unsupported_parameter")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(400, message, param=field, code="invalid_value") from None


def _model_name(request: web.Request) -> str:
    return request.app[NODE].model_name


def _check_model(request: web.Request, name: Optional[str]) -> None:
    if name is not None and name != _model_name(request):
        raise ApiError(404, f"The model '{name}' does not exist; this edge serves '{_model_name(request)}' "
                       "(GET /v1/models)", param="model", code="model_not_found")


class Generation:
    """One request's generation: the node's pieces turned into emitted spans (stop strings applied),
    then its finish reason, token counts, figures and error. Closing it closes the node's stream."""

    def __init__(self, request: web.Request, endpoint: str, prompt_ids: list[int], req: _Request,
                 max_tokens: Optional[int]):
        node = request.app[NODE]
        self.request, self.endpoint, self.node, self.prompt_ids = request, endpoint, node, prompt_ids
        if any(t >= node.n_vocab for t in prompt_ids):
            raise ApiError(400, f"a token id is outside the vocabulary of {node.n_vocab}", param="prompt",
                           code="invalid_value")
        room = node.cfg.draft.n_ctx - len(prompt_ids)
        if room < 1:
            raise ApiError(400, f"This model's context is {node.cfg.draft.n_ctx} tokens; the prompt has "
                           f"{len(prompt_ids)}", param="messages" if endpoint == "chat" else "prompt",
                           code="context_length_exceeded")
        self.max_tokens = min(max_tokens or node.cfg.sampling.max_tokens, room)
        self.sampling: SamplingParams = node.sampling(req.temperature, req.seed, req.top_p)
        self.mode, self.stops = req.mode, [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        self.completion_tokens, self.stats, self.error, self.stopped = 0, {}, None, False

    @property
    def finish_reason(self) -> str:
        if self.stopped:
            return "stop"
        if self.error:
            return "error"
        return "length" if self.completion_tokens >= self.max_tokens else "stop"

    @property
    def usage(self) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": self.completion_tokens, "total_tokens": n + self.completion_tokens}

    async def spans(self) -> AsyncIterator[list[Span]]:
        """Yield the spans that can be sent, once per piece the node commits (possibly none: held back
        for a stop string). Raises EdgeBusy/ValueError only before its first yield."""
        text, stop, box = TokenText(self.node.detokenize), StopMatcher(self.stops), []
        started = False
        try:
            async with aclosing(self.node.stream(self.prompt_ids, self.max_tokens, self.sampling, self.mode, box,
                                                 self.request.get(ARRIVED))) as pieces:
                try:
                    async for piece in pieces:
                        started = True
                        self.completion_tokens += len(piece.token_ids)
                        out = stop.push(text.spans(list(piece.token_ids), list(piece.sources)))
                        yield out
                        if stop.stopped:
                            break
                except Exception as e:     # after the first piece: the answer so far stands, the end says why
                    if not started:
                        raise
                    self.error = f"{type(e).__name__}: {e}"
                    log.warning("generation failed mid-stream: %s", self.error)
            self.stopped = stop.stopped
            tail = stop.push(text.flush()) + stop.flush()
            if tail:
                yield tail
        finally:
            self.stats = box[0].as_dict() if box else {}
            self.error = self.error or self.stats.get("error")
            if started or self.error:
                record_generation(self.request.app, self.endpoint, self.stats)


def _api_value_error(e: ValueError) -> ApiError:
    return ApiError(400, str(e), code="invalid_value")


async def _first(gen: Generation, it: AsyncIterator[list[Span]]) -> Optional[list[Span]]:
    """The first batch of spans, translating a refusal before any token into an HTTP answer."""
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None
    except EdgeBusy as e:
        raise ApiError(429, str(e), code="rate_limit_exceeded",
                       headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
    except ValueError as e:
        raise _api_value_error(e) from None


class _Shape:
    """The OpenAI objects of one endpoint."""

    def __init__(self, request: web.Request, chat: bool):
        self.chat, self.model = chat, _model_name(request)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, gen: Generation, spans: list[Span]) -> dict:
        text = "".join(s.text for s in spans)
        toks = [s for s in spans if s.token_id is not None]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": gen.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}
        tandem = {**gen.stats, "error": gen.error, "token_ids": [s.token_id for s in toks],
                  "sources": [s.source for s in toks]}
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": gen.usage, "tandem": tandem}

    def chunk(self, text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def content_chunk(self, spans: list[Span], role: bool = False) -> dict:
        toks = [s for s in spans if s.token_id is not None]
        return {**self.chunk("".join(s.text for s in spans), role=role),
                "tandem": {"token_ids": [s.token_id for s in toks], "sources": [s.source for s in toks],
                           "texts": [s.text for s in toks]}}

    def usage_chunk(self, gen: Generation) -> dict:
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": gen.usage}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _respond(request: web.Request, gen: Generation, req: _Request, shape: _Shape) -> web.StreamResponse:
    """Run the generation for this request: one JSON answer or an SSE stream. Stops it when the
    client goes away (ClientGone: nothing is answered)."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    state = {"resp": None}
    try:
        user_rtt = user_rtt_ms(request) if req.stream else None    # paces the stream (edge/sse_pacer.py)
    except BadClientRtt as e:
        raise ApiError(400, str(e), param=USER_RTT_HEADER, code="invalid_value") from None

    async def whole() -> web.Response:
        answer: list[Span] = []
        async with aclosing(gen.spans()) as it:
            answer += await _first(gen, it) or []
            async for spans in it:
                answer += spans
        if gen.error and not gen.completion_tokens:
            raise ApiError(502, f"the generation failed: {gen.error}", code="generation_failed")
        return web.json_response(shape.response(gen, answer))

    async def stream() -> web.StreamResponse:
        async with aclosing(gen.spans()) as it:
            first = await _first(gen, it)         # 429/400 still possible: no header sent yet
            if first is None and gen.error:
                raise ApiError(502, f"the generation failed: {gen.error}", code="generation_failed")
            resp = state["resp"] = web.StreamResponse(headers=SSE_HEADERS)
            pacer = SsePacer(request.app[SSE_POLICY], user_rtt,
                             lambda spans: resp.write(_sse(shape.content_chunk(spans))))
            try:
                await resp.prepare(request)
                await resp.write(_sse(shape.content_chunk(first or [], role=shape.chat)))   # never held: TTFT
                async for spans in it:
                    if spans:
                        await pacer.add(spans)
                await pacer.close()                  # the last chunk is never held
            except ConnectionError:
                raise ClientGone() from None
            finally:
                pacer.cancel()
        try:
            last = {**shape.chunk(None if shape.chat else "", gen.finish_reason),
                    "tandem": {**gen.stats, "stream": pacer.figures()}}
            if gen.error:
                last["error"] = {"message": f"the generation failed after {gen.completion_tokens} tokens: {gen.error}",
                                 "type": "server_error", "param": None, "code": "generation_failed"}
                last["usage"] = gen.usage
            await resp.write(_sse(last))
            if include_usage and not gen.error:
                await resp.write(_sse(shape.usage_chunk(gen)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            raise ClientGone() from None
        return resp

    try:
        return await unless_client_gone(request, stream() if req.stream else whole())
    except ClientGone:
        log.info("%s: the client went away; its generation was stopped", request.path)
        return state["resp"] or web.Response(status=499)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    req = _parse(ChatRequest, await read_json_object(request), NEUTRAL)
    _check_model(request, req.model)
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens",
                       code="invalid_value")
    try:
        rtt_ms = user_rtt_ms(request)           # the user's link, for the network-aware prompt
    except BadClientRtt as e:
        raise ApiError(400, str(e), param=USER_RTT_HEADER, code="invalid_value") from None
    try:
        ids = node.encode_messages([m.as_template_message() for m in req.messages], user_rtt_ms=rtt_ms)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    gen = Generation(request, "chat", ids, req, req.max_completion_tokens or req.max_tokens)
    return await _respond(request, gen, req, _Shape(request, chat=True))


async def completions(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    req = _parse(CompletionRequest, await read_json_object(request), NEUTRAL_COMPLETIONS)
    _check_model(request, req.model)
    prompt: Any = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], (str, list)) else req.prompt
    ids = node.encode(prompt, raw=True) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    gen = Generation(request, "completions", ids, req, req.max_tokens)
    return await _respond(request, gen, req, _Shape(request, chat=False))


def _model_card(request: web.Request) -> dict:
    return {"id": _model_name(request), "object": "model", "created": request.app[STARTED], "owned_by": "tandem"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request)]})


async def get_model(request: web.Request) -> web.Response:
    _check_model(request, request.match_info["model"])
    return web.json_response(_model_card(request))


STARTED = web.AppKey("started", int)


SSE_POLICY = web.AppKey("sse_policy", object)     # Optional[Policy]: switches.rtt_batching


def add_routes(app: web.Application) -> None:
    app[STARTED] = int(time.time())
    app[SSE_POLICY] = coalesce_policy(app[NODE].cfg)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
