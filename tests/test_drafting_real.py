"""Drafting that adapts to the link, with the real models over loopback HTTP: with every drafting switch
on (adaptive k, draft-ahead rounds, prompt lookup, parallel prefill) greedy answers in exact mode are the
target alone's, token for token."""
import pytest

from common.prompts import humaneval, mtbench
from common.protocol import SamplingParams
from edge.generator import Mode
from tests.realmodels import config, edge_and_cloud, run

pytestmark = pytest.mark.slow
ALL_ON = {f"switches.{s}": True for s in ("adaptive_draft", "draft_ahead", "ngram_draft", "parallel_prefill")}


def test_every_drafting_switch_on_keeps_exact_greedy_output():
    cfg = config(**{"cloud.exact": True, "cloud.n_threads": 1, "draft.n_threads": 1, **ALL_ON})

    async def body():
        out = []
        async with edge_and_cloud(cfg) as (edge, _):
            for p in humaneval()[:1] + mtbench()[:1]:
                ids = edge.encode(p.text)
                ref = await edge.generate(ids, 32, SamplingParams(), Mode.CLOUD_ONLY)
                spec = await edge.generate(ids, 32, SamplingParams(), Mode.EDGE_CLOUD)
                out.append((p.id, ref, spec))
        return out
    for pid, ref, spec in run(body()):
        assert None is ref.stats.error is spec.stats.error and len(ref.token_ids) > 8, pid
        assert spec.token_ids == ref.token_ids, pid
        assert spec.stats.rounds > 0 and spec.stats.accepted > 0
        assert spec.stats.trace[0][1] == []               # round 0 went with no draft (parallel prefill)
