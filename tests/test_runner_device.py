"""The runner's device mode (fast, no models): which config keys are the cloud's, the cloud kept
across cells whose cloud configuration is the same, the CPU placement block, parallel lanes."""
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ablations import runner
from ablations.experiment import (ExperimentError, cells, cloud_side, load_experiment, parse_cpus,
                                  row_mode)
from ablations.processes import Stack, cpu_spec
from common.config import Switches

BASE = {
    "name": "dev",
    "question": "Does the device block load?",
    "workload": {"datasets": ["humaneval"], "num_prompts": 1, "max_tokens": 8},
    "links": ["rtt=5", "rtt=50"],
    "matrix": {"edge_cloud": {}, "cloud_only": {"switches.cloud_only": True},
               "fifo": {"switches.health_priority": False}, "k6": {"draft.max_k": 6},
               "edge_only": {"switches.draft_verify": False},
               "local_target": {"switches.draft_verify": False, "models.draft": "qwen2.5-coder-1.5b-instruct-q4_k_m"}},
}


def load(tmp_path, tree) -> "Experiment":
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_experiment(p)


# --- which keys the cloud reads ----------------------------------------------------------------------
def test_cloud_side_keys_follow_the_config():
    assert cloud_side("cloud.n_ctx") and cloud_side("cloud.vllm.frontends") and cloud_side("models.target")
    assert not cloud_side("models.draft") and not cloud_side("draft.max_k") and not cloud_side("edge.fallback")
    assert cloud_side("brand_new_section.x")                    # unknown: the safe side
    # a switch is the cloud's when common/config.py says it is read outside edge/
    import inspect
    src = inspect.getsource(Switches)
    for name in Switches.model_fields:
        reader = src.split(f"    {name}: bool")[1].split("#", 1)[1].split()[0]
        assert cloud_side(f"switches.{name}") == (not reader.startswith("edge/")), (name, reader)
    assert cloud_side("switches.health_priority") and not cloud_side("switches.cloud_only")


def test_cells_share_a_cloud_unless_a_cloud_key_differs(tmp_path):
    exp = load(tmp_path, BASE)
    by_row = {c.row: c for c in cells(exp)}
    assert by_row["edge_cloud"].cloud_overrides == by_row["cloud_only"].cloud_overrides == by_row["k6"].cloud_overrides
    assert by_row["fifo"].cloud_overrides == (("switches.health_priority", False),)
    assert row_mode(exp, "local_target") == "local_target" and not by_row["local_target"].needs_cloud
    # per link: edge_cloud, cloud_only, fifo, k6 (+ edge_only, local_target at the first): fifo cuts the waves
    assert [[c.row for c in w] for w in runner.waves(cells(exp))] == [
        ["edge_cloud", "cloud_only"], ["fifo"], ["k6", "edge_only", "local_target", "edge_cloud", "cloud_only"],
        ["fifo"], ["k6"]]


# --- the cloud pool ------------------------------------------------------------------------------------
def test_cloud_pool_reuses_restarts_and_replaces_a_dead_cloud(tmp_path):
    started = []

    def fake_start(stack: Stack, set_args):
        proc = stack.start("cloud", [sys.executable, "-c", "import time; time.sleep(60)"])
        proc.url = f"http://fake/{len(started)}"
        started.append(set_args)
        return proc

    exp = load(tmp_path, BASE)
    by_row = {c.row: c for c in cells(exp)}
    pool = runner.CloudPool(tmp_path / "dev-logs", start=fake_start)
    try:
        a, rec_a = pool.get(by_row["edge_cloud"])
        b, rec_b = pool.get(by_row["cloud_only"])
        assert a is b and not rec_a["reused"] and rec_b == {"logs": "dev-logs/cloud1", "reused": True, "cells_before": 1}
        c, rec_c = pool.get(by_row["fifo"])                      # a cloud key changed: a fresh cloud
        assert c is not a and a.popen.poll() is not None and rec_c["logs"] == "dev-logs/cloud2"
        assert started[1] == ["--set", "switches.health_priority=false"]
        c.popen.kill()
        c.popen.wait()
        d, rec_d = pool.get(by_row["fifo"])                      # the same key, but it died: started again
        assert d is not c and not rec_d["reused"]
    finally:
        pool.close()
    assert len(started) == 3 and [s["cells"] for s in pool.stopped] == [2, 1, 1]
    assert all(p.popen.poll() is not None for p in (a, c, d))


