"""The link emulator (ablations/linkemu.py): a TCP proxy on real loopback sockets that adds delay,
jitter, a bandwidth cap, stalls (loss as TCP shows it) and resets. Fast: no models; the Tandem check
uses the real cloud app with the fake table target.

Tolerances: a configured RTT shows up in the median measured round trip within [-0.5, +5] ms beyond
what the emulator adds at 0 ms (about 0.1 ms; ablations/results/linkemu_calibration.md), which must
itself stay under 2 ms here, and no round trip is ever shorter than the configured RTT. This machine
is shared (2 cores, load often above 4), so a window of 12 round trips that a burst of other work
made slow is measured again, up to 3 windows. A bandwidth-capped transfer takes its serialisation
time within 20 %; a stall adds its RTO (median excess under 10 ms, never less)."""
import asyncio
import hashlib
import json
import math
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ablations.linkemu import LinkEmulator, LinkProfile, start_echo
from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import load_config
from common.protocol import VerifyRequest
from conftest import TableBackend
from edge.link import CloudLink

ROOT = Path(__file__).resolve().parent.parent


def run(coro, timeout=30.0):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


async def round_trips(port, n, size=64, warmup=3):
    """Round trips (ms) of `size`-byte messages on one connection to an echo server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            writer.write(b"x" * size)
            await reader.readexactly(size)
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1e3)
    finally:
        writer.close()
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the profile -----------------------------------------------------------------------------------
def test_profile_parse_text_and_defaults():
    p = LinkProfile.parse("rtt=100,jitter=10,bw=10,loss=0.01")
    assert (p.rtt_ms, p.jitter_ms, p.bandwidth_mbps, p.stall_prob, p.rto_ms, p.handshake) == (100, 10, 10, 0.01, None, False)
    assert LinkProfile.parse(p.text()) == p
    assert LinkProfile.parse(" rtt = 5 , rto=auto, bw=none, handshake=1 ") == LinkProfile(rtt_ms=5, handshake=True)
    assert LinkProfile.parse("") == LinkProfile() == LinkProfile.parse("none")
    # the RTO: RFC 6298's SRTT + 4 RTTVAR shape with the 200 ms floor, unless given
    assert LinkProfile(rtt_ms=50, jitter_ms=10).stall_ms == 200.0
    assert LinkProfile(rtt_ms=300, jitter_ms=10).stall_ms == 340.0
    assert LinkProfile(rtt_ms=300, rto_ms=120).stall_ms == 120.0
    for bad, words in [("rtt=abc", "needs a number"), ("delay=5", "KEY=VALUE"), ("rtt", "KEY=VALUE"),
                       ("rtt=-1", ">= 0"), ("loss=2", "[0, 1]"), ("bw=0", "> 0"), ("rtt=1,rtt=2", "twice"),
                       ("handshake=maybe", "0 or 1"), ("rtt=nan", "finite")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            LinkProfile.parse(bad)


# --- delay -----------------------------------------------------------------------------------------
def test_configured_delay_shows_in_the_round_trip():
    async def main():
        echo = await start_echo()
        port = echo.sockets[0].getsockname()[1]
        emu = await LinkEmulator("127.0.0.1", port, LinkProfile()).start()
        try:
            assert emu.url == f"http://127.0.0.1:{emu.port}"
            direct = statistics.median(await round_trips(port, 60))
            overhead = statistics.median(await round_trips(emu.port, 60)) - direct
            assert overhead < 2.0, f"the emulator adds {overhead:.2f} ms at 0 ms configured"
            for rtt in (50.0, 100.0):
                emu.set_profile(LinkProfile(rtt_ms=rtt))
                # this machine is shared: a window of round trips hit by a burst of others' work is
                # measured again, up to 3 windows; the emulator is never early in any of them
                for attempt in range(3):
                    samples = await round_trips(emu.port, 12)
                    added = statistics.median(samples) - direct
                    assert min(samples) >= rtt - 0.5, samples     # a chunk never leaves before its time
                    if added <= rtt + overhead + 5.0:
                        break
                assert rtt - 0.5 <= added <= rtt + overhead + 5.0, (rtt, added, samples)
            s = emu.stats
            rounds = 63 + 15 * (s["connections"] - 1)            # one connection per window, warm-up included
            assert 3 <= s["connections"] <= 7 and s["chunks_up"] == s["chunks_down"] >= rounds
            assert s["bytes_up"] == s["bytes_down"] == 64 * rounds and s["stalls"] == 0
        finally:
            await emu.close()
            echo.close()
    run(main())


# --- bytes, order, EOF ------------------------------------------------------------------------------
async def source_sink(reader, writer, log=None):
    """Header (down_size, seed); then, at once: sends `down_size` seeded random bytes in random pieces, and
    reads until EOF; then sends sha256 + count of what it read, and closes."""
    down_size, seed = struct.unpack(">QI", await reader.readexactly(12))
    rand = random.Random(seed)
    payload = rand.randbytes(down_size)

    async def send():
        i = 0
        while i < down_size:
            n = rand.choice([1, 7, 1000, 4096, 65536, 200_000])
            writer.write(payload[i:i + n])
            i += n
            await writer.drain()

    async def receive():
        h, count = hashlib.sha256(), 0
        while chunk := await reader.read(65536):
            h.update(chunk)
            count += len(chunk)
        if log is not None:
            log["eof_s"] = time.perf_counter()
        return h.digest(), count
    _, (digest, count) = await asyncio.gather(send(), receive())
    writer.write(digest + struct.pack(">Q", count))
    await writer.drain()
    writer.close()


async def exchange(port, up_size, down_size, seed):
    """Send `up_size` random bytes in random pieces and EOF while receiving `down_size`; check both ways."""
    rand = random.Random(seed)
    up = rand.randbytes(up_size)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack(">QI", down_size, seed))

    async def send():
        i = 0
        while i < up_size:
            n = rand.choice([1, 3, 512, 8192, 65537, 300_000])
            writer.write(up[i:i + n])
            i += n
            await writer.drain()
            if rand.random() < 0.3:
                await asyncio.sleep(0.001)
        writer.write_eof()
    t0 = time.perf_counter()
    _, got = await asyncio.gather(send(), reader.read())       # read() returns at EOF
    down_s = time.perf_counter() - t0
    writer.close()
    assert len(got) == down_size + 40, (up_size, down_size, len(got))
    assert got[:down_size] == random.Random(seed).randbytes(down_size), "the down bytes differ"
    assert got[down_size:down_size + 32] == hashlib.sha256(up).digest(), "the up bytes differ"
    assert struct.unpack(">Q", got[-8:])[0] == up_size
    return down_s


def test_bytes_and_order_preserved_both_ways_under_jitter_and_stalls():
    async def main():
        server = await asyncio.start_server(source_sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        emu = await LinkEmulator("127.0.0.1", port, LinkProfile.parse("rtt=10,jitter=8,loss=0.05,rto=30"), seed=3).start()
        try:
            sizes = [(0, 0), (1, 0), (0, 1), (65535, 65537), (70_000, 1), (1, 300_000), (1_000_003, 777_777), (5, 5)]
            await asyncio.gather(*(exchange(emu.port, u, d, seed) for seed, (u, d) in enumerate(sizes)))
            s = emu.stats
            assert s["connections"] == len(sizes) and s["stalls"] > 0 and s["connect_failures"] == 0
            assert s["bytes_up"] == sum(u for u, _ in sizes) + 12 * len(sizes)
            assert s["bytes_down"] == sum(d for _, d in sizes) + 40 * len(sizes)
            for _ in range(100):                  # both ends closed: nothing left open
                if emu.stats["open"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert emu.stats["open"] == 0
        finally:
            await emu.close()
            server.close()
    run(main())


def test_jitter_varies_the_delay_and_keeps_order():
    async def main():
        echo = await start_echo()
        emu = await LinkEmulator("127.0.0.1", echo.sockets[0].getsockname()[1],
                                 LinkProfile(rtt_ms=20, jitter_ms=20), seed=1).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            sent, arrivals = {}, []

            async def send():
                for i in range(80):
                    sent[i] = time.perf_counter()
                    writer.write(struct.pack(">I", i))
                    await asyncio.sleep(0.003)

            async def receive():
                for _ in range(80):
                    (i,) = struct.unpack(">I", await reader.readexactly(4))
                    arrivals.append((i, (time.perf_counter() - sent[i]) * 1e3))
            await asyncio.gather(send(), receive())
            writer.close()
            assert [i for i, _ in arrivals] == list(range(80))             # order kept
            delays = [d for _, d in arrivals]
            assert emu.stats["chunks_up"] >= 40                           # chunk-level jitter, not per connection
            assert statistics.stdev(delays) > 3.0, statistics.stdev(delays)   # and it shows
            assert 10.0 < statistics.median(delays) < 80.0
        finally:
            await emu.close()
            echo.close()
    run(main())


def test_eof_propagates_after_pending_data():
    async def main():
        seen = {}

        async def server(reader, writer):
            data = await reader.read()                  # until the client's EOF
            seen["bytes"], seen["eof_s"] = data, time.perf_counter()
            writer.write(b"got %d" % len(data))         # half-close: the other way still works
            await writer.drain()
            writer.close()
        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        emu = await LinkEmulator("127.0.0.1", srv.sockets[0].getsockname()[1], LinkProfile(rtt_ms=100)).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            payload = random.Random(0).randbytes(200_000)
            t0 = time.perf_counter()
            writer.write(payload)
            writer.write_eof()
            reply = await reader.read()                 # until the server's EOF
            t1 = time.perf_counter()
            writer.close()
            assert seen["bytes"] == payload and reply == b"got 200000"
            assert 49.5 <= (seen["eof_s"] - t0) * 1e3 < 250      # the EOF came behind the data, one way later
            assert 99.5 <= (t1 - t0) * 1e3 < 400
        finally:
            await emu.close()
            srv.close()
    run(main())


def test_handshake_costs_one_more_rtt_on_a_new_connection():
    async def main():
        echo = await start_echo()
        emu = await LinkEmulator("127.0.0.1", echo.sockets[0].getsockname()[1],
                                 LinkProfile.parse("rtt=40,handshake=1")).start()
        try:
            t0 = time.perf_counter()                   # connect + the first round trip: 2 RTT, as over TCP
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            times = []
            for _ in range(2):
                writer.write(b"ping")
                await reader.readexactly(4)
                times.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
            writer.close()
            first, second = times
            assert 79.5 <= first < 150 and 39.5 <= second < 100, (first, second)
        finally:
            await emu.close()
            echo.close()
    run(main())


def test_a_slow_receiver_backpressures_the_sender():
    """The far end does not read for a while: the emulator stops reading too (its queue stays bounded by
    its in-flight limit) instead of buffering all the sender writes; then everything arrives intact.
    (Whether the sender's own writes block depends on the kernel's socket buffers: loopback autotunes
    them up to tcp_rmem's max, 32 MiB here.)"""
    from ablations.linkemu import CHUNK_MAX, INFLIGHT_HIGH
    size = 3 * INFLIGHT_HIGH + 12345

    async def main():
        release, got = asyncio.Event(), {}

        async def server(reader, writer):
            await release.wait()
            data = await reader.read()
            got["sha"], got["n"] = hashlib.sha256(data).digest(), len(data)
            writer.close()
        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        emu = await LinkEmulator("127.0.0.1", srv.sockets[0].getsockname()[1], LinkProfile(rtt_ms=2)).start()
        try:
            payload = random.Random(1).randbytes(size)
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            writer.write(payload)
            drained = asyncio.create_task(writer.drain())
            await asyncio.sleep(0.5)
            (conn,) = emu._conns
            assert conn.up.src_paused and conn.up.queued <= INFLIGHT_HIGH + 4 * CHUNK_MAX
            assert not conn.up.writable.is_set()      # the far end's socket is full, the emulator waits
            release.set()
            await drained
            writer.write_eof()
            await reader.read()
            writer.close()
            assert got == {"sha": hashlib.sha256(payload).digest(), "n": size}
        finally:
            await emu.close()
            srv.close()
    run(main())


# --- bandwidth, stalls ------------------------------------------------------------------------------
def test_bandwidth_cap_is_per_direction():
    """1 MB each way at 8 Mbit/s, both at once on one connection: each direction takes ~1 s."""
    async def main():
        log = {}
        srv = await asyncio.start_server(lambda r, w: source_sink(r, w, log), "127.0.0.1", 0)
        emu = await LinkEmulator("127.0.0.1", srv.sockets[0].getsockname()[1], LinkProfile(bandwidth_mbps=8)).start()
        try:
            t0 = time.perf_counter()
            await exchange(emu.port, 1_000_000, 1_000_000, seed=5)
            up_s = log["eof_s"] - t0
            down_s = time.perf_counter() - t0            # the down bytes, then the 40-byte digest
            assert 0.8 <= up_s <= 1.2, up_s
            assert 0.8 <= down_s <= 1.3, down_s
        finally:
            await emu.close()
            srv.close()
    run(main())


def test_a_stall_adds_about_one_rto_and_holds_what_follows():
    async def main():
        echo = await start_echo()
        emu = await LinkEmulator("127.0.0.1", echo.sockets[0].getsockname()[1],
                                 LinkProfile(stall_prob=0.3, rto_ms=150), seed=7).start()
        try:
            samples = await round_trips(emu.port, 20, size=8, warmup=0)
            # 0, 1 or 2 stalls per round trip; a stall is never short, and a scheduling hiccup (this machine
            # is shared) up to 130 ms does not count as one
            stalls = [math.floor((ms + 20) / 150) for ms in samples]
            assert sum(stalls) == emu.stats["stalls"] > 0 and 0 in stalls, samples
            assert all(ms >= 150 * k - 0.5 for ms, k in zip(samples, stalls)), samples
            assert statistics.median(ms - 150 * k for ms, k in zip(samples, stalls) if k) < 10, samples
            # head-of-line: a chunk behind a stalled one waits for it, though it did not stall itself
            emu.set_profile(LinkProfile(stall_prob=1.0, rto_ms=150))
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            writer.write(b"A")
            before = emu.stats["chunks_up"]
            while emu.stats["chunks_up"] == before:
                await asyncio.sleep(0.001)
            emu.set_profile(LinkProfile())
            t_b = time.perf_counter()
            writer.write(b"B")
            assert await reader.readexactly(2) == b"AB"
            waited_ms = (time.perf_counter() - t_b) * 1e3
            assert 150 * 0.8 <= waited_ms <= 200, waited_ms
            writer.close()
        finally:
            await emu.close()
            echo.close()
    run(main())


# --- faults ---------------------------------------------------------------------------------------
def test_reset_all_reaches_an_aiohttp_client_as_a_connection_error():
    async def main():
        ended = asyncio.Queue()

        async def slow(request):
            await asyncio.sleep(3)
            return web.Response(text="late")

        async def stream(request):
            resp = web.StreamResponse()
            await resp.prepare(request)
            try:
                for i in range(500):
                    await resp.write(b"line %d\n" % i)
                    await asyncio.sleep(0.02)
            except BaseException as e:                    # the server side sees the reset too
                await ended.put(type(e).__name__)
                raise
            return resp

        async def hello(request):
            return web.Response(text="hello")
        app = web.Application()
        app.router.add_post("/slow", slow)
        app.router.add_get("/stream", stream)
        app.router.add_get("/hello", hello)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        emu = await LinkEmulator("127.0.0.1", port, LinkProfile(rtt_ms=10)).start()
        try:
            async with aiohttp.ClientSession() as http:
                got_line = asyncio.Event()

                async def read_stream():
                    async with http.get(emu.url + "/stream") as r:
                        await r.content.readline()
                        got_line.set()
                        async for _ in r.content:
                            pass

                async def post_slow():       # a POST: aiohttp resends a GET once on a new connection
                    async with http.post(emu.url + "/slow", data=b"round") as r:
                        await r.read()
                streaming, waiting = asyncio.create_task(read_stream()), asyncio.create_task(post_slow())
                await got_line.wait()
                await asyncio.sleep(0.1)                       # the /slow request is at the server
                assert emu.stats["open"] == 2
                assert emu.reset_all() == 2
                with pytest.raises(aiohttp.ClientConnectionError):   # waiting for its answer
                    await waiting
                with pytest.raises(aiohttp.ClientError) as e:        # in the middle of a body
                    await streaming
                assert isinstance(e.value, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))
                assert await asyncio.wait_for(ended.get(), 2.0) in ("ConnectionResetError", "ClientConnectionResetError",
                                                                   "CancelledError")
                assert emu.stats["resets"] == 2 and emu.stats["open"] == 0
                async with http.get(emu.url + "/hello") as r:        # the link itself is still there
                    assert await r.text() == "hello"
        finally:
            await emu.close()
            await runner.cleanup()
    run(main())


