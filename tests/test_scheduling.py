import asyncio
import math

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