# --- placement -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpus, named", [
    ({"edges": ["0-1", "1-2"]}, "share CPU(s) [1]"),
    ({"edges": ["0-1"], "cloud": "1-3"}, "cloud ('1-3') shares CPU(s) [1] with the edges"),
    ({"edges": ["0-x"]}, "is not a CPU set"),
    ({"edges": []}, "edges"),
    ({"edges": ["0-1"], "gpu": "0"}, "gpu: Extra inputs are not permitted"),
])
def test_bad_placement_is_named(tmp_path, cpus, named):
    with pytest.raises(ExperimentError, match="device") as e:
        load(tmp_path, {**BASE, "device": {"cpus": cpus}})
    assert named in str(e.value)


def test_placement_needs_the_cpus_to_exist(tmp_path):
    exp = load(tmp_path, {**BASE, "device": {"cpus": {"edges": ["9000-9001"], "cloud": "0"}}})
    with pytest.raises(ExperimentError, match=r"names CPU\(s\) \[9000, 9001\]"):
        runner.Placement.of(exp)
    assert runner.Placement.of(load(tmp_path, BASE)) == runner.Placement()      # CPU runs: no block, no pinning


def test_cpu_sets_round_trip():
    assert parse_cpus("0-2,5,7-8") == {0, 1, 2, 5, 7, 8} and cpu_spec(parse_cpus("0-2,5,7-8")) == "0-2,5,7-8"


def test_a_pinned_child_runs_on_its_cpus(tmp_path):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with Stack(tmp_path) as stack:
        proc = stack.start("p", [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                           frozenset({cpu}))
        proc.popen.wait(30)
    assert proc.log_path.read_text().splitlines() == [f"$ taskset -c {cpu} {sys.executable} -c "
                                                      "import os; print(sorted(os.sched_getaffinity(0)))", f"[{cpu}]"]


# --- lanes -----------------------------------------------------------------------------------------------
def test_lanes_run_cells_at_once_on_their_cpus_one_cloud_config_at_a_time(tmp_path, monkeypatch):
    """Two lanes: each cell on one lane's CPU set, two cells at a time, never two cloud configurations
    at once; every cell recorded."""
    exp = load(tmp_path, BASE)
    here = sorted(os.sched_getaffinity(0))
    fake = runner.Placement(edges=(frozenset({here[0]}), frozenset({here[-1]})))
    monkeypatch.setattr(runner.Placement, "of", classmethod(lambda cls, e: fake))
    running, seen, lock = [], [], threading.Lock()

    def fake_cell(exp, cell, requests, log_dir, pool, place, lane, shared):
        with lock:
            running.append(cell)
            seen.append((cell.row, lane, shared, len(running), {c.cloud_overrides for c in running if c.needs_cloud}))
        time.sleep(0.2)
        with lock:
            running.remove(cell)
        return {"row": cell.row, "mode": cell.mode, "link": cell.link, "rtt_ms": cell.rtt_ms, "repeat": cell.repeat,
                "datasets": {}}

    monkeypatch.setattr(runner, "run_cell", fake_cell)
    starters = []

    def fake_start_cloud(stack, set_args, timeout_s, cpus=None):
        starters.append(threading.current_thread())
        proc = stack.start("cloud", [sys.executable, "-c", "import time; time.sleep(60)"], cpus)
        proc.url = "http://fake"
        return proc
    monkeypatch.setattr(runner, "start_cloud", fake_start_cloud)
    import ablations.bench
    monkeypatch.setattr(ablations.bench, "load_requests", lambda *a: [])
    result, ok = runner.run_experiment(exp, tmp_path / "out", ["run", "x"])
    assert ok and len(result["cells"]) == len(cells(exp)) == 10
    assert {s[1] for s in seen} == {0, 1} and all(s[2] for s in seen)
    assert max(s[3] for s in seen) == 2
    assert all(len(keys) <= 1 for *_, keys in seen)             # one cloud configuration at a time
    # each wave's cloud started by the main thread (a child dies with the thread that started it)
    assert len(starters) == len(runner.waves(cells(exp))) and set(starters) == {threading.main_thread()}
    assert [c["cells"] for c in result["clouds"]] == [0] * len(starters)     # fake cells never asked for it


def test_gpu_rtt_sweep_is_one_cloud_start_on_2_cpu_edges():
    exp = load_experiment(Path("ablations/experiments/gpu_rtt_sweep.yaml"))
    todo = cells(exp)
    assert {c.mode for c in todo} == {"edge_cloud", "cloud_only", "edge_only", "local_target"}
    assert sorted(c.rtt_ms for c in todo if c.row == "edge_cloud") == [5, 20, 50, 100, 200, 500]
    assert len(runner.waves(todo)) == 1                          # every cell shares the one vLLM cloud
    assert all(len(parse_cpus(e)) == 2 for e in exp.device.cpus.edges)
    assert exp.base["draft.n_threads"] == 2 and exp.base["cloud.backend"] == "vllm"
    assert exp.device.stage == "/tmp/stage"
