"""The edge's chat page in a real headless Chromium (Debian's `chromium`, installed by install.sh),
driven over the DevTools protocol with aiohttp's WebSocket client, against a real edge with real
models: the page loads, a question streams an answer, tokens carry provenance colours, the link's
RTT shows. Not skipped when Chromium is missing: it fails, so CI cannot pass without running it."""
import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import aiohttp
import pytest

from tests.edge_http import edge_server
from tests.realmodels import config

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0"]


class Browser:
    """One Chromium page over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.ids, self.events = ws, itertools.count(1), []

    async def send(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 60)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def eval(self, expression: str):
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_event(self, method: str, timeout: float = 60):
        t = time.perf_counter()
        while time.perf_counter() - t < timeout:
            for e in self.events:
                if e.get("method") == method:
                    self.events.remove(e)
                    return e
            try:
                self.events.append(await asyncio.wait_for(self.ws.receive_json(), 1))
            except asyncio.TimeoutError:
                pass
        raise TimeoutError(method)

    def errors(self) -> list:
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]


async def open_page(chromium_stderr):
    """The DevTools URL Chromium prints, then its first page's WebSocket."""
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    line = ""
    while "DevTools listening on" not in line:
        assert time.perf_counter() - t < 60, "Chromium did not start its DevTools server"
        line = (await loop.run_in_executor(None, chromium_stderr.readline)).decode(errors="replace")
        assert line or time.perf_counter() - t < 60
    port = re.search(r"ws://[^:]+:(\d+)/", line).group(1)
    threading.Thread(target=lambda: [None for _ in iter(chromium_stderr.readline, b"")], daemon=True).start()  # drain
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [p for p in await r.json() if p["type"] == "page"]
    return pages[0]["webSocketDebuggerUrl"]


STATE = """JSON.stringify((() => {
  const msgs = document.querySelectorAll('.msg.assistant');
  const m = msgs[msgs.length - 1];
  const toks = m ? [...m.querySelectorAll('.body .tok')] : [];
  const style = (cls) => { const s = m && m.querySelector('.body .' + cls); return s ? getComputedStyle(s).backgroundColor : null; };
  return {state: document.body.dataset.state, answers: msgs.length, text: m ? m.querySelector('.body').textContent : '',
          done: m ? m.dataset.done === '1' : false, finish: m ? m.dataset.finish : null,
          chunks: m ? Number(m.dataset.chunks || 0) : 0, tokens: toks.length,
          draft: toks.filter(t => t.classList.contains('tok-draft')).length,
          target: toks.filter(t => t.classList.contains('tok-target')).length,
          edge: toks.filter(t => t.classList.contains('tok-edge')).length,
          draftColour: style('tok-draft'), targetColour: style('tok-target'),
          figures: m && m.querySelector('.figures') ? m.querySelector('.figures').textContent : '',
          error: m && m.querySelector('.error') ? m.querySelector('.error').textContent : null,
          rtt: document.getElementById('rtt').textContent, cloud: document.getElementById('cloud-state').textContent,
          history: history.length};
})())"""


async def ask(page: Browser, question: str, max_tokens: int) -> tuple[dict, list]:
    await page.eval(f"document.getElementById('max-tokens').value = '{max_tokens}';"
                    f"document.getElementById('question').value = {json.dumps(question)};"
                    "document.getElementById('ask').requestSubmit(); true")
    seen, t = [], time.perf_counter()
    while True:
        s = json.loads(await page.eval(STATE))
        seen.append(s)
        if s["done"]:
            return s, seen
        assert time.perf_counter() - t < 300, s
        await asyncio.sleep(0.03)


def end_process_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the browser's whole process group, SIGKILL to what is left after `grace` s, and wait
    until no process of the group remains."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        t = time.perf_counter()
        while time.perf_counter() - t < grace:
            proc.poll()                               # reap the leader, so that it stops counting
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    proc.wait(10)


def test_chat_page_streams_an_answer_with_provenance_colours():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: install.sh installs it (apt-get install -y chromium)"
    with edge_server(config()) as server, tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        # its own session, so that ending it ends its helpers too (zygote, GPU and crash handlers), which
        # otherwise go on writing into the profile while it is being removed
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            first, seen_first, second = asyncio.run(drive(proc, server.url))
        finally:
            end_process_group(proc)
    # streamed: several SSE events, and text on screen before the answer was complete
    assert first["chunks"] >= 3, first
    assert any(s["text"] and not s["done"] and s["state"] == "streaming" for s in seen_first), seen_first[-3:]
    assert first["text"].strip() and first["error"] is None and first["finish"] in ("stop", "length")
    # every token coloured by where it came from; a verified answer has target tokens, and no edge-only ones
    assert first["tokens"] == first["draft"] + first["target"] + first["edge"] >= 1
    assert first["target"] >= 1 and first["edge"] == 0
    assert first["targetColour"] == "rgb(255, 227, 179)"
    assert first["draft"] == 0 or first["draftColour"] == "rgb(215, 245, 221)"
    assert "edge_cloud" in first["figures"] and "rounds" in first["figures"]
    # the link's live state, polled from /health
    assert first["cloud"] == "up" and re.fullmatch(r"\d+\.\d", first["rtt"]), first
    # multi-turn: the page keeps the conversation and sends it
    assert first["history"] == 2 and second["history"] == 4 and second["answers"] == 2 and second["text"].strip()


async def drive(proc, url):
    ws_url = await open_page(proc.stderr)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url, max_msg_size=0) as ws:
            page = Browser(ws)
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            await page.send("Page.navigate", url=url + "/")
            await page.wait_event("Page.loadEventFired")
            t = time.perf_counter()
            while json.loads(await page.eval(STATE))["cloud"] != "up":     # the page's /health poll
                assert time.perf_counter() - t < 20
                await asyncio.sleep(0.1)
            first, seen = await ask(page, "Write a Python function that adds two numbers.", 20)
            second, _ = await ask(page, "Now make it subtract them.", 8)
            assert not page.errors(), page.errors()
            return first, seen, second
