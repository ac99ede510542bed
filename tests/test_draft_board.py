"""The in-engine design's draft alignment and round resolution (pure Python, no vLLM)."""
import time

from cloud.backends.draft_board import PARK, DraftBoard, Round, Slot, align, resolve


def test_align_by_content():
    prompt = [1, 2, 3]
    # round 0: prefill sampled 7 itself; the draft for position 3 starts with 7 -> verify the rest
    assert align(prompt + [7], 3, [7, 8, 9]) == [8, 9]
    assert align(prompt + [7, 8, 9], 3, [7, 8, 9]) == []          # only the bonus is left to sample
    assert align(prompt + [6], 3, [7, 8, 9]) is None               # decided: a correction
    assert align(prompt + [7, 8, 9, 10], 3, [7, 8, 9]) is None     # decided: the bonus came
    assert align(prompt, 3, [7, 8]) == [7, 8]                      # steady state: nothing produced yet
    assert align(prompt, 4, [7]) is None                           # a draft for a position we do not hold


def test_resolve():
    t = [1, 2, 3]
    assert resolve(t, 3, [7, 8], False) is None
    assert resolve(t + [7], 3, [7, 8], False) is None              # still going
    assert resolve(t + [7, 5], 3, [7, 8], False) == (1, 5)         # correction after 1 accepted
    assert resolve(t + [7, 8, 4], 3, [7, 8], False) == (2, 4)      # all accepted + bonus
    assert resolve(t + [6], 3, [7, 8], False) == (0, 6)
    assert resolve(t + [7], 3, [7, 8], True) == (0, 7)             # finished (EOS) on an accepted token


def _slot_with_round(board, tokens, start, draft):
    got = []
    board.open(Slot("r", "edge", list(tokens)))
    board.post("r", Round(start, draft, time.monotonic(), on_done=lambda a, t: got.append((a, t)),
                          on_error=got.append), rtt_ms=10.0)
    return got


def test_board_round_trip():
    board = DraftBoard(timeout_s=0.0)
    got = _slot_with_round(board, [1, 2, 3], 3, [7, 8, 9])
    assert board.spec_for("r", [1, 2, 3], 4) == [7, 8, 9]
    assert board.spec_for("other", [1], 4) is None                    # not ours: vLLM decides
    board.produced("r", [7, 8, 5], finished=False)                 # engine step: 2 accepted + correction
    assert got == [(2, 5)]
    assert board.spec_for("r", [1, 2, 3, 7, 8, 5], 4) is PARK          # next draft still on the wire
    assert board.expired(time.monotonic() + 1) == ["r"]            # its edge went away


def test_padding_fills_k_slots_and_accepted_pads_align_the_next_round():
    board = DraftBoard(pad=True)
    got = _slot_with_round(board, [1, 2, 3], 3, [7])
    assert board.spec_for("r", [1, 2, 3], 4) == [7, 7, 7, 7]          # one draft token + 3 pads: uniform step
    assert board.spec_for("r", [1, 2, 3], 2) == [7, 7]                  # never more than k
    board.produced("r", [7, 7, 7, 5], finished=False)                  # the target took 2 pads too, then 5
    assert got == [(1, 7)]                                             # the round: draft accepted + next token
    # the request already holds [7, 5] past the round's result; the next draft aligns by content
    board.post("r", Round(5, [7, 5, 9], time.monotonic(), lambda a, t: got.append((a, t)), got.append), None)
    assert board.spec_for("r", [1, 2, 3, 7, 7, 7, 5], 4) == [9, 9, 9, 9]
    board.post("r", Round(5, [8], time.monotonic(), lambda a, t: got.append((a, t)), got.append), None)
    assert got[-1] == (0, 7)                                           # disagrees with a held token: decided at once


def test_board_post_after_tokens_resolves_at_once():
    board = DraftBoard()
    board.open(Slot("r", "edge", [1, 2, 3, 6]))                     # prefill already sampled 6
    got = []
    board.post("r", Round(3, [7, 8], time.monotonic(), lambda a, t: got.append((a, t)), got.append), None)
    assert got == [(0, 6)]


def test_board_finished_mid_round_reports_error():
    board = DraftBoard()
    got = _slot_with_round(board, [1, 2, 3], 3, [7, 8])
    board.produced("r", [], finished=True)
    assert got and isinstance(got[0], str)


