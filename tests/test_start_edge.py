"""start_edge.py's command line, before any model loads: help, bad URLs, exposure (fast, no models)."""
import asyncio
import re
import subprocess
import sys

from common.http_limits import start_site
from edge.server import make_app
from tests.conftest import ROOT
from tests.test_openai_api import FakeNode


def start_edge(*args, timeout=60):
    return subprocess.run([sys.executable, "start_edge.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_help_prints_each_default_once():
    r = start_edge("--help")
    assert r.returncode == 0 and "--cloud-url" in r.stdout and "--api-key" in r.stdout and "--insecure" in r.stdout
    text = " ".join(r.stdout.split())            # argparse wraps lines
    for option in re.split(r"\s(?=--[a-z])", text):
        assert option.count("(default") <= 1, option


def test_bad_cloud_url_is_one_line_exit_2():
    for url in ("127.0.0.1:8080", "localhost", "ftp://x:1", "http://:80"):
        r = start_edge("--cloud-url", url)
        assert r.returncode == 2, (url, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "http://" in r.stderr and "Traceback" not in r.stderr


def test_non_loopback_host_needs_api_keys_or_insecure():
    r = start_edge("--host", "0.0.0.0", "--cloud-url", "http://127.0.0.1:9")
    assert r.returncode == 2 and "refusing" in r.stderr and "--api-key" in r.stderr and "--insecure" in r.stderr
    assert "Traceback" not in r.stderr


def test_cloud_url_of_an_edge_is_refused_before_loading():
    async def body():
        runner, url = await start_site(make_app(FakeNode()), "127.0.0.1", 0, FakeNode().cfg.edge.limits)
        try:
            p = await asyncio.create_subprocess_exec(sys.executable, "start_edge.py", "--cloud-url", url, "--port", "0",
                                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(p.communicate(), 60)
            return p.returncode, err.decode()
        finally:
            await runner.cleanup()
    code, err = asyncio.run(body())
    assert code == 2 and "not a Tandem cloud" in err and "edge" in err and "Traceback" not in err
