"""The edge's one link to the cloud (edge/link.py): rounds of many sessions over one WebSocket,
errors, the cloud going away and coming back, an edge started before its cloud, the HTTP fallback,
the cloud's identity. A real cloud server on loopback; the target is the fake table (protocol only)."""
import asyncio
import logging
import math
import random
import socket
import time

import pytest
from aiohttp import web

from cloud.server import make_app
from cloud.verifier import Verifier
from common.config import load_config
from common.errors import CloudError, CloudUnavailable
from common.protocol import VerifyRequest
from common.rtt import RttEstimator
from conftest import TableBackend
from edge.link import CloudLink

N_VOCAB = 32


def edge_cfg(**kw):
    base = {"retries": 2, "retry_backoff_s": 0.05, "probe_down_interval_s": 0.1, "connect_timeout_s": 1.0,
            "request_timeout_s": 5.0, "reconnect_max_backoff_s": 0.5}
    return load_config(overrides={f"edge.{k}": v for k, v in (base | kw).items()}).edge


class SlowTable(TableBackend):
    """The table target, answering after a random pause (so answers overtake each other), and only
    while `gate` is open (so rounds can be held in flight)."""
    max_inflight = 64          # the verifier's admission queue lets them all in at once

    def __init__(self, seed=0):
        super().__init__()
        self.rand = random.Random(seed)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.failing: set[str] = set()     # sessions whose rounds fail inside the target (HTTP 500)

    async def alogits(self, session_id, tokens, n_logits, reuse, priority):
        if session_id in self.failing:
            self.calls += 1
            raise RuntimeError("the target broke")
        self.waiting += 1
        try:
            await self.gate.wait()
            await asyncio.sleep(self.rand.uniform(0, 0.01))
        finally:
            self.waiting -= 1
        return self.logits(session_id, tokens, n_logits, reuse)


