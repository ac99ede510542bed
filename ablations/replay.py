"""Light clients standing for edge users: each replays drafts recorded from the real drafter (by output
position, with the drafter's recorded time per round) against the cloud's real verify API over real
sockets (WebSocket /v1/ws as edge/link.py uses it, or POST /v1/verify), re-syncing after a 409 as the
edge does. The GPU jobs of ablations/gpu_vllm.py use light_worker/run_light; the RTT-population and
goodput experiments use the per-user clients below.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Optional

STOP = {151643, 151645}      # Qwen2.5's end-of-text and end-of-turn tokens
K = 4


def cut(toks: list[int], n: int) -> list[int]:
    """The first n tokens, ending at the first stop token (kept)."""
    out = []
    for t in toks[:n]:
        out.append(t)
        if t in STOP:
            break
    return out


def light_worker(url, sessions: list[dict], n_new: int, timed: bool, rtt_ms: float, out_q, start,
                 busy_poll_ms: float = 0.0, ws: bool = False, ahead: bool = False) -> None:
    """Trace-driven clients: each session replays recorded drafts by output position, on its own
    connection (as an edge device would: it stays with one front end) and re-syncing after a 409 as
    the edge does. ws: rounds over the WebSocket channel (/v1/ws), else one POST /v1/verify each.
    ahead: draft-ahead as the edge does it (edge/generator.py): round r+1 goes out with round r, drafted
    after r's draft and the drafter's guess of r's next token (the traces' "guess", from
    ablations/trace_guesses.py); it is the recorded next round, which is exactly the draft-ahead
    round whenever the guess holds (else the cloud answers 412 and the client sends it afresh).
    busy_poll_ms > 0: the process polls its sockets instead of sleeping while rounds are in flight
    (common/busy_poll.py), as the cloud's front ends do."""
    import aiohttp

    from common.busy_poll import BusyPoll
    busy = BusyPoll(busy_poll_ms / 1e3)
    if os.environ.get("LIGHT_CPUS"):                 # keep the harness off the cloud's cores
        os.sched_setaffinity(0, cpu_list(os.environ["LIGHT_CPUS"]))

    async def one(s):
        out, seq, base, ctx = [], 0, 0, list(s["prompt"])
        rounds = acc = resyncs = stale = 0
        lat = []                         # per round: client-seen ms, cloud handler ms, in-engine ms
        trace = {int(k): v for k, v in s["trace"].items()}
        guess = {int(k): v for k, v in s.get("guess", {}).items()} if ahead else {}

        def draft_at(pos):
            rec = trace.get(pos)
            return (rec[0] if rec else (s["fallback"][pos:pos + K] or [0])), (rec[1] if rec else 0.0)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2),
                                         timeout=aiohttp.ClientTimeout(total=600)) as http:
            send = await (ws_rounds(http, url) if ws else http_rounds(http, url))

            async def round_trip(body, wait_ms):
                if timed:
                    await asyncio.sleep((wait_ms + rtt_ms) / 1e3)
                t0 = time.perf_counter()
                busy.poke()
                st, data = await send(body)
                return st, data, (time.perf_counter() - t0) * 1e3

            pending = None               # (task, draft) a round sent ahead whose guess held
            while len(out) < n_new:
                if pending is None:
                    draft, ms = draft_at(len(out))
                    task = asyncio.ensure_future(round_trip({"session_id": s["sid"], "seq": seq, "base_len": base,
                                                             "append": ctx[base:], "draft": draft}, ms))
                else:
                    task, draft = pending
                pending, nxt = None, None
                g = guess.get(len(out))
                if g is not None and len(out) + len(draft) + 1 < n_new:
                    nxt_draft, ms = draft_at(len(out) + len(draft) + 1)
                    nxt = (asyncio.ensure_future(round_trip({"session_id": s["sid"], "seq": seq + 1,
                                                             "base_len": len(ctx) + len(draft) + 1, "append": [],
                                                             "draft": nxt_draft, "guess": g}, ms)), nxt_draft)
                st, data, wall = await task
                if st != 200 and nxt is not None:
                    await nxt[0]                              # stale or out of sync too: nothing verified
                if st == 409 and base and resyncs < 100:
                    base, resyncs = 0, resyncs + 1
                    continue
                if st != 200:
                    return {"sid": s["sid"], "error": f"{st} {data}", "out": out, "rounds": rounds, "acc": acc,
                            "resyncs": resyncs, "stale": stale}
                lat.append((wall, data["timing"]["server_ms"], data["timing"]["compute_ms"]))
                new = draft[:data["accepted"]] + [data["next_token"]]
                out += new
                ctx += new
                base, seq, rounds, acc = data["committed_len"], seq + 1, rounds + 1, acc + data["accepted"]
                if nxt is not None:
                    if new == draft + [g]:
                        pending = nxt                         # the cloud took it at once: it is round seq now
                    else:
                        await nxt[0]                          # 412: the client sends round seq afresh
                        stale += 1
                if any(t in STOP for t in new):
                    if pending is not None:
                        await pending[0]
                    break
            async with http.delete(f"{url}/v1/sessions/{s['sid']}") as r:
                await r.read()
        return {"sid": s["sid"], "out": cut(out, n_new), "rounds": rounds, "acc": acc, "error": None, "lat": lat,
                "resyncs": resyncs, "stale": stale}

    async def go():
        start.wait()                     # every client process is up: spawning is not the cloud's time
        t0 = time.time()
        res = await asyncio.gather(*[one(s) for s in sessions])
        out_q.put((t0, time.time(), res))
    asyncio.run(go())


