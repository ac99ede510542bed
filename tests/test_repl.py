"""The chat REPL (python main.py --mode interactive) driven as a person drives it: a real pseudo-terminal
as its controlling terminal (readline active), keys written to it, Ctrl-C as the terminal's own \\x03.

The fast tests run main.Repl over a scripted edge whose every piece of text comes from a worker thread
(as llama.cpp work does), so that Ctrl-C mid-answer must cancel the answer and wait for the thread;
the slow test runs the real main.py with the real draft model."""
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SCRIPTED = r'''
import asyncio, sys, time
from types import SimpleNamespace
from common.config import load_config
from common.interruptible_loop import InterruptibleLoop
from main import Repl, parse_args

class Stats:
    def __init__(self): self.tokens = 0
    def as_dict(self):
        return {"mode": "edge_only", "tokens": self.tokens, "total_ms": 1.0, "tokens_per_s": 1.0, "ttft_ms": 1.0,
                "rounds": 0, "acceptance_rate": None, "mean_accepted_length": None, "error": None}

class ScriptedEdge:
    """Answers 'word0 word1 ...' (slowly: each word is 0.25 s of work in a worker thread) and echoes how
    many messages the conversation held."""
    def __init__(self):
        self.cfg = load_config()
    def sampling(self, temperature=None, seed=None):
        return None
    def encode_messages(self, messages):
        time.sleep(0.3)                     # a template and a tokenizer take a moment
        self.messages = list(messages)
        return [1]
    def encode(self, text, raw=False):
        self.messages = None
        return [1]
    def _work(self, i):
        print(f"<worker {i} in>", file=sys.stderr, flush=True)
        time.sleep(0.25)
        print(f"<worker {i} left>", file=sys.stderr, flush=True)
        return f" word{i}"
    async def stream(self, ids, max_tokens, sampling, mode, box):
        stats = Stats()
        box.append(stats)
        await asyncio.sleep(0.05)           # a prefill, before the first text
        yield [1], f"(turn with {len(self.messages)} messages)"
        for i in range(max_tokens):
            text = await asyncio.to_thread(self._work, i)
            stats.tokens += 1
            yield [1], text

with InterruptibleLoop() as loop:
    sys.exit(Repl(loop, ScriptedEdge(), parse_args(["--max-tokens", sys.argv[1]]), None).run())
'''


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal."""

    def __init__(self, argv, env=None):
        master, slave = os.openpty()

        def become_session_leader():
            # Ctrl-C's default action, as at a terminal: a test run started in the background of a
            # non-interactive shell (nohup, &) has SIGINT ignored, and Python would not raise on it
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.setsid()
            import fcntl
            import termios
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                                     env={**os.environ, "TERM": "xterm", **(env or {})},
                                     preexec_fn=become_session_leader, close_fds=True)
        os.close(slave)
        self.fd = master
        self.out = ""
        self.mark = 0                       # expect() looks at output after this point

    def _read(self, timeout):
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:                     # EIO: the child closed the terminal
            return None
        if not data:
            return None
        self.out += data.decode("utf-8", "replace")
        return True

    def expect(self, pattern, timeout=60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.out, self.mark)
            if m:
                self.mark = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self._read(left) is None and not rx.search(self.out, self.mark):
                raise AssertionError(f"no {pattern!r} within {timeout}s; output after mark:\n"
                                     f"{self.out[self.mark:][-3000:]}\n(full tail:\n{self.out[-3000:]})")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout=60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        rc = self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
        while self._read(0.05):
            pass
        return rc

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def scripted(tmp_path):
    terms = []

    def start(max_tokens=40):
        t = Terminal([sys.executable, "-c", SCRIPTED, str(max_tokens)], env={"TANDEM_CACHE": str(tmp_path)})
        terms.append(t)
        t.expect(r">>> ", 30)
        return t
    yield start
    for t in terms:
        t.close()


PROMPT = r">>> "


def test_ctrl_c_stops_the_answer_after_the_worker_left_and_returns_to_the_prompt(scripted):
    t = scripted()
    t.send("tell me a story\r")
    t.expect(r"<worker 3 in>", 20)           # streaming, and a worker thread is inside
    time.sleep(0.05)
    t.send("\x03")                           # Ctrl-C, through the terminal's line discipline
    m = t.expect(r"\[stopped\]", 20)
    stopped_at = m.start()
    # the answer stopped, but only after the thread had left
    assert t.out.index("<worker 3 left>") < stopped_at and "word3" not in t.out
    t.expect(r"tokens in", 5)                # stats of the stopped answer
    t.expect(PROMPT, 5)
    t.send("again\r")                        # the REPL still answers, and remembers the stopped turn
    t.expect(r"\(turn with 3 messages\)", 20)
    t.send("\x03")
    t.expect(PROMPT, 20)
    t.send("/exit\r")
    assert t.wait(20) == 0
    assert "Traceback" not in t.out


def test_ctrl_c_right_after_enter_stops_that_turn_only(scripted):
    t = scripted()
    t.send("first\r")
    t.expect(r"first\r\n", 5)
    time.sleep(0.1)
    t.send("\x03")                           # while the conversation is being encoded (0.3 s)
    t.expect(r"\[stopped\]", 20)
    t.expect(PROMPT, 10)
    t.send("second\r")
    t.expect(r"\(turn with 1 messages\)", 20)   # the stopped turn left nothing behind
    t.send("\x03")
    t.expect(PROMPT, 20)
    t.send("/exit\r")
    assert t.wait(20) == 0


def test_ctrl_c_at_an_empty_prompt_exits_cleanly(scripted):
    t = scripted()
    time.sleep(0.3)          # a person's pace: CPython's readline misses a SIGINT that lands in the
    t.send("\x03")           # microseconds between drawing the prompt and waiting for a key
    assert t.wait(20) == 0
    assert "Traceback" not in t.out


def test_ctrl_c_with_text_typed_clears_the_line_only(scripted):
    t = scripted()
    t.send("half a thought")
    time.sleep(0.3)
    t.send("\x03")
    t.expect(PROMPT, 10)
    assert t.proc.poll() is None
    t.send("\x04")                           # Ctrl-D at the empty prompt
    assert t.wait(20) == 0
    assert "Traceback" not in t.out


@pytest.mark.parametrize("word", ["exit", "quit", "/quit", "EXIT"])
def test_exit_words_leave_and_are_not_sent_to_the_model(scripted, word):
    t = scripted()
    t.send(word + "\r")
    assert t.wait(20) == 0
    assert "turn with" not in t.out


def test_multi_turn_context_clear_help_and_history(scripted, tmp_path):
    t = scripted(max_tokens=2)
    t.send("first\r")
    t.expect(r"\(turn with 1 messages\)", 20)
    t.expect(PROMPT, 20)
    t.send("second\r")
    t.expect(r"\(turn with 3 messages\)", 20)      # user, assistant, user
    t.expect(PROMPT, 20)
    t.send("/help\r")
    t.expect(r"/clear\s+forget the conversation", 10)
    t.expect(PROMPT, 10)
    t.send("/clear\r")
    t.expect(r"conversation cleared", 10)
    t.expect(PROMPT, 10)
    t.send("third\r")
    t.expect(r"\(turn with 1 messages\)", 20)
    t.expect(PROMPT, 20)
    t.send("/nonsense\r")
    t.expect(r"unknown command /nonsense", 10)
    t.expect(PROMPT, 10)
    t.send("\x1b[A\x1b[A\r")                       # up arrow twice: readline recalls "third"
    t.expect(r"\(turn with 3 messages\)", 20)
    t.expect(PROMPT, 20)
    t.send("/exit\r")
    assert t.wait(20) == 0
    history = (tmp_path / "repl_history").read_text()
    assert "first" in history and "third" in history
    assert "^[[A" not in t.out


@pytest.mark.slow
def test_real_repl_ctrl_c_mid_answer_then_exit():
    """The real main.py, edge-only (the draft model on llama.cpp): Ctrl-C while it streams, no segfault,
    back at the prompt, a short second turn that sees the first, /exit -> 0."""
    t = Terminal([sys.executable, "main.py", "--mode", "interactive", "--edge-only", "--max-tokens", "200"])
    try:
        t.expect(PROMPT, 300)
        t.send("Write a long story about a dragon who learns to code.\r")
        t.expect(r"code\.\r\n", 10)               # the echo of the line
        t.expect(r"\w+ \w+ \w+ \w+", 120)          # words streaming
        t.send("\x03")
        t.expect(r"\[stopped\]", 60)
        t.expect(r"tokens in", 10)
        t.expect(PROMPT, 30)
        t.send("/max 4\r")
        t.expect(PROMPT, 10)
        t.send("What was the story about? One word.\r")
        t.expect(r"tokens in", 120)
        t.expect(PROMPT, 30)
        t.send("/exit\r")
        rc = t.wait(60)
    finally:
        t.close()
    assert rc == 0, t.out[-3000:]
    assert "Segmentation fault" not in t.out and "Traceback" not in t.out
