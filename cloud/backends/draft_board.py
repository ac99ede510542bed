"""Where edge drafts meet vLLM's scheduler: one long-lived engine request per edge session.

Pure Python (no vLLM import): the in-engine backend posts drafts here from the HTTP side, the
scheduler subclass (cloud/backends/vllm_plugins.py) asks it every engine step what each running
request may do, and the engine thread feeds it each step's new tokens to resolve rounds.

Semantics, for a session whose request holds tokens T (prompt + output, len n) and whose last
sampled token T[n-1] is not yet computed (a request in decode):
* A draft D is posted for position p0 (the edge drafted D after its committed context T[:p0]).
* Alignment by content: the request may already hold tokens past p0 (round 0: the prefill sampled
  T[p0] itself). While T[p0:n] == D[:n-p0] and n - p0 <= len(D), the request steps with spec tokens
  D[n-p0:] (possibly none: then the step only samples the token after D).
* The round resolves as soon as the produced tokens P = T[p0:] differ from D or run past it:
  accepted a = common prefix of P and D, next token = P[a] (the correction or the bonus). If the
  request finishes first (EOS, length), the last produced token is the next token.
* No draft posted for the current position: the request is *parked* (not scheduled; its KV blocks
  stay resident) until one arrives or `timeout_s` passes, after which the backend aborts it and the
  edge's next round gets a 409 and re-syncs.
* Padding (`pad`): every spec is filled to k slots with repeats of its last token, so every decode
  step has the same shape (1 + k tokens per request) and vLLM replays one CUDA graph for it instead
  of running the model eagerly. A pad is one more point-mass proposal: accepted only where it is the
  target's own token (greedy) or with exactly the target's probability (sampling), so the output is
  unchanged. Pads accepted beyond the draft leave the request holding tokens past the round's
  result; the next round's draft is aligned against them by content, as in round 0.
* Draft-ahead: while round r is in flight the edge may send round r+1, drafted after r's draft and
  its guess of r's next token (`expect` = that draft + the guess). It waits on the slot (`next`, one
  at most); when r resolves it becomes the round at once, on the engine thread, if the request's
  tokens then hold `expect` before its start (r accepted its whole draft and its next token is the
  guess), so the session is stepped again with no wire in between; else it is stale (`on_stale`)
  and the edge sends a fresh round. A round with `expect` posted after r resolved is checked at once.
* Oracle sessions (benchmarks) get their draft from a plan function at schedule time instead of
  over the wire; plain sessions (target-only reference) are never touched.

Greedy exactness: vLLM's rejection sampler accepts a draft token iff it equals the target's argmax
and samples the bonus/correction as the argmax, so the output equals greedy decoding of the same
engine (up to bf16 batch-shape effects at near-ties). Sampled exactness: the board passes no draft
probabilities, so vLLM treats each draft token x as a point-mass proposal: accept with p(x), else
sample from p with x removed, renormalised. P(y) = q(y)p(y) + sum_{x != y} q(x)(1-p(x)) p(y)/(1-p(x))
= p(y) for any law q the edge drew x from: exact, at a lower acceptance than min(1, p/q).
"""
from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

PARK = "park"          # spec_for(): do not schedule this request this step
ENDED = "the session's engine request ended"     # on_error's reason when the request goes under a round
STALE = "the round before did not end as guessed"   # a draft-ahead round's reason when it is dropped


class Waker:
    """threading.Event's set/clear/wait/is_set, plus fileno(): the engine process's engine thread waits
    for it and for its pipes in one select (vllm_engine_process.py)."""

    def __init__(self):
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._flag = False
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            if not self._flag:
                self._flag = True
                self._w.send(b"!")

    def clear(self) -> None:
        with self._lock:
            if self._flag:
                self._flag = False
                try:
                    self._r.recv(64)
                except BlockingIOError:
                    pass

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: Optional[float] = None) -> bool:
        if not self._flag:
            select.select([self._r], [], [], timeout)
        return self._flag

    def fileno(self) -> int:
        return self._r.fileno()

    def close(self) -> None:
        self._r.close()
        self._w.close()


@dataclass
class Round:
    start: int                                   # position of draft[0] in the request's tokens
    draft: list[int]
    posted: float
    on_done: Callable[[int, int], None]          # (accepted, next_token)
    on_error: Callable[[str], None]
    expect: Optional[list[int]] = None           # draft-ahead: tokens the request must hold just before start
    on_stale: Optional[Callable[[], None]] = None   # ... called when it does not


@dataclass
class Slot:
    req_id: str
    kind: str                                    # "edge" | "oracle" | "plain"
    tokens: list[int]                            # prompt + output seen so far
    rtt_ms: Optional[float] = None
    round: Optional[Round] = None
    next: Optional[Round] = None                 # draft-ahead: the round sent while `round` was in flight
    plan: Optional[Callable[[int, list[int]], list[int]]] = None   # oracle: (n, tokens) -> draft
    parked_since: float = field(default_factory=time.monotonic)
    resolved_at: Optional[float] = None          # when its last round was decided
    turnaround_s: Optional[float] = None         # EMA of resolved -> next draft posted (the edge's cycle)
    finished: bool = False
    seat: bool = False                           # holds a seat of the backend's WaitingRoom (given back once it ends)


