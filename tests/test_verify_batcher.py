"""switches.batched_verify (cloud/verify_batcher.py): rounds that wait together for a one-call-at-a-time
backend are computed in one backend call, with the same answers as alone; a round answered in another's
batch does not wait for the backend again. The fake table target (protocol test, no model); the real
llama.cpp batch is covered by tests/test_verify_batcher_real.py."""
import asyncio
import json

import aiohttp

from cloud.server import start_cloud
from cloud.verifier import Verifier
from common.config import load_config
from common.protocol import batch_frame, unbatch
from conftest import TableBackend


class BatchTable(TableBackend):
    """The table target with logits_many, each batch a slow 'decode' (so rounds pile up behind it)."""
    max_batch = 8

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def logits_many(self, calls):
        import time
        time.sleep(0.05)
        self.batch_sizes.append(len(calls))
        return [self.logits(sid, tokens, n, reuse) for sid, tokens, n, reuse in calls]


def run(batched: bool, n: int = 6):
    cfg = load_config(overrides={"switches.batched_verify": batched})
    backend = BatchTable()

    async def main():
        verifier = Verifier(backend, cfg.cloud, cfg.switches)
        runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(url + "/v1/ws") as ws:
                rounds = [json.dumps({"session_id": f"s{i}", "seq": 0, "base_len": 0, "append": [i, i + 1],
                                      "draft": [i + 2, i + 9]}) for i in range(n)]
                await ws.send_str(batch_frame(rounds))
                got = []
                while len(got) < n:
                    got += unbatch(json.loads((await ws.receive(timeout=10)).data))
                return sorted((a["session_id"], a["accepted"], a["next_token"]) for a in got)
        finally:
            await runner.cleanup()
    return asyncio.run(main()), backend


def test_waiting_rounds_share_one_backend_call_with_the_same_answers():
    alone, b0 = run(False)
    together, b1 = run(True)
    assert together == alone and all(a[1] == 1 for a in alone)      # the table wants i+2 then i+3: 1 accepted
    assert b0.calls == 6 and not b0.batch_sizes                       # off: one call per round
    assert sum(b1.batch_sizes) == 6 and len(b1.batch_sizes) <= 2      # on: the first alone, the rest together
    assert max(b1.batch_sizes) >= 5