async def http_rounds(http, url):
    """send(body) -> (status, answer): one POST /v1/verify per round."""
    async def send(body):
        async with http.post(url + "/v1/verify", json=body) as r:
            return r.status, await r.json()
    return send


async def ws_rounds(http, url):
    """send(body) -> (status, answer) over one WebSocket (/v1/ws); answers are matched by seq."""
    ws = await http.ws_connect(url + "/v1/ws")
    waiting: dict[int, asyncio.Future] = {}

    async def reader():
        async for msg in ws:
            data = json.loads(msg.data)
            fut = waiting.pop(data.get("seq"), None)
            if fut is not None and not fut.done():
                fut.set_result((data.pop("status", 200), data))
        for fut in waiting.values():
            if not fut.done():
                fut.set_result((599, {"error": "the WebSocket closed"}))
    task = asyncio.ensure_future(reader())

    async def send(body):
        fut = asyncio.get_running_loop().create_future()
        waiting[body["seq"]] = fut
        await ws.send_str(json.dumps(body))
        return await fut
    send.task = task                     # keeps the reader referenced
    return send


def cpu_list(spec: str) -> set[int]:
    """'0-5,8' -> {0, 1, 2, 3, 4, 5, 8}"""
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out




def run_light(url, sessions, n_new, procs=4, timed=False, rtt_ms=0.0, busy_poll_ms=0.0, ws=False,
              ahead=False) -> tuple[list[dict], float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [sessions[i::procs] for i in range(procs) if sessions[i::procs]]
    start = ctx.Barrier(len(shares) + 1)
    ps = [ctx.Process(target=light_worker, args=(url, share, n_new, timed, rtt_ms, q, start, busy_poll_ms, ws, ahead))
          for share in shares]
    for p in ps:
        p.start()
    start.wait(timeout=120)
    res, starts, ends = [], [], []
    for _ in ps:
        t0, t1, got = q.get(timeout=900)
        starts.append(t0)
        ends.append(t1)
        res += got
    for p in ps:
        p.join()
    return res, max(ends) - min(starts)      # first request sent .. last answer received, over all clients




class TracePlan:
    """Oracle drafts with the real edges' per-round shape: at output position j the recorded round
    drafted L tokens and had a accepted: propose fallback[j:j+a] + one wrong token (length L).
    A class, not a closure: it is pickled to the engine process."""

    def __init__(self, s: dict, vocab: int):
        self.n0, self.ref, self.vocab = len(s["prompt"]), s["fallback"], vocab
        self.acc = {int(k): v for k, v in s["accepted"].items()}

    def __call__(self, n, tokens):
        j = n - self.n0
        L, a = self.acc.get(j, (K, K - 1))
        d = self.ref[j:j + min(a, L)]
        if len(d) < L and j + len(d) < len(self.ref):
            d = d + [(self.ref[j + len(d)] + 1) % self.vocab]
        return d




# ==== users of an RTT population: per-user replay and plain-streaming clients ==========================
# The RTT mixture of the population experiment (seed 000's): (share, mean ms, sd ms), drawn per user,
# seeded, clipped at 1 ms. Its components are the RTT classes of ablations/bench.py (RTT_CLASS_BOUNDS_MS).
RTT_MIXTURE: tuple[tuple[float, float, float], ...] = ((0.50, 20.0, 10.0), (0.40, 200.0, 30.0),
                                                         (0.09, 700.0, 80.0), (0.01, 2000.0, 400.0))
RTT_FLOOR_MS = 1.0
# edge timing classes: cpu2 = the drafter's recorded ms per round (a 2-core CPU edge); fast = 10 ms per
# drafted token, standing for a laptop GPU or a phone NPU (prompt prefill not charged)
FAST_MS_PER_TOKEN = 10.0
TIMINGS = ("cpu2", "fast")


def sample_rtts(n: int, seed: int, mixture=RTT_MIXTURE) -> list[float]:
    """n users' RTTs (ms) from the mixture: a component per user by its share, then N(mean, sd),
    clipped at RTT_FLOOR_MS. Seeded: the same (n, seed) gives the same users."""
    import numpy as np
    rng = np.random.default_rng([seed, 14])
    shares = np.array([m[0] for m in mixture], dtype=float)
    comp = rng.choice(len(mixture), size=n, p=shares / shares.sum())
    rtts = [max(RTT_FLOOR_MS, float(rng.normal(mixture[c][1], mixture[c][2]))) for c in comp]
    return [round(r, 2) for r in rtts]


def load_traces(path) -> list[dict]:
    """Recorded sessions: {id, set, prompt, trace {pos: [draft, ms]}, accepted {pos: [L, a]}, fallback (the
    reference output)}. The device's ablations/results/gpu_traces15.json has no id/set: they come from
    results/gpu_prompts.json, whose order it follows."""
    from pathlib import Path
    path = Path(path)
    rows = json.loads(path.read_text())
    if rows and "set" not in rows[0]:
        prompts_file = path.parent / "gpu_prompts.json"
        meta = json.loads(prompts_file.read_text()) if prompts_file.exists() else []
        for i, r in enumerate(rows):
            if i < len(meta) and meta[i]["ids"] == r["prompt"]:
                r["id"], r["set"] = meta[i]["id"], meta[i]["set"]
            else:
                r["id"], r["set"] = f"trace{i}", "unknown"
    texts = None
    for r in rows:                       # the user's message, for real edges (their OpenAI API takes text)
        if "text" not in r and r["set"] in ("humaneval", "mtbench"):
            if texts is None:
                from common import prompts
                texts = {p.id: p.text for n in ("humaneval", "mtbench") for p in prompts.dataset(n)}
            r["text"] = texts.get(r["id"])
        if "guess" in r:
            r["guess_hit"] = guess_hits(r)
    return rows


def guess_hits(session: dict) -> dict[str, bool]:
    """Per recorded round (by output position): whether the drafter's guess after its whole draft (the trace's
    `guess`, ablations/trace_guesses.py) was the target's next token with the round accepting all of it: the
    draft-ahead round after it would have held. From the recorded answer (`fallback` as recorded)."""
    ref, out = session["fallback"], {}
    for pos, (L, a) in session["accepted"].items():
        j, g = int(pos), session["guess"].get(pos)
        out[pos] = a == L and g is not None and j + L < len(ref) and ref[j + L] == g
    return out


class DraftPlan:
    """A replayed session's drafts: plan(pos, out) -> (draft tokens, recorded draft ms) at output position pos
    after the answer `out` so far; plan.guess(pos, draft, out) -> the drafter's guess of the target's token
    after that whole draft (draft-ahead), or None where the answer ends first.

    drafts='recorded': the drafter's recorded draft at that output position while the answer so far is the
    recorded one (else the reference's next tokens, as a drafter that agrees with the target would).
    drafts='pattern': the recorded round's accept/reject pattern on the reference output (as TracePlan):
    it drafted L tokens and a were accepted -> reference[pos:pos+a] + one wrong token (a < L). For a target
    whose output is not the recorded one (another model, random weights): `session["fallback"]` is then its
    own greedy output.

    The guess: with recorded drafts, the trace's `guess` for that round (ablations/trace_guesses.py: the
    drafter's argmax after the round's whole draft) where the trace has one and the round is the recorded
    one; otherwise the reference's token after the draft. With pattern drafts, the reference's token after
    the draft, or a wrong one where the recorded guess after that round missed (`guess_hit`, from
    load_traces: the guess the confidence gate doubted is often wrong -- on the device's traces
    gpu_traces15.json it held after 98 % of the fully accepted HumanEval rounds and 59 % of the MT-Bench
    ones). A pattern round of L tokens is fully accepted exactly when the recorded round accepted all of them
    (a == L) and then the target's next token is the reference's; so the guess is right exactly when
    a == L and the recorded guess held. Traces without guesses (population_traces.json): right exactly when
    a == L, an optimistic replay assumption (a drafter that matched all L tokens taken to match the
    target's next one too). The cloud decides, as for a real edge: a wrong guess, or a round before it that
    did not accept all, gets 412."""

    def __init__(self, session: dict, drafts: str):
        self.drafts = drafts
        self.trace = {int(k): v for k, v in session.get("trace", {}).items()}
        self.acc = {int(k): v for k, v in session.get("accepted", {}).items()}
        self.guesses = {int(k): v for k, v in session.get("guess", {}).items()} if drafts == "recorded" else {}
        self.guess_hit = {int(k): v for k, v in session.get("guess_hit", {}).items()} if drafts == "pattern" else {}
        self.ref = session["fallback"]
        rounds_ms = [v[1] for k, v in sorted(self.trace.items()) if k > 0]
        self.typical_ms = sorted(rounds_ms)[len(rounds_ms) // 2] if rounds_ms else 150.0

    def _recorded(self, pos: int, out: list[int]) -> bool:
        return pos in self.trace and out == self.ref[:pos]

    def __call__(self, pos: int, out: list[int]) -> tuple[list[int], float]:
        rec = self.trace.get(pos)
        ms = rec[1] if rec else self.typical_ms
        ref = self.ref
        if self.drafts == "recorded":
            if self._recorded(pos, out):
                return list(rec[0]), ms
            return list(ref[pos:pos + K]) or [0], ms
        L, a = self.acc.get(pos, (K, K - 1))
        d = list(ref[pos:pos + min(a, L)])
        if len(d) < L and pos + len(d) < len(ref):
            d.append(ref[pos + len(d)] ^ 1)         # a token the target does not pick there
        return d or [0], ms

    def guess(self, pos: int, draft: list[int], out: list[int]) -> Optional[int]:
        if pos in self.guesses and self._recorded(pos, out) and draft == list(self.trace[pos][0]):
            return int(self.guesses[pos])
        nxt = pos + len(draft)
        if nxt >= len(self.ref):
            return None
        return self.ref[nxt] ^ 1 if self.guess_hit.get(pos) is False else self.ref[nxt]


def draft_plan(session: dict, drafts: str) -> DraftPlan:
    """The session's DraftPlan: draft_at(pos, out) -> (draft tokens, recorded draft ms)."""
    return DraftPlan(session, drafts)


async def _probe_rtt(http, url: str) -> float:
    t = time.perf_counter()
    async with http.get(url + "/health") as r:
        await r.read()
    return (time.perf_counter() - t) * 1e3


async def replay_user(user: dict, epoch_perf: float) -> dict:
    """One user: its request arrives at epoch_perf + user["arrival_s"] (perf_counter time) and is answered
    by the cloud at user["url"] (its own link) either as Tandem rounds (system 'tandem': the drafts of
    draft_plan, each after the edge timing's draft time, over user["transport"] ws|http, with the RTT the
    client measured as the edge reports it; user["parallel_prefill"] / user["draft_ahead"]: the edge's
    features of those names, see _tandem) or as the target's own stream (system 'plain': POST
    /v1/generate, NDJSON). user["deadline_s"] (optional): the request is cut this long after it was sent,
    its tokens so far counting (finish_reason "deadline"). Returns {"output": bench.RequestOutput as a dict, "tokens": output ids,
    "uid", "rtt_ms", "cloud_times" (each chunk's time at the cloud, s since sent: arrival minus RTT/2)}."""
    import dataclasses

    import aiohttp

    from ablations.bench import RequestOutput
    from common.rtt import RttEstimator
    url = user["url"]
    o = RequestOutput(id=user["id"], dataset=user["set"], rtt_class=user.get("rtt_class"),
                      prompt_len=len(user["prompt"]))
    est = RttEstimator()
    tokens: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2),
                                     timeout=aiohttp.ClientTimeout(total=1800)) as http:
        try:
            est.observe(await _probe_rtt(http, url))   # the edge's link is up (and measured) before its user comes
            send = None
            if user["system"] == "tandem":
                send = await (ws_rounds(http, url) if user.get("transport", "ws") == "ws" else http_rounds(http, url))
        except Exception as e:  # noqa: BLE001 - the user fails, the run goes on
            o.error = f"{type(e).__name__}: {e}"
            return {"uid": user["uid"], "output": dataclasses.asdict(o), "tokens": [], "rtt_ms": user["rtt_ms"],
                    "cloud_times": []}
        wait = epoch_perf + user["arrival_s"] - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        st = time.perf_counter()
        o.start_time = st - epoch_perf
        o.client_queue_time = max(0.0, -wait)          # late: its link was not set up by its arrival
        try:
            work = _plain(http, url, user, o, tokens, st) if user["system"] == "plain" else \
                _tandem(send, http, url, user, o, tokens, st, est)
            await asyncio.wait_for(work, user.get("deadline_s"))
        except asyncio.TimeoutError:             # cut at its deadline: what it received so far counts
            o.finish_reason = "deadline"
            if user["system"] == "tandem":       # free its seat now (an in-engine cloud would wait for its draft)
                with contextlib.suppress(Exception):
                    async with http.delete(f"{url}/v1/sessions/{user['sid']}",
                                           timeout=aiohttp.ClientTimeout(total=10)) as r:
                        await r.read()
        except Exception as e:  # noqa: BLE001 - a connection error: this user's request failed
            o.error = o.error or (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    if not o.error:
        if not o.chunk_times:
            o.error = "no tokens"
        else:
            o.success = True
            o.ttft = o.chunk_times[0]
            o.itl = [b - a for a, b in zip(o.chunk_times, o.chunk_times[1:])]
            o.latency = o.chunk_times[-1]
            if o.finish_reason == "deadline":       # it was still waiting for tokens then: TPOT counts to the cut
                o.latency = max(o.latency, user["deadline_s"])
            o.output_tokens = sum(o.chunk_tokens)
    half = user["rtt_ms"] / 2e3
    return {"uid": user["uid"], "output": dataclasses.asdict(o), "tokens": tokens, "rtt_ms": user["rtt_ms"],
            "cloud_times": [max(0.0, t - half) for t in o.chunk_times]}


def _chunk(o, tokens: list[int], new: list[int], n_new: int, st: float) -> bool:
    """Record the tokens of one answer as a chunk; True when the answer is complete."""
    room = cut(tokens + new, n_new)[len(tokens):]
    tokens += room
    if room:
        o.chunk_times.append(time.perf_counter() - st)
        o.chunk_tokens.append(len(room))
    return len(tokens) >= n_new or any(t in STOP for t in room)


async def _plain(http, url, user, o, tokens, st) -> None:
    body = {"session_id": user["sid"], "prompt": user["prompt"], "max_tokens": user["max_tokens"],
            "stop": sorted(STOP)}
    async with http.post(url + "/v1/generate", json=body) as r:
        if r.status != 200:
            o.error = f"HTTP {r.status}: {(await r.text())[:300]}"
            return
        async for line in r.content:
            if not line.strip():
                continue
            chunk = json.loads(line)
            if chunk.get("error"):
                o.error = chunk["error"]
                return
            if chunk.get("token_ids") and _chunk(o, tokens, chunk["token_ids"], user["max_tokens"], st):
                break
            if chunk.get("done"):
                break
    o.finish_reason = "stop" if tokens and tokens[-1] in STOP else "length"
    o.figures = {"mode": "cloud_only", "tokens": len(tokens), "rounds": 0, "drafted": 0, "accepted": 0,
                 "tokens_by_source": {"draft": 0, "target": len(tokens), "edge": 0}, "rtt_ms": user["rtt_ms"],
                 "fallbacks": 0}


@dataclass(eq=False)
class _Round:
    """A replayed round: the answer so far it was drafted after (out), its output position, its draft and
    draft ms, the guessed token before it (a draft-ahead round; None: a plain round), its seq and its verify
    call (None: drafted, not sent yet)."""
    out: list[int]
    draft: list[int]
    ms: float
    seq: int
    guess: Optional[int] = None
    task: Optional[asyncio.Future] = None

    @property
    def pos(self) -> int:
        return len(self.out)


def _sent(coro) -> asyncio.Future:
    """A round's verify call as a task; an answer nobody waits for any more (a dropped round's, a round in
    flight when the answer ended) is taken here, not reported as never retrieved."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _tandem(send, http, url, user, o, tokens, st, est) -> None:
    """Rounds as the edge's generator (edge/generator.py _speculate) makes them, with the edge features
    chosen per user (user["parallel_prefill"], user["draft_ahead"]; both off: one round at a time, each
    sent after its draft time, the first one's with the edge's prompt prefill).

    parallel_prefill: round 0 goes at once with the prompt and an empty draft (the cloud prefills while
    the edge does); the first drafted round is drafted meanwhile, after the prompt and the drafter's guess
    of round 0's token: the recorded round 0 (whose draft time includes the edge's prefill) split into its
    first token (the guess) and the rest (the draft), its draft time counted from round 0's send.
    draft_ahead: while round r is in flight the next one is drafted as if r accepts its whole draft followed
    by the guess (DraftPlan.guess) and sent, with `guess`, once its draft time has passed since r was sent
    (since r became the round in flight, for a round that was itself sent ahead); the cloud verifies it
    right after r, or answers 412 and the client drafts afresh. A round drafted ahead whose round before
    is answered first is held: it goes as a plain round if the answer is what it was drafted after, else
    it is dropped (as the edge does, the client first waits for its draft to end). Where r accepted less
    than its whole draft, the round drafted after it is dropped at once (its drafting cut short).

    The figures are the edge's (GenStats): rounds, drafted and accepted count verified rounds (round 0's
    empty draft too), draft_ms theirs; ahead_kept / ahead_dropped the rounds sent ahead that the cloud
    verified / refused (412)."""
    plan = draft_plan(user, user.get("drafts", "recorded"))
    fast = user.get("timing", "cpu2") == "fast"
    parallel_prefill, draft_ahead = bool(user.get("parallel_prefill")), bool(user.get("draft_ahead"))
    n_max, prompt = user["max_tokens"], list(user["prompt"])
    ctx, base, seq = list(prompt), 0, 0
    rounds = drafted = accepted = resyncs = kept = dropped = 0
    draft_ms = compute_ms = 0.0
    fly: Optional[_Round] = None             # the round in flight
    ahead: Optional[_Round] = None           # the round after it: sent ahead, or held
    ahead_job: Optional[asyncio.Future] = None   # drafting `ahead`, beside the answer
    stale: list[asyncio.Future] = []         # dropped rounds sent ahead whose answer (412) is due
    resend: Optional[_Round] = None          # a round to send again from base 0 (after a 409)

    async def timed(body):
        t = time.perf_counter()
        status, data = await send(body)
        return status, data, (time.perf_counter() - t) * 1e3

    def send_plain(r: _Round) -> None:
        body = {"session_id": user["sid"], "seq": r.seq, "base_len": base, "append": ctx[base:], "draft": r.draft}
        if base == 0:
            body["prompt_len"] = len(prompt)
        if est.srtt_ms is not None:
            body["rtt_ms"] = round(est.srtt_ms, 3)
        r.task = _sent(timed(body))

    async def draft_after(f: _Round, started: float) -> Optional[_Round]:
        """The round after f, drafted from `started` (f's send) while f flies; sent ahead if f is still in
        flight when its draft is done (draft_ahead), else held. None: the answer ends within f."""
        q = f.pos + len(f.draft) + 1
        if q >= n_max or any(t in STOP for t in f.draft):
            return None
        if not f.draft:                      # parallel prefill: the recorded first round, its first token the guess
            d0, ms = plan(f.pos, f.out)
            if not d0:
                return None
            g, d = d0[0], d0[1:]
        else:
            g = plan.guess(f.pos, f.draft, f.out)
            if g is None:
                return None
            d, ms = plan(q, f.out + f.draft + [g])
        ms = FAST_MS_PER_TOKEN * (len(d) + 1) if fast else ms     # the guess is drafted too
        await asyncio.sleep(max(0.0, started + ms / 1e3 - time.perf_counter()))
        a = _Round(f.out + f.draft + [g], d, ms, f.seq + 1, g)
        if draft_ahead and not f.task.done() and g not in STOP:
            body = {"session_id": user["sid"], "seq": a.seq, "base_len": len(prompt) + a.pos, "append": [],
                    "draft": d, "guess": g}
            if est.srtt_ms is not None:
                body["rtt_ms"] = round(est.srtt_ms, 3)
            a.task = _sent(timed(body))
        return a

    async def drop_ahead() -> None:
        """The round drafted after the one in flight is ruled out; a sent one's 412 is due."""
        nonlocal ahead, ahead_job, dropped
        if ahead_job is not None:
            ahead_job.cancel()
            await asyncio.wait((ahead_job,))
            if not ahead_job.cancelled() and ahead_job.exception() is None:
                ahead = ahead_job.result()
            ahead_job = None
        if ahead is not None and ahead.task is not None:
            stale.append(ahead.task)
            dropped += 1
        ahead = None

    try:
        while True:
            if fly is None:
                if ahead_job is not None:
                    ahead, ahead_job = await ahead_job, None
                if ahead is not None and ahead.out != tokens:
                    await drop_ahead()
                if ahead is not None and ahead.task is not None:
                    fly, ahead = ahead, None
                else:
                    if resend is not None:                      # a re-sync resends the same draft: drafted once
                        fly, resend = _Round(list(tokens), resend.draft, resend.ms, seq), None
                    elif ahead is not None and ahead.draft:      # drafted ahead, held: it is for this answer
                        fly = _Round(list(tokens), ahead.draft, ahead.ms, seq)
                    elif base == 0 and seq == 0 and parallel_prefill:
                        fly = _Round([], [], 0.0, seq)
                    else:
                        d, ms = plan(len(tokens), tokens)
                        ms = FAST_MS_PER_TOKEN * len(d) if fast else ms
                        await asyncio.sleep(ms / 1e3)
                        fly = _Round(list(tokens), d, ms, seq)
                    ahead = None
                    for task in stale:                          # its seq is ours now: let its 412 land first
                        with contextlib.suppress(Exception):
                            await task
                    stale = []
                    send_plain(fly)
            if ahead_job is None and (draft_ahead or (parallel_prefill and not fly.draft and fly.pos == 0)):
                ahead_job = asyncio.ensure_future(draft_after(fly, time.perf_counter()))
            status, data, wall = await fly.task
            r, fly = fly, None
            if status != 200:
                await drop_ahead()
                if status == 412 and r.guess is not None:      # sent ahead, and the round before ended otherwise
                    dropped += 1
                    continue
                if status == 409 and base and resyncs < 100:
                    base, resyncs, resend = 0, resyncs + 1, r
                    continue
                o.error = f"HTTP {status}: {str(data)[:300]}"
                return
            est.observe(wall - data["timing"]["server_ms"])
            n = data["accepted"]
            new = r.draft[:n] + [data["next_token"]]
            rounds, drafted, accepted = rounds + 1, drafted + len(r.draft), accepted + n
            kept += r.guess is not None
            draft_ms += r.ms
            compute_ms += data["timing"]["compute_ms"]
            ctx += new
            base, seq = data["committed_len"], r.seq + 1
            if n < len(r.draft):
                await drop_ahead()                 # it was drafted after the whole draft: ruled out
            if _chunk(o, tokens, new, n_max, st):
                break
    finally:                                       # the figures so far also for a user cut at its deadline
        for task in [ahead_job, *(x.task for x in (fly, ahead) if x is not None), *stale]:
            if task is not None and not task.done():
                task.cancel()
        o.figures = {"mode": "edge_cloud", "rounds": rounds, "drafted": drafted, "accepted": accepted,
                     "tokens": len(tokens), "tokens_by_source": {"draft": len(tokens) - min(rounds, len(tokens)),
                                                                  "target": min(rounds, len(tokens)), "edge": 0},
                     "compute_ms": round(compute_ms, 3), "compute_ms_per_round": round(compute_ms / max(rounds, 1), 3),
                     "draft_ms_per_round": round(draft_ms / max(rounds, 1), 3), "rtt_ms": est.srtt_ms, "fallbacks": 0,
                     "resyncs": resyncs, "timing": user.get("timing", "cpu2"), "parallel_prefill": parallel_prefill,
                     "draft_ahead": draft_ahead, "ahead_kept": kept, "ahead_dropped": dropped}
    with contextlib.suppress(Exception):
        async with http.delete(f"{url}/v1/sessions/{user['sid']}") as resp:
            await resp.read()
    o.finish_reason = "stop" if tokens and tokens[-1] in STOP else "length"


async def run_users_here(users: list[dict], epoch_perf: float) -> list[dict]:
    """Every user in this process's event loop."""
    return list(await asyncio.gather(*[replay_user(u, epoch_perf) for u in users]))


def _users_worker(users: list[dict], epoch_wall, start, out_q) -> None:
    if os.environ.get("LIGHT_CPUS"):                 # keep the clients off the cloud's cores
        os.sched_setaffinity(0, cpu_list(os.environ["LIGHT_CPUS"]))

    async def go():
        start.wait()
        # the parent's epoch (wall clock) as this process's perf_counter time
        epoch_perf = time.perf_counter() + (epoch_wall.value - time.time())
        out_q.put(await run_users_here(users, epoch_perf))
    asyncio.run(go())


class UserProcesses:
    """The users in `procs` spawned processes (users split round-robin), started at once against a common
    epoch: `with UserProcesses(users, procs) as up: epoch = up.go(); ...; results = up.results()`."""

    def __init__(self, users: list[dict], procs: int):
        ctx = mp.get_context("spawn")
        self.q = ctx.Queue()
        self.shares = [users[i::procs] for i in range(procs) if users[i::procs]]
        self.start = ctx.Barrier(len(self.shares) + 1)
        self.epoch = ctx.Value("d", 0.0)
        self.ps = [ctx.Process(target=_users_worker, args=(s, self.epoch, self.start, self.q), daemon=True)
                   for s in self.shares]

    def __enter__(self) -> "UserProcesses":
        for p in self.ps:
            p.start()
        return self

    def go(self, lead_s: float = 0.5) -> float:
        """Release the users; arrivals count from the returned wall-clock epoch (lead_s from now)."""
        self.epoch.value = time.time() + lead_s
        self.start.wait(timeout=300)
        return self.epoch.value

    def results(self, timeout_s: float = 3600) -> list[dict]:
        res = []
        for _ in self.shares:
            res += self.q.get(timeout=timeout_s)
        return sorted(res, key=lambda r: r["uid"])

    def __exit__(self, *exc) -> None:
        for p in self.ps:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# ==== recording traces on this machine ================================================================
async def _record(url: str, requests, threads: int, n_ctx: int, out_path) -> list[dict]:
    from tqdm import tqdm

    from common.config import load_config
    from edge.node import EdgeNode
    cfg = load_config(overrides={"draft.n_threads": threads, "draft.n_ctx": n_ctx, "edge.request_timeout_s": 300})
    rows = []
    async with EdgeNode(cfg, url) as node:
        await node.link.wait_up(60)
        for req in tqdm(requests, desc="record", unit="prompt"):
            ids = node.encode(req.prompt)
            box, out = [], []
            async for piece in node.stream(ids, req.max_tokens, node.sampling(temperature=0.0), None, box):
                out += piece.token_ids
            st = box[0]
            if st.error:
                raise RuntimeError(f"{req.id}: {st.error}")
            rows.append({"id": req.id, "set": req.dataset, "text": req.prompt, "prompt": ids, "fallback": out,
                         "trace": {str(pos): [d, ms] for pos, d, a, ms in st.trace},
                         "accepted": {str(pos): [len(d), a] for pos, d, a, ms in st.trace},
                         "stats": {k: v for k, v in st.as_dict().items() if k != "accept_hist"}})
            out_path.write_text(json.dumps(rows))
    return rows


def record(args) -> int:
    """Start the real cloud (start_cloud.py, its own process), run the real edge (llama.cpp drafter, our
    generator) here against it with no emulated link, greedy, one prompt at a time, and keep per prompt: the
    drafts by output position with the drafter's ms per round (its KV catch-up included), the accept counts,
    and the answer (greedy: the target's own answer, as Tandem's default mode gives it)."""
    from pathlib import Path

    from ablations.bench import load_requests
    from ablations.processes import Stack, start_cloud
    out = Path(args.out)
    reqs = [r for ds in args.datasets.split(",") for r in load_requests(ds, args.num_prompts, "heldout",
                                                                         args.max_tokens, args.seed)]
    sets = ["--set", f"cloud.n_threads={args.threads}", "--set", f"cloud.n_ctx={args.n_ctx}"]
    t0 = time.time()
    with Stack(Path(args.logs)) as stack:
        cloud = start_cloud(stack, sets, 300)
        rows = asyncio.run(_record(cloud.url, reqs, args.threads, args.n_ctx, out))
    import numpy as np
    ms = [v[1] for r in rows for k, v in r["trace"].items() if k != "0"]
    first = [r["trace"]["0"][1] for r in rows if "0" in r["trace"]]
    taus = [r["stats"]["mean_accepted_length"] for r in rows if r["stats"]["mean_accepted_length"]]
    print(f"recorded {len(rows)} prompts in {time.time() - t0:.0f} s -> {out}: draft ms/round p50 "
          f"{np.median(ms):.0f} (first round, with the prompt's prefill: {np.median(first):.0f}), tau {np.mean(taus):.2f}")
    return 0


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m ablations.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record drafts and draft timing with the real drafter against the real target")
    rec.add_argument("--out", default="ablations/results/population_traces.json")
    rec.add_argument("--datasets", default="humaneval,mtbench")
    rec.add_argument("--num-prompts", type=int, default=6, help="held-out prompts per dataset")
    rec.add_argument("--max-tokens", type=int, default=48)
    rec.add_argument("--seed", type=int, default=0, help="the prompts' order (as the benchmark's --seed)")
    rec.add_argument("--threads", type=int, default=1, help="threads of each model (cloud and drafter)")
    rec.add_argument("--n-ctx", type=int, default=2048)
    rec.add_argument("--logs", default="/tmp/tandem-record-logs")
    args = ap.parse_args(argv)
    return record(args)


if __name__ == "__main__":
    raise SystemExit(main())