class Cloud:
    """A Tandem cloud on loopback that counts the WebSockets opened to it; stop() and start() again
    on the same port act as a cloud killed and restarted (a fresh verifier: sessions are gone)."""

    def __init__(self, backend, websocket=True, **cloud_overrides):
        self.backend, self.websocket, self.overrides = backend, websocket, cloud_overrides
        self.port, self.runner, self.verifier, self.ws_opened, self.sockets = 0, None, None, 0, []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    async def start(self):
        cfg = load_config(overrides={f"cloud.{k}": v for k, v in self.overrides.items()})
        self.verifier = Verifier(self.backend, cfg.cloud, cfg.switches)
        app = make_app(self.verifier, cfg)
        self.ws_opened = 0

        async def count(request, response):
            if isinstance(response, web.WebSocketResponse):
                self.ws_opened += 1
                self.sockets.append(response)
        app.on_response_prepare.append(count)
        if not self.websocket:                 # a cloud without /v1/ws (an older one, or a proxy that drops upgrades)
            @web.middleware
            async def no_ws(request, handler):
                if request.path == "/v1/ws":
                    return web.json_response({"error": "not found"}, status=404)
                return await handler(request)
            app.middlewares.insert(0, no_ws)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        await self.runner.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(cond, timeout=5.0, what="condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def table_answer(context, draft):
    """What the table target answers: accepted draft tokens and its next token (argmax = last + 1)."""
    n, last = 0, context[-1]
    while n < len(draft) and draft[n] == (last + 1) % N_VOCAB:
        last, n = draft[n], n + 1
    return n, (last + 1) % N_VOCAB


def round_req(sid, seq, context, cloud_len, draft):
    return VerifyRequest(session_id=sid, seq=seq, base_len=cloud_len, append=context[cloud_len:], draft=draft)


async def run_session(link, sid, rounds, rand):
    """`rounds` verify rounds of one session, each answer checked against the table."""
    context, cloud_len = [rand.randrange(N_VOCAB)], 0
    for seq in range(rounds):
        draft = [(context[-1] + 1 + i) % N_VOCAB for i in range(rand.randint(1, 3))]
        if rand.random() < 0.5:
            draft[rand.randrange(len(draft))] = rand.randrange(N_VOCAB)     # sometimes a wrong guess
        resp, wall_ms = await link.verify(round_req(sid, seq, context, cloud_len, draft))
        n, nxt = table_answer(context, draft)
        assert (resp.session_id, resp.seq, resp.accepted, resp.next_token) == (sid, seq, n, nxt)
        assert wall_ms > 0
        context += draft[:n] + [nxt]
        cloud_len = resp.committed_len
        assert cloud_len == len(context)
    return context


def test_sixteen_sessions_share_one_websocket():
    async def main():
        cloud = await Cloud(SlowTable()).start()
        try:
            async with CloudLink(cloud.url, edge_cfg()) as link:
                assert link.up and link.transport == "ws"
                rand = random.Random(1)
                seeds = [random.Random(rand.random()) for _ in range(16)]
                await asyncio.gather(*(run_session(link, f"s{i}", 6, seeds[i]) for i in range(16)))
                assert cloud.ws_opened == 1 and link.transport == "ws" and link.reconnects == 0
                assert link.rounds_by_transport == {"ws": 96, "http": 0}
                assert cloud.verifier.stats.rounds == 96
                assert link.rtt_ms is not None and link.rtt.samples >= 96
                assert 0 < link.health_factor <= 1
                assert link.snapshot()["rounds_ws"] == 96
                # drop() is best effort in the background, and does reach the cloud
                for i in range(16):
                    await link.drop(f"s{i}")
                await until(lambda: not cloud.verifier.sessions, what="the drops")
        finally:
            await cloud.stop()
    asyncio.run(main())


def test_errors_raise_cloud_error_and_duplicates_replay():
    async def main():
        backend = SlowTable()
        cloud = await Cloud(backend).start()
        try:
            async with CloudLink(cloud.url, edge_cfg()) as link:
                a, _ = await link.verify(round_req("e", 0, [1, 2, 3], 0, [4, 9]))
                calls = backend.calls
                b, _ = await link.verify(round_req("e", 0, [1, 2, 3], 0, [4, 9]))   # a resend of the same round
                assert a == b and backend.calls == calls and cloud.verifier.stats.replayed == 1
                with pytest.raises(CloudError) as e:                                 # unknown session
                    await link.verify(round_req("nobody", 3, [1, 2], 2, [3]))
                assert e.value.status == 409 and e.value.body["field"] == "base_len"
                assert e.value.body["committed_len"] == 0 and e.value.body["error"]
                with pytest.raises(CloudError) as e:                                 # out of the vocabulary
                    await link.verify(round_req("e", 1, [1, 2, 3, 4, 5], 5, [99]))
                assert e.value.status == 422 and e.value.body["field"] == "draft"
                with pytest.raises(CloudError) as e:                                 # over max_draft (16)
                    await link.verify(round_req("e", 1, [1, 2, 3, 4, 5], 5, [6] * 17))
                assert e.value.status == 413
                # 4xx are answers, not outages: the link stays up, on its one WebSocket
                assert link.up and link.down_events == 0 and link.transport == "ws" and cloud.ws_opened == 1
                r, _ = await link.verify(round_req("e", 1, [1, 2, 3, 4, 5], 5, [6, 7]))
                assert (r.accepted, r.next_token, r.committed_len) == (2, 8, 8)
        finally:
            await cloud.stop()
    asyncio.run(main())


def test_cloud_killed_and_back(caplog):
    caplog.set_level(logging.INFO, logger="tandem.edge.link")
    cfg = edge_cfg()

    async def main():
        backend = SlowTable()
        cloud = await Cloud(backend).start()
        async with CloudLink(cloud.url, cfg) as link:
            contexts = {}
            for i in range(4):
                r, _ = await link.verify(round_req(f"k{i}", 0, [i, i + 1], 0, [i + 2]))
                contexts[f"k{i}"] = [i, i + 1, i + 2, r.next_token]
            backend.gate.clear()                 # the next rounds stay in flight
            pending = [asyncio.create_task(link.verify(round_req(sid, 1, ctx, len(ctx), [ctx[-1] + 1])))
                       for sid, ctx in contexts.items()]
            await until(lambda: backend.waiting == 4, what="rounds in flight")
            t0 = time.monotonic()
            await cloud.stop()                   # the cloud dies with 4 rounds in flight
            killed_s = time.monotonic() - t0
            results = await asyncio.gather(*pending, return_exceptions=True)
            failed_s = time.monotonic() - t0
            assert all(isinstance(r, CloudUnavailable) for r in results), results
            # within the retry budget: the backoffs, a refused connect per try, and the shutdown itself
            budget_s = sum(cfg.retry_backoff_s * 2 ** i for i in range(cfg.retries)) + 1.0
            assert failed_s < killed_s + budget_s, (failed_s, killed_s)
            assert not link.up and link.down_events == 1 and not link.became_up.is_set()
            t1 = time.monotonic()
            with pytest.raises(CloudUnavailable, match="down"):     # while down: at once, no budget spent
                await link.verify(round_req("k0", 1, contexts["k0"], 4, [9]))
            assert time.monotonic() - t1 < 0.05
            assert not await link.wait_up(0.2)

            backend.gate.set()
            await cloud.start()                  # the same port, a fresh cloud process (sessions gone)
            assert await link.wait_up(5.0)
            assert link.up and link.up_events == 1 and link.transport == "ws"
            assert link.reconnects == 1 and cloud.ws_opened == 1
            ctx = contexts["k0"]
            with pytest.raises(CloudError) as e:                    # the new cloud does not know k0
                await link.verify(round_req("k0", 1, ctx, len(ctx), [ctx[-1] + 1]))
            assert e.value.status == 409
            r, _ = await link.verify(round_req("k0", 2, ctx, 0, [ctx[-1] + 1]))   # re-sync: whole context
            assert (r.accepted, r.committed_len) == (1, len(ctx) + 2)
            assert cloud.ws_opened == 1 and link.transport == "ws"
            assert cloud.verifier.stats.rounds == 1
        await cloud.stop()
    asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("cloud down") for m in messages)
    assert any(m.startswith("cloud back") for m in messages)
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("cloud down") for r in caplog.records)