def align(tokens: list[int], start: int, draft: list[int]) -> Optional[list[int]]:
    """Spec tokens for a request holding `tokens` given a draft for position `start`, or None when
    the round is already decided by the tokens produced since `start`."""
    m = len(tokens) - start
    if m < 0 or m > len(draft) or tokens[start:] != draft[:m]:
        return None
    return draft[m:]


def resolve(tokens: list[int], start: int, draft: list[int], finished: bool) -> Optional[tuple[int, int]]:
    """(accepted, next_token) once the tokens produced since `start` decide the round, else None."""
    produced = tokens[start:]
    a = 0
    while a < min(len(produced), len(draft)) and produced[a] == draft[a]:
        a += 1
    if len(produced) > a:
        return a, produced[a]
    if finished and produced:
        return len(produced) - 1, produced[-1]
    return None


class DraftBoard:
    """Thread-safe: HTTP handlers post rounds, the engine thread schedules and resolves them."""

    def __init__(self, timeout_s: float = 30.0, gather_ms: Optional[float] = 0.0, pad: bool = False):
        self.timeout_s = timeout_s
        self.pad = pad
        self.gather_s = None if gather_ms is None else gather_ms / 1e3   # None: one engine step
        self.step_s = 0.0                        # EMA of the engine's step time (0 until one is measured)
        self.last_output = 0.0                   # when the engine last produced tokens (a step ended)
        self.slots: dict[str, Slot] = {}
        self.lock = threading.Lock()
        self.wake = Waker()
        self.order_key: Callable[[Optional[float], float], float] = lambda rtt_ms, since: since
        self.reason = ""                         # why ready() last said go (engine statistics)
        self.cycles = [0, 0.0, 0.0]              # rounds posted after one resolved, s resolved -> posted, s posted -> here
        self.on_vacate: Optional[Callable[[], None]] = None   # a seated request ended: its seat is free

    # --- HTTP side ----------------------------------------------------------------------------
    def open(self, slot: Slot) -> None:
        with self.lock:
            self.slots[slot.req_id] = slot
        self.wake.set()

    def post(self, req_id: str, rnd: Round, rtt_ms: Optional[float]) -> None:
        with self.lock:
            slot = self.slots[req_id]
            slot.rtt_ms = rtt_ms
            if rnd.expect is not None and slot.round is not None:     # draft-ahead: waits for the round in flight
                if slot.next is None:
                    slot.next, calls = rnd, []
                else:
                    calls = [rnd.on_stale]                            # one round ahead at most
            else:
                if slot.resolved_at is not None and rnd.expect is None:
                    cycle = rnd.posted - slot.resolved_at
                    slot.turnaround_s = cycle if slot.turnaround_s is None else 0.7 * slot.turnaround_s + 0.3 * cycle
                    self.cycles[0] += 1
                    self.cycles[1] += cycle
                    self.cycles[2] += time.monotonic() - rnd.posted
                calls = self._begin(slot, rnd)
        for call in calls:
            call()
        self.wake.set()

    def _begin(self, slot: Slot, rnd: Optional[Round]) -> list[Callable[[], None]]:
        """Lock held: make rnd the slot's round and decide what the tokens already decide; a round
        that resolves promotes the one sent ahead of it. Returns the callbacks to run unlocked."""
        calls = []
        while rnd is not None:
            if rnd.expect is not None and slot.tokens[rnd.start - len(rnd.expect):rnd.start] != rnd.expect:
                calls.append(rnd.on_stale)               # the round before it did not end as the edge guessed
                rnd, slot.next = slot.next, None
                continue
            slot.round = rnd
            done = resolve(slot.tokens, rnd.start, rnd.draft, slot.finished)
            if done is None:
                if slot.finished:
                    slot.round = None
                    calls.append(partial(rnd.on_error, ENDED))
                break
            calls.append(partial(rnd.on_done, *done))
            slot.round = None
            slot.parked_since = slot.resolved_at = time.monotonic()
            rnd, slot.next = slot.next, None
        if slot.finished and slot.next is not None:
            calls.append(partial(slot.next.on_error, ENDED))
            slot.next = None
        return calls

    def holds(self, req_id: Optional[str], context: list[int]) -> bool:
        """Whether the request is live and holds `context` (and perhaps accepted pads past it), so a
        round after `context` can go on in it instead of a fresh request."""
        tokens = self.held(req_id)
        return tokens is not None and tokens[:len(context)] == context

    def held(self, req_id: Optional[str]) -> Optional[list[int]]:
        """The tokens a live request holds (the board's own list: read it, do not change it), or None
        (gone or finished). The engine thread only appends to it."""
        with self.lock:
            slot = self.slots.get(req_id) if req_id is not None else None
            return None if slot is None or slot.finished else slot.tokens

    def take_cycles(self) -> tuple[int, float, float]:
        """Engine statistics since the last call: rounds posted after their session's last one resolved,
        the seconds from that resolution to the new round's posting (answer out, edge, draft back) and
        from its posting to its arrival here, summed."""
        with self.lock:
            got, self.cycles = tuple(self.cycles), [0, 0.0, 0.0]
        return got

    def close(self, req_id: str) -> Optional[Slot]:
        """Forget a request; a round still waiting on it fails (its edge re-syncs)."""
        with self.lock:
            slot = self.slots.pop(req_id, None)
            vacated = slot is not None and self._vacate(slot)
        if vacated:
            self.on_vacate()
        for rnd in (slot.round, slot.next) if slot is not None else ():
            if rnd is not None:
                rnd.on_error(ENDED)
        return slot

    def _vacate(self, slot: Slot) -> bool:
        """Lock held: whether the slot gave up its seat just now (a finished or closed request holds no
        engine seat; each seat is given back once)."""
        if not slot.seat or self.on_vacate is None:
            return False
        slot.seat = False
        return True

    # --- scheduler side (engine thread) ---------------------------------------------------------
    def spec_for(self, req_id: str, tokens: list[int], k: int):
        """None: not ours, schedule as vLLM would; PARK: skip this step; else at most k spec tokens
        (exactly k when padding)."""
        slot = self.slots.get(req_id)
        if slot is None or slot.kind == "plain":
            return None
        if slot.kind == "oracle":
            spec = slot.plan(len(tokens), tokens)
        else:
            rnd = slot.round
            spec = None if rnd is None else align(tokens, rnd.start, rnd.draft)
            if spec is None:
                return PARK
        spec = spec[:k]
        if self.pad and len(spec) < k:
            spec = spec + [(spec or tokens)[-1]] * (k - len(spec))
        return spec

    def sort_key(self, req_id: str, arrival: float) -> float:
        slot = self.slots.get(req_id)
        if slot is None or slot.kind != "edge" or slot.round is None:
            return self.order_key(None, arrival)
        return self.order_key(slot.rtt_ms, slot.round.posted)

    def ready(self, now: float) -> tuple[bool, float]:
        """Whether the engine should step now and, if not, how long to wait at most.

        Gathering by expected arrival: a step costs about the same for few sessions as for many
        (decode reads all the weights), so once one draft is in, the engine waits for the parked
        sessions whose next draft is due (their last-resolved time + their turnaround EMA) within
        the window of that first draft (or of the last step's end, if the draft came during the step):
        until they have all posted or the window closes. The window is gather_ms, or by default one
        engine step (measured): a session that misses this step waits about a step for the next one,
        so waiting longer than that for it never pays. Fast-cycling
        edges (a near, loaded cloud) then share steps; slow ones (drafting on a phone, long RTT) are
        not waited for."""
        with self.lock:
            live = [s for s in self.slots.values() if not s.finished]
            edge = [s for s in live if s.kind == "edge"]
            others = len(live) - len(edge)
            posted = [s.round.posted for s in edge if s.round is not None]
            due = [s.resolved_at + s.turnaround_s for s in edge if s.round is None and s.turnaround_s is not None]
        if others or (posted and len(posted) == len(edge)):
            self.reason = "others" if others else "all posted"
            return True, 0.0
        if not posted:
            return False, 0.05
        window = self.step_s if self.gather_s is None else self.gather_s
        deadline = max(min(posted), self.last_output) + window   # the window opens when the engine is free
        if now >= deadline or not any(t <= deadline for t in due):
            self.reason = "window closed" if now >= deadline else "none due"
            return True, 0.0
        return False, deadline - now

    # --- output side (engine thread) --------------------------------------------------------------
    def stepped(self, seconds: float) -> None:
        """The engine finished a step that computed something: track its duration."""
        self.step_s = seconds if self.step_s == 0.0 else 0.8 * self.step_s + 0.2 * seconds

    def produced(self, req_id: str, new_tokens: list[int], finished: bool) -> None:
        self.last_output = time.monotonic()
        with self.lock:
            slot = self.slots.get(req_id)
            if slot is None:
                return
            slot.tokens.extend(new_tokens)
            slot.finished = finished
            calls = self._begin(slot, slot.round) if slot.round is not None or finished else []
            if finished and self._vacate(slot):
                calls.append(self.on_vacate)
        for call in calls:
            call()

    def expired(self, now: float) -> list[str]:
        """Edge requests parked past the timeout (their edge went away): the caller aborts them."""
        with self.lock:
            gone = [s.req_id for s in self.slots.values()
                    if s.kind == "edge" and s.round is None and now - s.parked_since > self.timeout_s]
        return gone
