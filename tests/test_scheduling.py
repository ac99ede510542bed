import asyncio
import math
import time

import pytest

from common.scheduling import AdmissionQueue, health_factor, priority


def test_health_factor_and_priority():
    assert health_factor(0) == 1.0 and priority(0) == 0
    assert health_factor(500) == pytest.approx(math.exp(-1))
    assert priority(500) == round((1 - math.exp(-1)) * 1000) == 632
    assert priority(None) == 0
    assert priority(20) < priority(200) < priority(2000)


async def _admission_order(by_health, aging_per_s, arrivals):
    q = AdmissionQueue(1, aging_per_s, by_health)
    order = []
    await q.acquire(None)                       # hold the only slot while the others queue up

    async def worker(name, rtt):
        async with q.slot(rtt):
            order.append(name)

    tasks = []
    for name, rtt, delay in arrivals:
        await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(worker(name, rtt)))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    q.release()
    await asyncio.gather(*tasks)
    return order


def test_healthy_first():
    arrivals = [("slow", 1500, 0), ("mid", 300, 0), ("fast", 10, 0)]
    assert asyncio.run(_admission_order(True, 0.0, arrivals)) == ["fast", "mid", "slow"]
    assert asyncio.run(_admission_order(False, 0.0, arrivals)) == ["slow", "mid", "fast"]


def test_aging_prevents_starvation():
    # 'slow' (priority 950) waited 0.3 s before 'fast' (priority 20) arrived: with 10,000 units/s of
    # aging it has earned 3000 units and goes first; without aging it would wait.
    arrivals = [("slow", 1500, 0), ("fast", 10, 0.3)]
    assert asyncio.run(_admission_order(True, 10_000.0, arrivals)) == ["slow", "fast"]
    assert asyncio.run(_admission_order(True, 0.0, arrivals)) == ["fast", "slow"]


# --- the in-engine design: sessions wait for an engine seat in the same order ----------------------
from common.scheduling import FIFO, OrderKey, WaitingRoom, overtake_window_s  # noqa: E402


def test_overtake_window_is_the_priority_range_over_aging():
    assert overtake_window_s(1000.0) == 1.0 and overtake_window_s(10_000.0) == pytest.approx(0.1)
    assert overtake_window_s(0.0) == math.inf


def test_waiting_room_hands_seats_back_from_another_thread():
    import threading

    async def main():
        room = WaitingRoom(1, FIFO)
        await room.take(None)
        waiter = asyncio.create_task(room.take(None))
        await asyncio.sleep(0.01)
        assert room.waiting == 1 and not waiter.done()
        threading.Thread(target=room.give_back).start()     # an engine thread frees the seat
        await asyncio.wait_for(waiter, 5)
        assert room.taken == 1 and room.waiting == 0
        cancelled = asyncio.create_task(room.take(None))   # a waiter that leaves does not keep a seat
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        room.give_back()
        await asyncio.sleep(0.01)
        assert room.taken == 0
    asyncio.run(main())


async def _engine_admissions(key: OrderKey, arrivals, frees):
    """A simulated in-engine backend with one seat, held by 'hold'. Sessions arrive (name, rtt_ms, at
    seconds) and wait for the seat; at each time in `frees` the session holding it ends (dropped).
    Returns the order in which sessions got the seat."""
    from cloud.backends.simulated_engine import SimulatedEngine
    eng = SimulatedEngine(max_inflight=1)
    eng.set_order(key)
    order = []
    try:
        await eng.averify("hold", [1, 2, 3], [4], None, 5.0, True)   # seated, then parked: keeps its seat
        holder = ["hold"]
        t0 = time.monotonic()

        async def session(name, rtt, at):
            await asyncio.sleep(at)
            await eng.averify(name, [1, 2, 3], [4], None, rtt, True)
            order.append(name)
            holder.append(name)

        tasks = [asyncio.create_task(session(*a)) for a in arrivals]
        for at in frees:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            assert eng.room.taken == 1
            eng.drop(holder[-1])                       # its request ends: the seat goes to the best waiter
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert eng.requests == len(arrivals) + 1       # each session entered the engine once
    finally:
        eng.close()
    return order


def test_in_engine_near_session_is_seated_before_an_earlier_far_one():
    arrivals = [("far", 700.0, 0.0), ("near", 20.0, 0.05)]
    assert asyncio.run(_engine_admissions(OrderKey(0.0, True), arrivals, [0.15, 0.25])) == ["near", "far"]
    # the switch off (the verifier hands FIFO down): first come, first seated
    assert asyncio.run(_engine_admissions(OrderKey(0.0, False), arrivals, [0.15, 0.25])) == ["far", "near"]


def test_in_engine_far_session_is_seated_within_the_aging_bound():
    # 'far' waits from t=0. 'near1' arrives within the overtake window (0.5 s at 2,000 units/s) and
    # may go first; 'near2' arrives after it and may not, however much healthier its link.
    aging = 2_000.0
    window = overtake_window_s(aging)
    arrivals = [("far", 700.0, 0.0), ("near1", 20.0, 0.02), ("near2", 20.0, window + 0.1)]
    frees = [window + 0.2, window + 0.3, window + 0.4]
    assert asyncio.run(_engine_admissions(OrderKey(aging, True), arrivals, frees)) == ["near1", "far", "near2"]
    # without aging the far session waits behind every nearer one that comes
    assert asyncio.run(_engine_admissions(OrderKey(0.0, True), arrivals, frees)) == ["near1", "near2", "far"]


def test_the_verifier_hands_its_policy_down_to_the_engine_s_waiting_room():
    from cloud.backends.simulated_engine import SimulatedEngine
    from cloud.verifier import Verifier
    from common.config import load_config
    for on in (True, False):
        cfg = load_config(overrides={"switches.health_priority": on, "cloud.priority_aging_per_s": 250.0})
        eng = SimulatedEngine(max_inflight=2)
        try:
            v = Verifier(eng, cfg.cloud, cfg.switches)
            assert eng.room.key is v.queue.key is eng.board.order_key
            assert eng.room.key.by_health is on and eng.room.key.aging_per_s == 250.0 and eng.room.seats == 2
        finally:
            eng.close()
