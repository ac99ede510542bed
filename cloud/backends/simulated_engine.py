"""A simulated in-engine backend: the real DraftBoard and an engine thread that steps it, with a rule
for a target instead of a model. For the protocol tests and the CPU front-end benchmark
(`ablations/frontend_cost.py`); the GPU run uses vLLM itself (`vllm_engine_backend.py`).

Each step takes `step_s` (a sleep: the GPU's share) and steps every unparked session once, as vLLM's
scheduler + rejection sampler would: accept the draft while it is the target's token, then add the
target's next token (the correction or the bonus). The target says last + 1 (mod vocab), except that
a multiple of 100 is said twice, so pads (repeats of a draft's last token) are sometimes accepted.
"""
from __future__ import annotations

import itertools
import threading
import time

from cloud.backends.board_backend import BoardBackend
from cloud.backends.draft_board import PARK, DraftBoard, Slot


def target_token(prev, last: int, vocab: int) -> int:
    return last if last % 100 == 0 and prev != last else (last + 1) % vocab


class SimulatedEngine(BoardBackend):
    name = "simulated-engine"

    def __init__(self, vocab: int = 1000, n_ctx: int = 512, step_s: float = 0.0, gather_ms=0.0,
                 abort_at: int = -1, max_inflight: int = 64):
        self.board = DraftBoard(60.0, gather_ms, pad=True)
        self.admit_sessions(max_inflight)           # sessions beyond max_inflight wait for a seat
        self.sessions: dict[str, str] = {}
        self.n_vocab, self.n_ctx, self.max_inflight = vocab, n_ctx, max_inflight
        self.step_s, self.abort_at = step_s, abort_at   # abort_at: at this step every request ends mid-round
        self.steps, self.requests, self.stepping_s = 0, 0, 0.0
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="simulated-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self.wait_input(0.0)
            go, wait = self.board.ready(time.monotonic())
            if go and self.step():
                self.flush_output()
                continue
            self.wait_input(wait if not go else 0.001)

    def step(self) -> bool:
        work = [(rid, slot, spec) for rid, slot in list(self.board.slots.items())
                if not slot.finished and (spec := self.board.spec_for(rid, slot.tokens, 4)) is not PARK]
        if not work:
            return False
        t0 = time.perf_counter()
        if self.step_s:
            time.sleep(self.step_s)
        ending, self.steps = self.steps == self.abort_at, self.steps + 1
        for rid, slot, spec in work:
            if ending:                          # the engine drops the request (e.g. preempted + aborted)
                self.board.produced(rid, [], finished=True)
                continue
            out, prev, last = [], ([None] + slot.tokens)[-2], slot.tokens[-1]
            for t in spec or []:                # greedy: accept while the draft is the target's token
                if t != target_token(prev, last, self.n_vocab):
                    break
                out.append(t)
                prev, last = last, t
            out.append(target_token(prev, last, self.n_vocab))
            self.board.produced(rid, out, finished=False)
        took = time.perf_counter() - t0
        self.stepping_s += took
        self.board.stepped(took)
        return True

    async def open_request(self, session_id, context, sampling, rtt_ms, reuse, rnd, priority) -> str:
        rid = f"req-{session_id}-{next(self._ids)}"
        self.requests += 1
        self.board.open(Slot(rid, "edge", list(context), seat=True))
        self.board.post(rid, rnd, rtt_ms)
        return rid

    def drop(self, session_id: str) -> None:
        rid = self.sessions.pop(session_id, None)
        if rid is not None:
            self.board.close(rid)

    async def engine_stats(self) -> dict:
        st = {"steps": self.steps, "stepping_s": round(self.stepping_s, 3)}
        self.steps, self.stepping_s = 0, 0.0
        return st

    def close(self) -> None:
        self.stop_engine_thread(self._thread, 5)