def test_websocket_dropped_while_the_cloud_stays_up():
    """The socket breaks (a proxy, a NAT timeout), not the cloud: the link reopens its WebSocket on
    its own, and the round that was in flight is resent and gets its one answer (replayed)."""
    async def main():
        backend = SlowTable()
        cloud = await Cloud(backend).start()
        try:
            async with CloudLink(cloud.url, edge_cfg()) as link:
                r, _ = await link.verify(round_req("d", 0, [1, 2], 0, [3]))
                backend.gate.clear()
                pending = asyncio.create_task(link.verify(round_req("d", 1, [1, 2, 3, 4], 4, [5, 7])))
                await until(lambda: backend.waiting == 1, what="the round in flight")
                await cloud.sockets[0].close()           # the cloud's end of the WebSocket goes away
                await until(lambda: link.reconnects == 1, what="the WebSocket to reopen")
                assert link.transport == "ws" and cloud.ws_opened == 2
                backend.gate.set()
                r, _ = await pending
                assert (r.seq, r.accepted, r.next_token, r.committed_len) == (1, 1, 6, 6)
                assert backend.calls == 2                # computed once: the resend got the stored answer
                assert cloud.verifier.stats.replayed == 1
                assert link.up and link.down_events == 0   # the cloud never went away
                r, _ = await link.verify(round_req("d", 2, [1, 2, 3, 4, 5, 6], 6, [7]))
                assert r.accepted == 1 and link.transport == "ws"
        finally:
            await cloud.stop()
    asyncio.run(main())


def test_5xx_is_retried_then_the_link_is_down_until_the_probe_sees_the_cloud():
    cfg = edge_cfg()

    async def main():
        backend = SlowTable()
        backend.failing.add("bad")
        cloud = await Cloud(backend).start()
        try:
            async with CloudLink(cloud.url, cfg) as link:
                with pytest.raises(CloudUnavailable, match="500") as e:
                    await link.verify(round_req("bad", 0, [1], 0, [2]))
                assert isinstance(e.value.__cause__, CloudError) and e.value.__cause__.status == 500
                assert backend.calls == cfg.retries + 1 and not link.up and link.down_events == 1
                # /health answers: the probe brings the link back (the generator then tries verified again)
                assert await link.wait_up(5.0)
                assert link.up_events == 1
                r, _ = await link.verify(round_req("good", 0, [1], 0, [2]))
                assert r.accepted == 1
        finally:
            await cloud.stop()
    asyncio.run(main())


def test_the_link_emulators_rtt_is_on_the_link():
    """The RTT of a path through the link emulator (as the experiments run it) is the link's RTT."""
    from ablations.linkemu import LinkEmulator, LinkProfile

    async def main():
        cloud = await Cloud(SlowTable()).start()
        emu = await LinkEmulator("127.0.0.1", cloud.port, LinkProfile(rtt_ms=40)).start()
        try:
            async with CloudLink(emu.url, edge_cfg()) as link:
                ctx, cloud_len = [1], 0
                for seq in range(3):
                    r, wall_ms = await link.verify(round_req("r", seq, ctx, cloud_len, [ctx[-1] + 1]))
                    assert wall_ms >= 39.5 and r.accepted == 1
                    ctx, cloud_len = ctx + [ctx[-1] + 1, r.next_token], r.committed_len
                assert 30.0 <= link.rtt_ms < 200.0        # SRTT: 7/8 of the first sample is gone after 3 rounds
                assert link.health_factor == pytest.approx(math.exp(-link.rtt_ms / 500.0))
        finally:
            await emu.close()
            await cloud.stop()
    asyncio.run(main())


