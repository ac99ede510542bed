"""A link emulator: a user-space TCP proxy on asyncio that puts an emulated network between the edge
and the cloud (this kernel has no sch_netem; the GPU machine has neither `ip` nor `tc`).

    python -m ablations.linkemu --listen 127.0.0.1:9000 --target 127.0.0.1:8080 --profile rtt=100,jitter=5

prints "linkemu listening on http://127.0.0.1:9000" when ready and runs until killed (SIGTERM/SIGINT:
its counters go to stderr as one JSON line). The edge points its cloud URL at the emulator.

The link, per direction (up: client -> target, down: target -> client):
- delay: each chunk (one read from a socket, at most 64 KiB) is released rtt/2 after it arrived, plus
  jitter: N(0, jitter/2) per direction, the chunk's delay clipped at 0. Release times never go
  backwards, so jitter never reorders bytes (TCP does not show reordering to applications either).
- bandwidth: a per-direction cap; a chunk leaves once the wire is free, after its serialisation time
  (bytes * 8 / bandwidth), then travels the delay.
- loss as TCP shows it to applications: no byte is lost; with probability `stall_prob` a chunk
  waits one retransmission timeout more, and every chunk behind it waits for it (head-of-line).
  The RTO defaults to max(200 ms, rtt + 4 * jitter): RFC 6298's SRTT + 4 RTTVAR with Linux's 200 ms floor.
- EOF (a half-close) travels the link behind the data before it; a reset from one end reaches the
  other end as a reset, behind the data before it; `reset_all()` resets every open connection at
  once on both sides (SO_LINGER 0), for fault tests.
- optional `handshake`: a new connection pays the TCP handshake (its first bytes reach the target no
  earlier than 1.5 RTT after the client connected), which a proxy otherwise hides. Off by default.
- in flight per direction: at most 4 MiB (like a TCP window); past it the proxy stops reading, and
  the sender feels backpressure.

What the proxy itself adds (measured with no configured delay) is in ablations/results/
linkemu_calibration.md: `python -m ablations.linkemu --calibrate`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import signal
import socket
import struct
import sys
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Optional

__all__ = ["LinkProfile", "LinkEmulator"]

log = logging.getLogger("tandem.linkemu")

CHUNK_MAX = 64 * 1024            # a chunk: one read, split at this size
INFLIGHT_HIGH = 4 * 1024 * 1024  # stop reading a direction's source past this many queued bytes
INFLIGHT_LOW = 1024 * 1024       # and read again below this
BATCH_MAX = 256 * 1024           # at most this much in one write (then wait until the destination takes it)
_EOF, _RST = object(), object()  # queue markers: a half-close, a reset


@dataclass
class LinkProfile:
    rtt_ms: float = 0.0                    # round trip added: rtt/2 each way
    jitter_ms: float = 0.0                 # per-chunk delay jitter: N(0, jitter/2) per direction, delay clipped at 0
    bandwidth_mbps: Optional[float] = None  # per-direction cap (serialisation delay); None: unlimited
    stall_prob: float = 0.0                # per chunk: a stall of one RTO (loss as TCP shows it), no bytes lost
    rto_ms: Optional[float] = None         # stall length; None: max(200, rtt + 4 * jitter)
    handshake: bool = False                # new connections pay the TCP handshake (1 RTT before data)

    # text keys (for CLIs and YAML) -> fields
    KEYS = {"rtt": "rtt_ms", "jitter": "jitter_ms", "bw": "bandwidth_mbps", "bandwidth": "bandwidth_mbps",
            "loss": "stall_prob", "stall": "stall_prob", "rto": "rto_ms", "handshake": "handshake"}

    def __post_init__(self):
        for name in ("rtt_ms", "jitter_ms", "stall_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"link profile: {name} must be a finite number >= 0 (got {value!r})")
            setattr(self, name, float(value))
        if self.stall_prob > 1:
            raise ValueError(f"link profile: stall_prob (loss) is a probability in [0, 1] (got {self.stall_prob})")
        for name in ("bandwidth_mbps", "rto_ms"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"link profile: {name} must be a finite number > 0, or None (got {value!r})")
            setattr(self, name, float(value))
        if not isinstance(self.handshake, bool):
            raise ValueError(f"link profile: handshake must be true or false (got {self.handshake!r})")

    @property
    def stall_ms(self) -> float:
        """How long a stall lasts: rto_ms, or max(200, rtt + 4 * jitter)."""
        return self.rto_ms if self.rto_ms is not None else max(200.0, self.rtt_ms + 4 * self.jitter_ms)

    @classmethod
    def parse(cls, text: str) -> "LinkProfile":
        """'rtt=100,jitter=10,bw=10,loss=0.01' (keys: rtt, jitter [ms], bw [Mbit/s, or none], loss [per
        chunk], rto [ms, or auto], handshake [0/1]); '' or 'none' is the bare link. ValueError on bad text."""
        text = (text or "").strip()
        if text.lower() in ("", "none", "direct"):
            return cls()
        values: dict = {}
        for item in text.split(","):
            key, sep, raw = (s.strip() for s in item.strip().partition("="))
            name = cls.KEYS.get(key.lower()) or (key if key in {f.name for f in fields(cls)} else None)
            if not sep or name is None:
                raise ValueError(f"link profile '{text}': '{item.strip()}' is not KEY=VALUE with KEY one of "
                                 f"{', '.join(cls.KEYS)}")
            if name in values:
                raise ValueError(f"link profile '{text}': {key} given twice")
            low = raw.lower()
            if name == "handshake":
                if low not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"link profile '{text}': handshake is 0 or 1 (got '{raw}')")
                values[name] = low in ("1", "true", "yes", "on")
            elif name in ("bandwidth_mbps", "rto_ms") and low in ("none", "auto", "inf", "unlimited"):
                values[name] = None
            else:
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise ValueError(f"link profile '{text}': {key} needs a number (got '{raw}')") from None
        return cls(**values)

    def text(self) -> str:
        """The profile as parse() reads it (for CLIs, reports): 'rtt=100,jitter=10,bw=10,loss=0.01'."""
        parts = [f"rtt={self.rtt_ms:g}"]
        if self.jitter_ms:
            parts.append(f"jitter={self.jitter_ms:g}")
        if self.bandwidth_mbps is not None:
            parts.append(f"bw={self.bandwidth_mbps:g}")
        if self.stall_prob:
            parts.append(f"loss={self.stall_prob:g}")
        if self.rto_ms is not None:
            parts.append(f"rto={self.rto_ms:g}")
        if self.handshake:
            parts.append("handshake=1")
        return ",".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def _rst(transport: Optional[asyncio.BaseTransport]) -> None:
    """Close a transport with a TCP reset (SO_LINGER 0), discarding what it had buffered."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _Direction:
    """One direction of one connection: chunks queued with release times, one task writing each
    when its time comes (sleeping until the head chunk's release, never polling)."""

    def __init__(self, emu: "LinkEmulator", conn: "_Connection", name: str, rng: random.Random):
        self.emu, self.conn, self.name, self.rng = emu, conn, name, rng
        self.loop = asyncio.get_running_loop()
        self.src: Optional[asyncio.Transport] = None     # read from
        self.dst: Optional[asyncio.Transport] = None     # written to
        self.queue: deque = deque()                      # (release_s, bytes | _EOF | _RST)
        self.queued = 0
        self.last_release = 0.0                          # release times never go backwards: order kept
        self.wire_free = 0.0                             # when the bandwidth-capped wire is free again
        self.wake = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.src_paused = False
        self.eof_queued = False                          # the source's EOF is on its way
        self.ended = False                               # the EOF went out
        self.stopped = False                             # nothing more goes this way
        self.task: Optional[asyncio.Task] = None

    # --- entry: the source's data, EOF, reset --------------------------------------------------
    def _delay_s(self, p: LinkProfile) -> float:
        delay = p.rtt_ms / 2e3
        if p.jitter_ms:
            delay = max(0.0, delay + self.rng.gauss(0.0, p.jitter_ms / 2e3))
        return delay

    def feed(self, data: bytes) -> None:
        if self.stopped:
            return
        p = self.emu.profile
        now = self.loop.time()
        c = self.emu._counters
        for i in range(0, len(data), CHUNK_MAX):
            piece = data[i:i + CHUNK_MAX]
            depart = now
            if p.bandwidth_mbps is not None:
                depart = max(now, self.wire_free) + len(piece) * 8 / (p.bandwidth_mbps * 1e6)
                self.wire_free = depart
            release = depart + self._delay_s(p)
            if p.stall_prob and self.rng.random() < p.stall_prob:
                release += p.stall_ms / 1e3
                c["stalls_" + self.name] += 1
            release = max(release, self.last_release)
            self.last_release = release
            c["chunks_" + self.name] += 1
            c["bytes_" + self.name] += len(piece)
            if (not self.queue and release <= now and self.dst is not None and self.task is not None
                    and self.writable.is_set()):
                self._write(piece)          # nothing to wait for: no hop through the task
                continue
            self.queue.append((release, piece))
            self.queued += len(piece)
        if self.queue:
            self.wake.set()
        if self.queued > INFLIGHT_HIGH and not self.src_paused and self.src is not None:
            self.src_paused = True
            self.src.pause_reading()

    def _feed_marker(self, marker) -> None:
        if self.stopped:
            return
        release = max(self.loop.time() + self._delay_s(self.emu.profile), self.last_release)
        self.last_release = release
        self.queue.append((release, marker))
        self.wake.set()

    def feed_eof(self) -> None:
        if not self.eof_queued:
            self.eof_queued = True
            self._feed_marker(_EOF)

    def feed_reset(self) -> None:
        """The source reset (or failed): the destination gets a reset, behind what is on its way
        (an EOF already sent included)."""
        self._feed_marker(_RST)
        self.stopped = True                     # nothing more from that source

    # --- exit: the task writing to the destination ---------------------------------------------
    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"linkemu-{self.conn.index}-{self.name}")

    def _write(self, data: bytes) -> None:
        if self.dst is not None and not self.dst.is_closing():
            self.dst.write(data)

    async def _run(self) -> None:
        loop = self.loop
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            wait = self.queue[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.writable.wait()
            # the head is due (the timer may fire a clock tick early); with it, all that is due by now
            now = loop.time()
            batch, size, marker = [], 0, None
            while self.queue and (not batch or self.queue[0][0] <= now and size < BATCH_MAX):
                _, item = self.queue.popleft()
                if item is _EOF or item is _RST:
                    marker = item
                    break
                batch.append(item)
                size += len(item)
                self.queued -= len(item)
            if batch:
                self._write(b"".join(batch) if len(batch) > 1 else batch[0])
            if self.src_paused and self.queued < INFLIGHT_LOW and self.src is not None:
                self.src_paused = False
                if not self.src.is_closing():
                    self.src.resume_reading()
            if marker is _EOF:          # the task stays: a reset may still follow
                self.ended = True
                if self.dst is not None and not self.dst.is_closing() and self.dst.can_write_eof():
                    self.dst.write_eof()
                self.conn.direction_ended()
            elif marker is _RST:
                _rst(self.dst)
                return

    def stop(self) -> None:
        """Nothing more goes this way (its destination is gone, or the connection is torn down)."""
        self.stopped = True
        self.queue.clear()
        self.queued = 0
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()


class _Side(asyncio.Protocol):
    """One end of a proxied connection: 'client' (accepted) or 'target' (the proxy's own connect)."""

    def __init__(self, conn: "_Connection", which: str):
        self.conn, self.which = conn, which

    def connection_made(self, transport):
        self.conn.made(self.which, transport)

    def data_received(self, data):
        self.conn.out_of(self.which).feed(data)

    def eof_received(self):
        self.conn.out_of(self.which).feed_eof()
        return True                         # keep the other half open: half-close

    def pause_writing(self):
        self.conn.into(self.which).writable.clear()

    def resume_writing(self):
        self.conn.into(self.which).writable.set()

    def connection_lost(self, exc):
        self.conn.lost(self.which, exc)


class _Connection:
    def __init__(self, emu: "LinkEmulator", index: int):
        self.emu, self.index = emu, index
        self.up = _Direction(emu, self, "up", random.Random(f"{emu.seed}:{index}:up"))
        self.down = _Direction(emu, self, "down", random.Random(f"{emu.seed}:{index}:down"))
        self.transports: dict[str, Optional[asyncio.Transport]] = {"client": None, "target": None}
        self.gone: set[str] = set()
        self.torn = False
        self.opener: Optional[asyncio.Task] = None

    def out_of(self, which: str) -> _Direction:
        return self.up if which == "client" else self.down

    def into(self, which: str) -> _Direction:
        return self.down if which == "client" else self.up

    def made(self, which: str, transport) -> None:
        _nodelay(transport)
        self.transports[which] = transport
        if which == "client":
            self.up.src = self.down.dst = transport
            now = self.up.loop.time()
            p = self.emu.profile
            if p.handshake:        # SYN, SYN-ACK, then the client's data: 1.5 RTT to the target, 2 back
                self.up.last_release = now + 1.5 * p.rtt_ms / 1e3
                self.down.last_release = now + 2.0 * p.rtt_ms / 1e3
            self.emu._conns.add(self)
            self.emu._counters["connections"] += 1
            self.opener = asyncio.create_task(self._open(), name=f"linkemu-{self.index}-connect")
        else:
            if "client" in self.gone or self.torn:     # the client left while we connected
                transport.abort()
                return
            self.down.src = self.up.dst = transport
            self.up.start()
            self.down.start()

    async def _open(self) -> None:
        emu = self.emu
        try:
            await emu._loop.create_connection(lambda: _Side(self, "target"), emu.target_host, emu.target_port)
        except OSError as e:
            emu._counters["connect_failures"] += 1
            log.warning("linkemu: cannot reach the target %s:%s (%s); resetting the client",
                        emu.target_host, emu.target_port, e)
            self.teardown(reset=True)

    def direction_ended(self) -> None:
        """An EOF went out; once both have, close both ends (their buffers flush first)."""
        if self.up.ended and self.down.ended:
            for t in self.transports.values():
                if t is not None and not t.is_closing():
                    t.close()

    def lost(self, which: str, exc) -> None:
        self.gone.add(which)
        self.into(which).stop()                   # nothing can reach it any more
        if exc is not None and not self.torn:     # it failed (a reset, a broken pipe): tell the other end
            self.out_of(which).feed_reset()
        if self.gone >= {"client", "target"} or (which == "client" and self.transports["target"] is None):
            if self.opener is not None and not self.opener.done():
                self.opener.cancel()
            self._finish()

    def teardown(self, reset: bool) -> None:
        """Both ends at once: a reset (SO_LINGER 0) or a plain abort."""
        self.torn = True
        self.up.stop()
        self.down.stop()
        if self.opener is not None and not self.opener.done() and self.opener is not asyncio.current_task():
            self.opener.cancel()
        for t in self.transports.values():
            if t is not None:
                _rst(t) if reset else t.abort()
        self._finish()

    def _finish(self) -> None:
        self.up.stop()
        self.down.stop()
        self.emu._conns.discard(self)


class LinkEmulator:
    """`emu = await LinkEmulator("127.0.0.1", cloud_port, LinkProfile(rtt_ms=50)).start()`; point the
    edge at `emu.url`; `await emu.close()`."""

    def __init__(self, target_host: str, target_port: int, profile: LinkProfile,
                 listen_host: str = "127.0.0.1", listen_port: int = 0, seed: int = 0):
        if not isinstance(profile, LinkProfile):
            raise TypeError(f"profile must be a LinkProfile (LinkProfile.parse(text) reads text), got {profile!r}")
        self.target_host, self.target_port = target_host, int(target_port)
        self.profile = profile
        self.listen_host, self.port = listen_host, int(listen_port)
        self.seed = seed
        self._server: Optional[asyncio.AbstractServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._conns: set[_Connection] = set()
        self._counters = {"connections": 0, "bytes_up": 0, "bytes_down": 0, "chunks_up": 0, "chunks_down": 0,
                          "stalls_up": 0, "stalls_down": 0, "resets": 0, "connect_failures": 0}

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.listen_host in ("", "0.0.0.0") else self.listen_host
        return f"http://{host}:{self.port}"

    async def start(self) -> "LinkEmulator":
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Side(_Connection(self, self._counters["connections"]), "client"),
            self.listen_host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> "LinkEmulator":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        tasks = []
        for conn in list(self._conns):
            tasks += [t for t in (conn.up.task, conn.down.task, conn.opener) if t is not None]
            conn.teardown(reset=False)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def set_profile(self, profile: LinkProfile) -> None:
        """A new profile for chunks from now on (queued chunks keep their release times)."""
        if not isinstance(profile, LinkProfile):
            raise TypeError(f"profile must be a LinkProfile, got {profile!r}")
        self.profile = profile

    def reset_all(self) -> int:
        """Fault test: reset (RST, SO_LINGER 0) every open connection on both sides, now. Returns how many."""
        conns = list(self._conns)
        for conn in conns:
            conn.teardown(reset=True)
        self._counters["resets"] += len(conns)
        return len(conns)

    @property
    def stats(self) -> dict:
        """connections (accepted), open, bytes/chunks/stalls per direction (up: client -> target) and
        in all, resets (by reset_all), connect_failures (target unreachable)."""
        c = dict(self._counters)
        c["open"] = len(self._conns)
        c["stalls"] = c["stalls_up"] + c["stalls_down"]
        c["profile"] = self.profile.text()
        return c


# --- a small echo server (for calibration and tests) ------------------------------------------------
class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        _nodelay(transport)
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False                        # close after echoing


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(_Echo, host, port, reuse_address=True)


# --- calibration: what the emulator adds ------------------------------------------------------------
CALIBRATION_LEVELS_MS = (0.0, 20.0, 100.0)      # configured RTTs; 0 is the overhead, the others the accuracy
MESSAGE_BYTES = 64


def _spawn(args: list[str], ready_prefix: str):
    """A `python -m ablations.linkemu ...` process and the address its ready line names."""
    import subprocess
    proc = subprocess.Popen([sys.executable, "-m", "ablations.linkemu", *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith(ready_prefix):
        proc.kill()
        raise RuntimeError(f"{' '.join(args)}: no ready line (got '{line}')")
    return proc, int(line.rsplit(":", 1)[1])


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except Exception:
        proc.kill()


def _round_trips(ports: list[int], rounds: int, warmup: int = 50) -> list[list[float]]:
    """Round trips (ms) of a MESSAGE_BYTES message on one connection per port, alternating between the
    ports round by round (so both see the same machine load). Blocking sockets, TCP_NODELAY."""
    import time
    socks = []
    for port in ports:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    msg = b"x" * MESSAGE_BYTES
    out = [[] for _ in ports]
    try:
        for r in range(warmup + rounds):
            for s, samples in zip(socks, out):
                t0 = time.perf_counter()
                s.sendall(msg)
                got = 0
                while got < MESSAGE_BYTES:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("the echo connection closed")
                    got += len(chunk)
                if r >= warmup:
                    samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        for s in socks:
            s.close()
    return out


def _summary(samples: list[float]) -> dict:
    import numpy as np
    a = np.asarray(samples)
    return {"median": round(float(np.median(a)), 4), "p90": round(float(np.percentile(a, 90)), 4),
            "p99": round(float(np.percentile(a, 99)), 4), "mean": round(float(a.mean()), 4),
            "max": round(float(a.max()), 4)}


def _meta(argv: list[str], load_before, load_after, uptime_before: str, uptime_after: str) -> dict:
    import datetime
    import os
    import platform
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "ablations/linkemu.py"))
    emulator_commit = git("log", "-1", "--format=%H", "--", "ablations/linkemu.py")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"command": "python -m ablations.linkemu " + " ".join(argv),
            "commit": commit + (" (ablations/linkemu.py modified)" if dirty else ""),
            "emulator_commit": emulator_commit,         # the last commit that changed ablations/linkemu.py
            "machine": f"{platform.machine()} {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
                       f"Python {platform.python_version()}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
            "load_avg_1_5_15_after": [round(x, 2) for x in load_after],
            "uptime_before": uptime_before, "uptime_after": uptime_after,
            "setup": "The echo server and the emulator each run as a separate process (`--echo`, the CLI); client: blocking "
                     f"sockets, TCP_NODELAY, one {MESSAGE_BYTES}-byte message per round trip, direct and via the "
                     "emulator alternating round by round on two kept-open connections, 50 warm-up rounds each"}


def calibrate(rounds: int, out_dir: str, argv: list[str]) -> int:
    import os
    import subprocess
    from pathlib import Path

    def uptime() -> str:
        try:
            return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
        except Exception:
            return ""
    load_before, up_before = os.getloadavg(), uptime()
    echo, echo_port = _spawn(["--echo", "127.0.0.1:0"], "echo listening on")
    rows, samples0 = [], None
    try:
        for rtt in CALIBRATION_LEVELS_MS:
            n = rounds if rtt == 0 else max(50, min(rounds, int(20_000 / rtt)))    # about 20 s a level
            emu, emu_port = _spawn(["--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo_port}",
                                    "--profile", f"rtt={rtt:g}"], "linkemu listening on")
            try:
                direct, via = _round_trips([echo_port, emu_port], n)
            finally:
                _stop(emu)
            d, v = _summary(direct), _summary(via)
            added = {k: round(v[k] - d[k], 4) for k in ("median", "p90", "p99", "mean")}
            rows.append({"configured_rtt_ms": rtt, "rounds": n, "message_bytes": MESSAGE_BYTES,
                         "direct_ms": d, "via_emulator_ms": v, "added_ms": added,
                         "added_minus_configured_ms": {k: round(x - rtt, 4) for k, x in added.items()}})
            print(f"rtt {rtt:g} ms, {n} rounds: direct median {d['median']:.3f} ms, via {v['median']:.3f} ms "
                  f"(p90 {v['p90']:.3f}, p99 {v['p99']:.3f}); added median {added['median']:.3f} ms", flush=True)
            if rtt == 0:
                samples0 = (direct, via)
    finally:
        _stop(echo)
    meta = _meta(argv, load_before, os.getloadavg(), up_before, uptime())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "linkemu_calibration"
    zero = rows[0]
    report = {"meta": meta, "overhead_at_0ms": {"round_trip_added_ms": zero["added_ms"],
                                                "direct_ms": zero["direct_ms"], "via_emulator_ms": zero["via_emulator_ms"]},
              "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(stem.with_suffix(".png"), samples0, rows)
    stem.with_suffix(".md").write_text(_markdown(report))
    print(f"wrote {stem}.json, .md, .png")
    return 0


def _plot(path, samples0, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, s in zip(("direct", "via the emulator (0 ms configured)"), samples0):
        x = np.sort(np.asarray(s))
        a.plot(x, np.arange(1, len(x) + 1) / len(x), label=label)
    a.set_xscale("log")
    a.set_xlabel("round trip, ms (64-byte message)")
    a.set_ylabel("fraction of round trips")
    a.set_title("At 0 ms configured: what the proxy adds")
    a.legend(fontsize=8)
    levels = [r["configured_rtt_ms"] for r in rows]
    for key, marker in (("median", "o"), ("p90", "s"), ("p99", "^")):
        b.plot(levels, [r["added_minus_configured_ms"][key] for r in rows], marker=marker, label=key)
    b.axhline(0, color="grey", lw=0.8)
    b.set_yscale("symlog", linthresh=1.0)
    b.set_xlabel("configured RTT, ms")
    b.set_ylabel("added − configured, ms")
    b.set_title("Accuracy: measured added delay − configured")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict) -> str:
    m, z = report["meta"], report["overhead_at_0ms"]
    lines = ["# Link emulator calibration", "",
             f"Command: `{m['command']}`  ", f"Commit: `{m['commit']}` (the emulator's own last change: `{m['emulator_commit'][:12]}`)  ", f"Machine: {m['machine']}  ",
             f"Date: {m['date']}", "",
             "What `ablations/linkemu.py` (the user-space TCP proxy every experiment with an RTT goes through) "
             "adds to a round trip. " + m["setup"] + ".", "",
             f"**At 0 ms configured, the emulator adds {z['round_trip_added_ms']['median']:.3f} ms to the median "
             f"round trip, {z['round_trip_added_ms']['p90']:.3f} ms at p90 and {z['round_trip_added_ms']['p99']:.3f} ms "
             "at p99** (via − direct, each percentile of its own distribution). Reports that use the emulator add "
             "this on top of their configured RTT.", "",
             "| configured RTT ms | rounds | direct median / p90 / p99 ms | via emulator median / p90 / p99 ms "
             "| added median / p90 / p99 ms | added − configured (median) ms |",
             "|---:|---:|---|---|---|---:|"]
    for r in report["rows"]:
        d, v, a = r["direct_ms"], r["via_emulator_ms"], r["added_ms"]
        lines.append(f"| {r['configured_rtt_ms']:g} | {r['rounds']} | {d['median']:.3f} / {d['p90']:.3f} / {d['p99']:.3f} "
                     f"| {v['median']:.3f} / {v['p90']:.3f} / {v['p99']:.3f} "
                     f"| {a['median']:.3f} / {a['p90']:.3f} / {a['p99']:.3f} "
                     f"| {r['added_minus_configured_ms']['median']:+.3f} |")
    lb, la = m["load_avg_1_5_15_before"], m["load_avg_1_5_15_after"]
    lines += ["", "![calibration](linkemu_calibration.png)", "",
              "## Conditions", "",
              f"The machine has {m['machine'].split(', ')[1]}, shared with other engineers' work while this ran "
              f"(builds, tests, model runs): load average (1/5/15 min) {lb[0]} / {lb[1]} / {lb[2]} before and "
              f"{la[0]} / {la[1]} / {la[2]} after (`uptime`: \"{m['uptime_before']}\" / \"{m['uptime_after']}\"). "
              "A load above the core count means runnable processes waited for a CPU, so the tails (p90, p99) "
              "include scheduling delay that a quiet machine would not show (the direct path's own p99 shows it "
              "too); direct and via were measured alternately on the same connections, so both carry the same "
              "load. Read the medians as the emulator's cost and the tails as this machine's.", "",
              "## How the emulator times chunks", "",
              "Each chunk (one read, up to 64 KiB) gets a release time: arrival + RTT/2 (+ jitter, + serialisation "
              "at the bandwidth cap, + one RTO if it stalls), never earlier than the chunk before it; one asyncio "
              "task per direction sleeps until the head chunk's release. With nothing configured and nothing queued "
              "a chunk is written at once from the read callback. With a delay, every hop wakes a process that went "
              "idle: the emulator's timer (asyncio sleeps here wake ~0.2 ms late: this VM's wake-up latency) and "
              "the receiving echo server or client; at 0 ms the processes never go idle between messages. That is "
              "the 'added − configured' column beyond the 0 ms overhead. Part of it (the receivers waking) a real "
              "link of that RTT would show too.", ""]
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------------
def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"'{text}' is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def _profile(text: str) -> LinkProfile:
    try:
        return LinkProfile.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


async def _serve(args) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.echo:
        server = await start_echo(*args.echo)
        print(f"echo listening on {args.echo[0]}:{server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()
        server.close()
        return 0
    host, port = args.listen
    if args.profiles is not None:       # one link per profile, each on a free port of its own, in order
        emus = [LinkEmulator(args.target[0], args.target[1], p, host, 0, seed=args.seed + i)
                for i, p in enumerate(args.profiles)]
    else:
        emus = [LinkEmulator(args.target[0], args.target[1], args.profile, host, port, seed=args.seed)]
    for emu in emus:
        try:
            await emu.start()
        except OSError as e:
            print(f"linkemu: cannot listen on {host}:{emu.port}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"linkemu listening on {emu.url}", flush=True)
    await stop.wait()
    stats = [emu.stats for emu in emus]
    for emu in emus:
        await emu.close()
    print("linkemu stats " + json.dumps(stats[0] if args.profiles is None else stats), file=sys.stderr, flush=True)
    return 0


def _profiles_file(path: str) -> list[LinkProfile]:
    """A JSON list of profile texts (--profiles): one link each."""
    try:
        texts = json.loads(open(path).read())
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("it must be a non-empty JSON list of profile texts")
        return [LinkProfile.parse(t) for t in texts]
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"--profiles {path}: {e}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ablations.linkemu",
                                 description="A user-space link emulator (TCP proxy): delay, jitter, bandwidth, "
                                             "stalls (loss as TCP shows it), resets.")
    ap.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), metavar="HOST:PORT",
                    help="where to listen (port 0: a free port; the ready line names it)")
    ap.add_argument("--target", type=_hostport, metavar="HOST:PORT", help="where to forward (the cloud)")
    ap.add_argument("--profile", type=_profile, default=LinkProfile(), metavar="TEXT",
                    help="e.g. rtt=100,jitter=10,bw=10,loss=0.01,rto=300,handshake=1 (ms, Mbit/s, per chunk)")
    ap.add_argument("--profiles", type=_profiles_file, default=None, metavar="FILE",
                    help="a JSON list of profile texts: one link per profile, each listening on a free port of the "
                         "--listen host (one ready line each, in order; link i's seed is --seed + i)")
    ap.add_argument("--seed", type=int, default=0, help="seed of jitter and stalls")
    ap.add_argument("--echo", type=_hostport, metavar="HOST:PORT", help="run an echo server instead (calibration)")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure what the emulator adds (echo server and emulator as processes) and write the report")
    ap.add_argument("--rounds", type=int, default=2000, help="--calibrate: round trips at 0 ms")
    ap.add_argument("--out", default="ablations/results", help="--calibrate: report directory")
    args = ap.parse_args(argv)
    if args.calibrate:
        if args.rounds < 10:
            ap.error("--rounds must be at least 10")
        return calibrate(args.rounds, args.out, argv if argv is not None else sys.argv[1:])
    if args.echo is None and args.target is None:
        ap.error("--target HOST:PORT is needed (or --echo, or --calibrate)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
