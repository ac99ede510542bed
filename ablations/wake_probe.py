"""How long a process that sleeps takes to wake on this machine: a pipe ping-pong and a loopback aiohttp
round trip, with the answering side pausing 0 or 3 ms (an engine step), each side sleeping or polling.

  python -m ablations.wake_probe      (results: ablations/results/wake_probe.md)
"""
import asyncio, multiprocessing as mp, selectors, sys, time

class SpinSelector(selectors.EpollSelector):
    def select(self, timeout=None):
        end = time.perf_counter() + (0.02 if timeout is None else min(timeout, 0.02))
        while True:
            ev = super().select(0)
            if ev or timeout == 0 or time.perf_counter() >= end:
                break
        if ev or timeout == 0:
            return ev
        rest = None if timeout is None else max(0.0, timeout - 0.02)
        return super().select(rest)

def responder(conn, delay, spin):
    while True:
        if spin:
            while not conn.poll(0):
                pass
        m = conn.recv()
        if m is None:
            return
        t = time.perf_counter()
        if delay:
            time.sleep(delay)
        conn.send(m)

def pingpong(delay, spin_req, spin_resp, n=300):
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=responder, args=(b, delay, spin_resp)); p.start()
    a.send(0); a.recv()
    ts = []
    for i in range(n):
        t0 = time.perf_counter(); a.send(i)
        if spin_req:
            while not a.poll(0):
                pass
        a.recv(); ts.append(time.perf_counter() - t0 - delay)
    a.send(None); p.join()
    ts.sort(); return round(ts[n // 2] * 1e6), round(ts[n * 9 // 10] * 1e6)

def http_server(port, spin, ready):
    from aiohttp import web
    async def h(req):
        body = await req.json()
        await asyncio.sleep(body["d"])
        return web.json_response({"ok": 1})
    async def main():
        app = web.Application(); app.router.add_post("/x", h)
        r = web.AppRunner(app, access_log=None); await r.setup()
        await web.TCPSite(r, "127.0.0.1", port).start(); ready.set()
        await asyncio.sleep(3600)
    loop = asyncio.SelectorEventLoop(SpinSelector()) if spin else asyncio.new_event_loop()
    loop.run_until_complete(main())

def http(delay, spin_srv, spin_cli, port, n=300):
    import aiohttp
    ctx = mp.get_context("spawn"); ready = ctx.Event()
    p = ctx.Process(target=http_server, args=(port, spin_srv, ready), daemon=True); p.start(); ready.wait(30)
    async def go():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            ts = []
            for i in range(n + 20):
                t0 = time.perf_counter()
                async with s.post(f"http://127.0.0.1:{port}/x", json={"d": delay}) as r:
                    await r.json()
                ts.append(time.perf_counter() - t0 - delay)
            ts = sorted(ts[20:]); return round(ts[n // 2] * 1e6), round(ts[n * 9 // 10] * 1e6)
    loop = asyncio.SelectorEventLoop(SpinSelector()) if spin_cli else asyncio.new_event_loop()
    res = loop.run_until_complete(go()); p.terminate(); return res

if __name__ == "__main__":
    import os
    print("cpus", os.cpu_count())
    for d in (0.0, 0.003):
        for sq, sr in ((0, 0), (1, 0), (0, 1), (1, 1)):
            print(f"pipe delay {d*1e3} ms spin req/resp {sq}/{sr}: p50/p90 us over delay", pingpong(d, sq, sr), flush=True)
    port = 18000
    for d in (0.0, 0.003):
        for ss, sc in ((0, 0), (1, 0), (0, 1), (1, 1)):
            port += 1
            print(f"http delay {d*1e3} ms spin srv/cli {ss}/{sc}: p50/p90 us over delay", http(d, ss, sc, port), flush=True)
