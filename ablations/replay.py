"""Light clients standing for edge users: each replays drafts recorded from the real drafter (by output
position, with the drafter's recorded time per round) against the cloud's real verify API over real
sockets (WebSocket /v1/ws as edge/link.py uses it, or POST /v1/verify), re-syncing after a 409 as the
edge does. The GPU jobs of ablations/gpu_vllm.py use light_worker/run_light; the RTT-population and
goodput experiments use the per-user clients below.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import time

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