def test_resets_are_resets_not_closes():
    """reset_all() reaches both raw ends as ECONNRESET (not a clean EOF); a client's own reset
    (SO_LINGER 0) reaches the server as a reset, one way later."""
    async def main():
        ends = asyncio.Queue()

        async def server(reader, writer):
            try:
                await reader.read()
                await ends.put(("eof", time.perf_counter()))
            except ConnectionResetError:
                await ends.put(("reset", time.perf_counter()))
            writer.close()
        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        emu = await LinkEmulator("127.0.0.1", srv.sockets[0].getsockname()[1], LinkProfile(rtt_ms=60)).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            writer.write(b"hello")
            await asyncio.sleep(0.1)
            assert emu.reset_all() == 1
            with pytest.raises(ConnectionResetError):
                await reader.read()
            assert (await asyncio.wait_for(ends.get(), 2.0))[0] == "reset"
            writer.close()
            # the client resets: the server sees it behind the data, ~30 ms (one way) later
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            writer.write(b"bye")
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t0 = time.perf_counter()
            writer.transport.abort()
            how, t1 = await asyncio.wait_for(ends.get(), 2.0)
            assert how == "reset" and 29.5 <= (t1 - t0) * 1e3 < 250
        finally:
            await emu.close()
            srv.close()
    run(main())


