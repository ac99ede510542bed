"""Draft-ahead rounds (common/protocol.py): sent while the round before is in flight, verified only if
that round accepts its whole draft with the guessed next token, else 412 and nothing changes. On the
board (pure Python), over HTTP with a logits backend (waits its turn), with the simulated engine in
this process and in a child process (taken early, promoted on the engine thread). Protocol tests:
the targets are rules (last + 1), not models."""
import asyncio
import time

from cloud.backends.draft_board import PARK, DraftBoard, Round, Slot
from cloud.backends.simulated_engine import SimulatedEngine
from test_cloud_api import run_with_cloud
from test_engine_path import run as run_engine, verify
from test_engine_process import run as run_process


def _round(got, start, draft, expect=None):
    return Round(start, draft, time.monotonic(), lambda a, t: got.append((a, t)), lambda m: got.append(("error", m)),
                 expect, lambda: got.append("stale"))


def test_board_promotes_a_round_sent_ahead_only_when_the_guess_holds():
    board = DraftBoard()
    board.open(Slot("r", "edge", [1, 2, 3]))
    got = []
    board.post("r", _round(got, 3, [4, 5]), None)
    board.post("r", _round(got, 6, [7, 8], expect=[4, 5, 6]), None)        # guess: both accepted, then 6
    board.post("r", _round(got, 9, [10], expect=[7, 8, 9]), None)          # a second one ahead: refused
    assert got == ["stale"]
    assert board.spec_for("r", [1, 2, 3], 4) == [4, 5]                     # the round in flight goes first
    board.produced("r", [4, 5, 6], finished=False)
    assert got == ["stale", (2, 6)]
    assert board.spec_for("r", [1, 2, 3, 4, 5, 6], 4) == [7, 8]            # promoted: no wire in between
    board.produced("r", [7, 0], finished=False)
    assert got[-1] == (1, 0)

    got = []
    board.post("r", _round(got, 8, [9]), None)                             # tokens now [1..5, 6, 7, 0]
    board.post("r", _round(got, 10, [11], expect=[9, 10]), None)
    board.produced("r", [5], finished=False)                               # the target said 5, not 9
    assert got == [(0, 5), "stale"]
    assert board.spec_for("r", [1, 2, 3, 4, 5, 6, 7, 0, 5], 4) is PARK     # the edge must send afresh
    board.post("r", _round(got, 9, [6], expect=[0, 5]), None)              # ahead, but arriving after: checked now
    assert board.spec_for("r", board.slots["r"].tokens, 4) == [6]
    board.post("r", _round(got, 11, [1], expect=[6, 99]), None)
    board.produced("r", [], finished=True)                                 # the request ends under both
    assert got[-2:] == [("error", "the session's engine request ended")] * 2


async def _ahead_rounds(http, url, miss: bool, stats_url=None):
    """Round 0, then round 1 with round 2 sent ahead of its answer (guess: all of round 1 accepted and
    then 9). The target says last + 1; with miss, round 1's draft is wrong at its second token."""
    st, r = await verify(http, url, seq=0, base_len=0, append=[1, 2, 3], draft=[4, 5])
    assert st == 200 and (r["accepted"], r["next_token"], r["committed_len"]) == (2, 6, 6)
    one = asyncio.ensure_future(verify(http, url, seq=1, base_len=6, append=[], draft=[7, 0 if miss else 8]))
    await asyncio.sleep(0.1)                     # round 1 is in the verifier before round 2 leaves
    two = asyncio.ensure_future(verify(http, url, seq=2, base_len=9, append=[], draft=[10, 11], guess=9))
    (st1, r1), (st2, r2) = await one, await two
    if miss:
        assert st1 == 200 and (r1["accepted"], r1["next_token"], r1["committed_len"]) == (1, 8, 8)
        assert st2 == 412 and r2["field"] == "guess" and r2["committed_len"] == 8
        st, r = await verify(http, url, seq=2, base_len=8, append=[], draft=[9, 10])    # afresh: goes on
        assert st == 200 and (r["accepted"], r["next_token"], r["committed_len"]) == (2, 11, 11)
    else:
        assert st1 == 200 and (r1["accepted"], r1["next_token"], r1["committed_len"]) == (2, 9, 9)
        assert st2 == 200 and (r2["accepted"], r2["next_token"], r2["committed_len"]) == (2, 12, 12)
        st, r = await verify(http, url, seq=3, base_len=12, append=[], draft=[13])
        assert st == 200 and (r["accepted"], r["next_token"]) == (1, 14)
    async with http.get(url + "/stats") as resp:
        return (await resp.json())["draft_ahead"]


def test_ahead_round_waits_its_turn_with_a_logits_backend(table_backend):
    for miss in (False, True):
        got = run_with_cloud(table_backend, lambda http, url, v: _ahead_rounds(http, url, miss))
        assert got == {"posted_early": 0, "stale": int(miss)}


def test_ahead_round_goes_to_the_engine_early_in_process():
    for miss in (False, True):
        backend = SimulatedEngine(step_s=0.3)
        got = run_engine(backend, lambda http, url: _ahead_rounds(http, url, miss))
        assert got == {"posted_early": 1, "stale": int(miss)}
        # hit: round 2 rides the step after round 1 with no wire between (one step each, nothing idle)
        assert backend.requests == 1


def slow_engine(gguf, cfg, n_ctx, cache):
    return SimulatedEngine(step_s=0.3)


def test_ahead_round_crosses_the_process_boundary():
    for miss in (False, True):
        got = run_process(slow_engine, lambda http, url: _ahead_rounds(http, url, miss))
        assert got == {"posted_early": 1, "stale": int(miss)}
