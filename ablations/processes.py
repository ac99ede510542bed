"""The processes of one experiment cell, started as a user starts them: `python start_cloud.py`,
`python -m ablations.linkemu`, `python start_edge.py`, each on a free loopback port, each logging to
a file of its own. They are stopped in reverse order on the way out, whatever the way out is: SIGINT
first (the servers close cleanly), SIGKILL to the process group after a grace period. On Linux each
child also gets SIGTERM if the runner itself dies (PR_SET_PDEATHSIG), so a killed runner leaves no
orphans holding the cores.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import json
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 15.0


def cpu_spec(cpus) -> str:
    """{0, 1, 2, 5} -> '0-2,5' (as `taskset -c` writes a CPU set)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


class ProcessFailed(RuntimeError):
    """A process exited or never became ready; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _child_setup(cpus: Optional[frozenset[int]] = None) -> None:   # runs in the child between fork and exec
    if cpus:                          # before exec: every thread and child of the process inherits it
        os.sched_setaffinity(0, cpus)
    # Ctrl-C's default action: a runner started in the background of a non-interactive shell inherits
    # SIGINT ignored, and its children would too; stop() asks them to end with SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


class Proc:
    """One child process with its log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cpus: Optional[frozenset[int]] = None):
        """cpus: run it on these CPUs only (its threads and children too)."""
        self.name, self.argv, self.log_path, self.cpus = name, argv, log_path, cpus
        self.url: Optional[str] = None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self._log.write(("$ " + (f"taskset -c {cpu_spec(cpus)} " if cpus else "") + " ".join(argv) + "\n").encode())
        self._log.flush()
        self.popen = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                      preexec_fn=functools.partial(_child_setup, cpus))

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def failed(self, why: str) -> ProcessFailed:
        return ProcessFailed(f"{self.name} {why} (log {self.log_path}); its last lines:\n{self.tail()}")

    def wait_line(self, pattern: str, timeout_s: float) -> re.Match:
        """Wait until the log has a line matching `pattern` (the process's "ready" line)."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout_s
        while True:
            m = rx.search(self.log_path.read_text(errors="replace").partition("\n")[2])   # past the "$ argv" line
            if m:
                return m
            if self.popen.poll() is not None:
                raise self.failed(f"exited with status {self.popen.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise self.failed(f"was not ready after {timeout_s:.0f} s")
            time.sleep(0.1)

    def wait_health(self, want: tuple[str, ...] = ("ok",), timeout_s: float = 60.0) -> dict:
        """GET {url}/health until its status is one of `want`."""
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    last = json.loads(r.read())
                    if last.get("status") in want:
                        return last
            except (OSError, ValueError) as e:
                last = repr(e)
            if self.popen.poll() is not None:
                raise self.failed(f"exited with status {self.popen.returncode}")
            if time.monotonic() > deadline:
                raise self.failed(f"/health did not say {want} within {timeout_s:.0f} s (last: {last})")
            time.sleep(0.2)

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return json.loads(r.read())

    def stop(self, grace_s: Optional[float] = None) -> Optional[int]:
        """SIGINT (clean shutdown), then SIGKILL to its whole process group after grace_s (default
        STOP_GRACE_S). Returns the exit status."""
        grace_s = STOP_GRACE_S if grace_s is None else grace_s
        p = self.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)       # anything it left in its group (engine children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
        self._log.close()
        return p.returncode


class Stack(contextlib.AbstractContextManager):
    """The processes of one cell; leaving the block stops them, newest first."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.procs = log_dir, []
        self.stopped: dict[str, dict] = {}      # name -> {pid, exit status}, once stopped

    def start(self, name: str, argv: list[str], cpus: Optional[frozenset[int]] = None) -> Proc:
        proc = Proc(name, argv, self.log_dir / f"{name}.log", cpus)
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc) -> None:
        while self.procs:
            proc = self.procs.pop()
            self.stopped[proc.name] = {"pid": proc.popen.pid, "exit": proc.stop()}


URL = r"(http://127\.0\.0\.1:\d+)"


def start_cloud(stack: Stack, set_args: list[str], timeout_s: float, cpus: Optional[frozenset[int]] = None) -> Proc:
    proc = stack.start("cloud", [sys.executable, "start_cloud.py", "--host", "127.0.0.1", "--port",
                                 str(free_port()), *set_args], cpus)
    proc.url = proc.wait_line(r"tandem cloud \(\w+\) serving on " + URL, timeout_s).group(1)
    proc.wait_health(timeout_s=timeout_s)
    return proc


def start_link(stack: Stack, target_url: str, profile: str, seed: int, timeout_s: float,
               cpus: Optional[frozenset[int]] = None) -> Proc:
    target = target_url.removeprefix("http://")
    proc = stack.start("linkemu", [sys.executable, "-m", "ablations.linkemu", "--listen", f"127.0.0.1:{free_port()}",
                                   "--target", target, "--profile", profile, "--seed", str(seed)], cpus)
    proc.url = proc.wait_line(r"linkemu listening on " + URL, timeout_s).group(1)
    return proc


def start_edge(stack: Stack, cloud_url: Optional[str], set_args: list[str], timeout_s: float,
               cpus: Optional[frozenset[int]] = None) -> Proc:
    argv = [sys.executable, "start_edge.py", "--host", "127.0.0.1", "--port", str(free_port()), *set_args]
    if cloud_url:
        argv += ["--cloud-url", cloud_url]
    proc = stack.start("edge", argv, cpus)
    proc.url = proc.wait_line(r"tandem edge serving on " + URL, timeout_s).group(1)
    proc.wait_health(("ok",), timeout_s=timeout_s)      # "degraded" until its link to the cloud is up
    return proc