def test_edge_starts_before_its_cloud():
    async def main():
        cloud = Cloud(SlowTable())
        cloud.port = free_port()
        async with CloudLink(cloud.url, edge_cfg()) as link:      # nothing listens there: no raise
            assert not link.up and link.down_events == 1 and link.transport == "http"
            with pytest.raises(CloudUnavailable):
                await link.verify(round_req("a", 0, [1], 0, [2]))
            await cloud.start()
            assert await link.wait_up(5.0)
            assert link.up_events == 1 and link.transport == "ws"
            r, _ = await link.verify(round_req("a", 0, [1], 0, [2, 3]))
            assert (r.accepted, r.next_token) == (2, 4) and cloud.ws_opened == 1
            assert link.rounds_by_transport == {"ws": 1, "http": 0}
        await cloud.stop()
    asyncio.run(main())


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_rounds_go_by_post_without_the_websocket(transport):
    """A cloud without /v1/ws (ws_connect refused): rounds go over HTTP POST; so do they all with
    edge.transport http, even where the cloud has the WebSocket."""
    async def main():
        cloud = await Cloud(SlowTable(), websocket=transport == "http").start()
        try:
            async with CloudLink(cloud.url, edge_cfg(transport=transport)) as link:
                assert link.up and link.transport == "http"
                await asyncio.gather(*(run_session(link, f"h{i}", 3, random.Random(i)) for i in range(4)))
                with pytest.raises(CloudError) as e:
                    await link.verify(round_req("nobody", 3, [1, 2], 2, [3]))
                assert e.value.status == 409 and e.value.body["committed_len"] == 0
                assert link.transport == "http" and link.rounds_by_transport["ws"] == 0
                assert link.rounds_by_transport["http"] == 13 and cloud.ws_opened == 0
        finally:
            await cloud.stop()
    asyncio.run(main())


def test_identity_and_url_checks():
    async def main():
        async def edge_health(request):
            return web.json_response({"status": "ok", "draft_model": "x", "cloud": None, "rtt_ms": None})
        app = web.Application()
        app.router.add_get("/health", edge_health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with CloudLink(url, edge_cfg()) as link:          # an edge's address: starts, not up
                with pytest.raises(ValueError, match=r"is not a Tandem cloud.*looks like a Tandem edge"):
                    await link.check_identity()
                assert not link.up
            async with CloudLink(url + "/nothing", edge_cfg()) as link:   # 404 text, not JSON
                with pytest.raises(ValueError, match="is not a Tandem cloud"):
                    await link.check_identity()
        finally:
            await runner.cleanup()
        cloud = await Cloud(SlowTable()).start()
        try:
            async with CloudLink(cloud.url + "/", edge_cfg()) as link:
                health = await link.check_identity()
                assert health["backend"] == "table" and health["protocol"] == 1
        finally:
            await cloud.stop()
        async with CloudLink(f"http://127.0.0.1:{free_port()}", edge_cfg()) as link:
            with pytest.raises(CloudUnavailable):
                await link.check_identity()
    asyncio.run(main())
    for url in ("127.0.0.1:8080", "localhost:8080/", "ws://127.0.0.1:8080"):
        with pytest.raises(ValueError, match=r"--cloud-url needs http:// or https://"):
            CloudLink(url, edge_cfg())


def test_a_cloud_with_a_token():
    """The token travels on the WebSocket too; a missing or wrong one is a clear 401, not 'not a cloud'."""
    async def main():
        cloud = await Cloud(SlowTable(), auth_token="s3cret").start()
        try:
            async with CloudLink(cloud.url, edge_cfg(auth_token="s3cret")) as link:
                assert link.up and link.transport == "ws"
                r, _ = await link.verify(round_req("t", 0, [1], 0, [2]))
                assert r.accepted == 1 and cloud.ws_opened == 1
            for token, reason in ((None, "requires a bearer token"), ("wrong", "wrong bearer token")):
                async with CloudLink(cloud.url, edge_cfg(auth_token=token)) as link:
                    assert not link.up and link.down_events == 1
                    with pytest.raises(CloudError, match=reason) as e:
                        await link.check_identity()
                    assert e.value.status == 401
        finally:
            await cloud.stop()
    asyncio.run(main())


def test_rtt_estimator_follows_rfc_6298():
    est = RttEstimator()
    assert est.srtt_ms is None and est.rto_ms is None
    est.observe(100.0)
    assert (est.srtt_ms, est.rttvar_ms, est.rto_ms) == (100.0, 50.0, 300.0)
    est.observe(200.0)     # RTTVAR first, from the SRTT before this sample
    assert est.rttvar_ms == pytest.approx(0.75 * 50 + 0.25 * 100)
    assert est.srtt_ms == pytest.approx(0.875 * 100 + 0.125 * 200)
    for _ in range(200):
        est.observe(40.0)
    assert est.srtt_ms == pytest.approx(40.0, abs=1e-6) and est.rttvar_ms < 1e-6
    est.observe(-3.0)      # clock noise: counts as 0
    assert est.last_ms == 0.0
    with pytest.raises(ValueError):
        est.observe(float("nan"))
