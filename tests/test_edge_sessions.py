"""The edge as a many-user server, with real models over real loopback HTTP: concurrent sessions each
get the target's own answer (the cloud in exact mode), and answers survive the cloud going away."""
import asyncio

import pytest

from cloud.node import CloudNode
from common.prompts import humaneval, mtbench
from common.protocol import SamplingParams
from edge.generator import DRAFT, EDGE, TARGET, Mode
from edge.node import EdgeNode
from edge.sessions import EdgeBusy
from tests.realmodels import config, run

pytestmark = pytest.mark.slow
GREEDY = SamplingParams()


def test_eight_concurrent_chats_each_equal_the_prompt_alone():
    """8 users at once (batched drafting, one link), greedy, exact cloud: every answer is the target's
    own, token for token, as when its prompt runs alone."""
    cfg = config(**{"cloud.exact": True, "cloud.n_seq": 8, "edge.max_sessions": 8,
                    "edge.request_timeout_s": 600})     # the CPU cloud verifies one round at a time: a queue

    async def body():
        cloud = await CloudNode.start(cfg, "127.0.0.1", 0)
        try:
            async with EdgeNode(cfg, cloud.url) as edge:
                prompts = [edge.encode(p.text) for p in humaneval()[:4] + mtbench()[:4]]
                alone = [await edge.generate(ids, 24, GREEDY, Mode.CLOUD_ONLY) for ids in prompts]
                together = await asyncio.gather(*(edge.generate(ids, 24, GREEDY, Mode.EDGE_CLOUD) for ids in prompts))
                return alone, together, edge.drafter.widest, edge.link.transport
        finally:
            await cloud.close()
    alone, together, widest, transport = run(body())
    assert all(r.stats.error is None and r.stats.rounds > 0 and r.stats.fallbacks == 0 for r in together)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert transport == "ws"
    assert widest >= 2                  # sessions drafted together in one llama_decode


def test_queue_bound_refuses_with_edge_busy():
    cfg = config(**{"edge.max_sessions": 1, "edge.max_queue": 1, "switches.draft_verify": False})

    async def body():
        async with EdgeNode(cfg, None) as edge:
            ids = edge.encode("Count to a hundred.")
            first = asyncio.create_task(edge.generate(ids, 40, GREEDY))
            await asyncio.sleep(0.2)
            second = asyncio.create_task(edge.generate(ids, 4, GREEDY))       # waits in the queue
            await asyncio.sleep(0.2)
            with pytest.raises(EdgeBusy) as busy:
                await edge.generate(ids, 4, GREEDY)
            assert edge.queue_depth == 1 and edge.active_sessions == 1
            second.cancel()                                                   # a waiter that leaves
            first_result = await first
            third = await edge.generate(ids, 4, GREEDY)                       # the slot came free
            return busy.value.retry_after_s, first_result, third
    retry_after, first, third = run(body())
    assert retry_after > 0 and len(first.token_ids) == 40 and len(third.token_ids) == 4


def test_cloud_killed_mid_answer_goes_on_edge_only_and_comes_back_verified():
    """The cloud dies mid-answer: the answer completes edge-only, each token marked; nothing already
    streamed is lost or repeated, and the tokens from before the failure are the target's own. The
    cloud returns on the same port mid-answer: the answer re-syncs and goes on verified, and the next
    request is verified from its start, with no edge restart."""
    cfg = config(**{"cloud.exact": True, "edge.retries": 1, "edge.retry_backoff_s": 0.05,
                    "edge.probe_down_interval_s": 0.2})

    async def body():
        cloud = await CloudNode.start(cfg, "127.0.0.1", 0)
        port = int(cloud.url.rsplit(":", 1)[1])
        async with EdgeNode(cfg, cloud.url) as edge:
            ids = edge.encode("Write a long essay about the history of rivers and bridges.")
            ref = await edge.generate(ids, 30, GREEDY, Mode.CLOUD_ONLY)
            pieces, box, restarted = [], [], None
            async for piece in edge.stream(ids, 160, GREEDY, Mode.EDGE_CLOUD, box):
                pieces.append(piece)
                got = sum(len(p.token_ids) for p in pieces)
                if cloud is not None and got >= 12:
                    await cloud.close()                       # the cloud goes away mid-answer
                    cloud = None
                elif cloud is None and restarted is None and EDGE in piece.sources:
                    restarted = await CloudNode.start(cfg, "127.0.0.1", port)   # ... and comes back
            after = await edge.generate(ids, 12, GREEDY, Mode.EDGE_CLOUD)
            down_up = (edge.link.down_events, edge.link.up_events)
        await restarted.close()
        return ref, pieces, box[0], after, down_up
    ref, pieces, stats, after, (downs, ups) = run(body())
    ids = [t for p in pieces for t in p.token_ids]
    sources = [s for p in pieces for s in p.sources]
    assert stats.error is None and len(ids) == stats.tokens == len(sources)
    assert stats.fallbacks == 1 and stats.resumed == 1 and downs >= 1 and ups >= 1
    first_edge = sources.index(EDGE)
    assert first_edge >= 12 and ids[:min(first_edge, 30)] == ref.token_ids[:min(first_edge, 30)]
    last_edge = len(sources) - sources[::-1].index(EDGE)
    assert any(s in (DRAFT, TARGET) for s in sources[last_edge:])      # verified again after the return
    assert stats.by_source[EDGE] == sources.count(EDGE)
    assert after.stats.error is None and after.stats.rounds > 0 and EDGE not in after.sources


def test_fallback_fail_ends_the_answer_with_an_error_and_keeps_tokens():
    cfg = config(**{"edge.fallback": "fail", "edge.retries": 1, "edge.retry_backoff_s": 0.01})

    async def body():
        cloud = await CloudNode.start(cfg, "127.0.0.1", 0)
        async with EdgeNode(cfg, cloud.url) as edge:
            got, box = [], []
            async for piece in edge.stream(edge.encode("Write a long essay about rivers."), 200, GREEDY,
                                           Mode.EDGE_CLOUD, box):
                got += piece.token_ids
                if len(got) >= 10 and cloud is not None:
                    await cloud.close()
                    cloud = None
            return got, box[0]
    got, stats = run(body())
    assert len(got) >= 10 and stats.tokens == len(got) and stats.by_source[EDGE] == 0
    assert stats.error and "Unavailable" in stats.error