def test_an_unreachable_target_resets_the_client():
    async def main():
        emu = await LinkEmulator("127.0.0.1", free_port(), LinkProfile(rtt_ms=20)).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
            writer.write(b"hello")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5.0)
            writer.close()
            assert emu.stats["connect_failures"] == 1 and emu.stats["open"] == 0
        finally:
            await emu.close()
    run(main())


# --- Tandem: the edge's CloudLink through the emulator --------------------------------------------
def test_cloudlink_through_the_emulator_measures_the_rtt():
    cfg = load_config(overrides={"edge.retries": 1, "edge.connect_timeout_s": 2.0, "edge.request_timeout_s": 5.0})

    async def main():
        verifier = Verifier(TableBackend(), cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        emu = await LinkEmulator("127.0.0.1", int(url.rsplit(":", 1)[1]), LinkProfile(rtt_ms=40)).start()
        try:
            async with CloudLink(emu.url, cfg.edge) as link:
                assert link.up and link.transport == "ws"
                ctx, cloud_len = [1], 0
                walls = []
                for seq in range(25):     # SRTT forgets its first sample (a new connection's) at 7/8 a round
                    r, wall_ms = await link.verify(VerifyRequest(session_id="s", seq=seq, base_len=cloud_len,
                                                                 append=ctx[cloud_len:], draft=[(ctx[-1] + 1) % 32]))
                    assert r.accepted == 1 and wall_ms >= 39.5
                    walls.append(wall_ms)
                    ctx, cloud_len = ctx + [(ctx[-1] + 1) % 32, r.next_token], r.committed_len
                assert 30.0 <= link.rtt_ms <= 50.0, (link.rtt_ms, walls)
                assert 40.0 <= statistics.median(walls) <= 50.0, walls
                assert link.rounds_by_transport["ws"] == 25
            s = emu.stats
            assert s["connections"] >= 1 and s["bytes_up"] > 0 and s["bytes_down"] > 0   # /health, then /v1/ws
        finally:
            await emu.close()
            await runner.cleanup()
    run(main())


# --- the CLI the runner starts -----------------------------------------------------------------------
def spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "ablations.linkemu", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ping_ms(s: socket.socket, n: int) -> list[float]:
    """n echo round trips of 4 bytes over s, in ms."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += s.recv(16)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def test_cli_ready_line_delay_and_clean_exit():
    echo = spawn("--echo", "127.0.0.1:0")
    emu = None
    try:
        echo_port = int(echo.stdout.readline().strip().rsplit(":", 1)[1])
        emu = spawn("--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo_port}", "--profile", "rtt=30")
        line = emu.stdout.readline().strip()
        assert line.startswith("linkemu listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            samples = ping_ms(s, 10)
        assert 29.5 <= statistics.median(samples) <= 45.0, samples
        # the same port again: a clear message, exit 2
        busy = spawn("--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo_port}")
        out, err = busy.communicate(timeout=20)
        assert busy.returncode == 2 and "cannot listen" in err and "Traceback" not in err
        emu.terminate()
        out, err = emu.communicate(timeout=20)
        assert emu.returncode == 0 and "Traceback" not in err
        stats = json.loads(err.split("linkemu stats ", 1)[1])
        assert stats["connections"] == 1 and stats["bytes_up"] == stats["bytes_down"] == 40
    finally:
        for p in (echo, emu):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_cli_profiles_one_link_per_profile(tmp_path):
    """--profiles: one process, a link per profile on a port of its own, each with its own delay."""
    (tmp_path / "links.json").write_text(json.dumps(["rtt=5", "rtt=60"]))
    echo = spawn("--echo", "127.0.0.1:0")
    emu = None
    try:
        echo_port = int(echo.stdout.readline().strip().rsplit(":", 1)[1])
        emu = spawn("--target", f"127.0.0.1:{echo_port}", "--profiles", str(tmp_path / "links.json"))
        ports = [int(emu.stdout.readline().strip().rsplit(":", 1)[1]) for _ in range(2)]
        medians = []
        for port in ports:
            with socket.create_connection(("127.0.0.1", port)) as s:
                samples = ping_ms(s, 5)
            medians.append(statistics.median(samples))
        assert 4.5 <= medians[0] <= 30.0 and 59.5 <= medians[1] <= 85.0, medians
        emu.terminate()
        out, err = emu.communicate(timeout=20)
        stats = json.loads(err.split("linkemu stats ", 1)[1])
        assert [s["profile"] for s in stats] == ["rtt=5", "rtt=60"] and all(s["connections"] == 1 for s in stats)
    finally:
        for p in (echo, emu):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_cli_bad_input_is_a_message_not_a_traceback():
    for args, words in [(["--target", "127.0.0.1:1", "--profile", "rtt=fast"], "rtt needs a number"),
                        (["--target", "nowhere"], "is not HOST:PORT"),
                        ([], "--target HOST:PORT is needed")]:
        p = subprocess.run([sys.executable, "-m", "ablations.linkemu", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