def test_ready_waits_only_for_drafts_due_within_the_gather_window():
    board = DraftBoard(gather_ms=50.0)
    for sid in "ab":
        board.open(Slot(sid, "edge", [1]))
    now = time.monotonic()
    board.post("a", Round(1, [2], now, lambda a, t: None, lambda m: None), None)
    assert board.ready(now)[0]                                   # b has no known cycle: not waited for
    b = board.slots["b"]
    b.resolved_at, b.turnaround_s = now, 0.02                    # b's next draft is due 20 ms from now
    go, wait = board.ready(now)
    assert not go and abs(wait - 0.05) < 1e-6                    # wait for it, at most until the window closes
    assert not board.ready(now + 0.03)[0]                        # a little late: still waited for
    assert board.ready(now + 0.051)[0]                           # the window closed: step without it
    b.turnaround_s = 0.2                                         # due after the 50 ms window: not waited for
    assert board.ready(now)[0]
    board.post("b", Round(1, [2], now, lambda a, t: None, lambda m: None), None)
    assert board.ready(now)[0]                                   # everyone is in


def test_default_gather_window_is_one_measured_engine_step():
    board = DraftBoard(gather_ms=None)
    for sid in "ab":
        board.open(Slot(sid, "edge", [1]))
    now = time.monotonic()
    board.post("a", Round(1, [2], now, lambda a, t: None, lambda m: None), None)
    b = board.slots["b"]
    b.resolved_at, b.turnaround_s = now, 0.02                    # b's next draft is due 20 ms from now
    assert board.ready(now)[0]                                   # no step measured yet: no window
    board.stepped(0.04)
    board.last_output = 0.0
    go, wait = board.ready(now)
    assert not go and abs(wait - 0.04) < 1e-6                    # a 40 ms step: wait up to 40 ms for b
    for _ in range(30):
        board.stepped(0.01)                                      # steps got faster: the window follows
    assert board.ready(now + 0.011)[0]


def test_turnaround_is_measured_from_resolution_to_next_post():
    board = DraftBoard()
    got = _slot_with_round(board, [1, 2, 3], 3, [7])
    assert board.slots["r"].turnaround_s is None                 # a first post has no cycle yet
    board.produced("r", [5], finished=False)
    slot = board.slots["r"]
    slot.resolved_at -= 0.05                                     # resolved 50 ms ago, the next round sent 20 ms ago
    board.post("r", Round(4, [6], slot.resolved_at + 0.03, lambda a, t: got.append((a, t)), got.append), None)
    assert abs(slot.turnaround_s - 0.03) < 1e-9
    rounds, out_s, read_s = board.take_cycles()                  # the engine statistics' edge cycle and last hop
    assert rounds == 1 and abs(out_s - 0.03) < 1e-9 and 0.02 <= read_s < 0.5
    assert board.take_cycles() == (0, 0.0, 0.0)                  # taken: a new window starts


def test_sort_key_uses_health_order():
    board = DraftBoard()
    board.order_key = lambda rtt, since: (rtt or 0) + since
    board.open(Slot("far", "edge", [1]))
    board.open(Slot("near", "edge", [1]))
    t = time.monotonic()
    board.post("far", Round(1, [2], t, lambda a, b: None, lambda m: None), 400.0)
    board.post("near", Round(1, [2], t, lambda a, b: None, lambda m: None), 5.0)
    assert board.sort_key("near", 0) < board.sort_key("far", 0)


def test_waker_is_an_event_a_select_can_wait_for():
    import select
    import threading
    from cloud.backends.draft_board import Waker
    w = Waker()
    try:
        assert not w.is_set() and w.wait(0.01) is False
        assert select.select([w], [], [], 0)[0] == []
        w.set()
        w.set()                                 # idempotent: one byte, one clear
        assert w.is_set() and w.wait(0) is True
        assert select.select([w], [], [], 0)[0] == [w]
        w.clear()
        assert not w.is_set() and select.select([w], [], [], 0)[0] == []
        threading.Timer(0.05, w.set).start()    # another thread wakes a waiter
        t0 = time.monotonic()
        assert w.wait(5.0) is True and time.monotonic() - t0 < 2.0
    finally:
        w.close()
