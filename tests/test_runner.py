"""The experiment runner (python -m ablations): experiment files, their cells, the processes of a
cell, the report; and (slow) one cell end to end with the real models as processes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ablations import report
from ablations.__main__ import main
from ablations.experiment import (ExperimentError, cells, experiment_files, load_experiment)
from ablations.processes import ProcessFailed, Stack, free_port
from ablations.runner import agreement, rows_of, summarise
from common.config import Switches

GOOD = {
    "name": "tiny",
    "question": "Does it load?",
    "workload": {"datasets": ["humaneval", "mtbench"], "num_prompts": 2, "max_tokens": 8},
    "links": ["rtt=5", "rtt=50"],
    "matrix": {"edge_cloud": {}, "cloud_only": {"switches.cloud_only": True},
               "edge_only": {"switches.draft_verify": False}},
    "plots": [{"kind": "vs_rtt", "bound": True}],
}


def write(tmp_path, tree, name="x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree, sort_keys=False))
    return p


def with_(tree: dict, dotted: str, value) -> dict:
    tree = json.loads(json.dumps(tree))
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return tree


# --- experiment files ------------------------------------------------------------------------------
def test_committed_experiment_files_load():
    files = experiment_files()
    assert {p.stem for p in files} >= {"switches", "rtt_sweep"}
    from ablations import population
    for path in files:
        if population.kind_of(path):                 # kind: population | goodput (ablations/population.py)
            exp = population.load(path)
            assert exp.name == path.stem and exp.question and "\n" not in exp.question
            continue
        exp = load_experiment(path)
        assert exp.name == path.stem and exp.question and "\n" not in exp.question
        assert exp.workload.split == "heldout"


def test_switches_has_a_row_for_every_switch():
    """Every switch in config/default.yaml flipped from its default by some row (a new switch: one row)."""
    exp = load_experiment(Path("ablations/experiments/switches.yaml"))
    defaults = Switches()
    flipped = {k.removeprefix("switches."): v for row in exp.matrix.values() for k, v in row.items()}
    for name in Switches.model_fields:
        assert name in flipped and flipped[name] != getattr(defaults, name), f"no row flips switches.{name}"
    assert {} in exp.matrix.values(), "a row with every switch at its default"


def test_rtt_sweep_covers_the_issue_rtts_and_modes():
    exp = load_experiment(Path("ablations/experiments/rtt_sweep.yaml"))
    assert [c.rtt_ms for c in cells(exp) if c.row == "edge_cloud"] == [5, 20, 50, 100, 200, 500]
    assert [c.row for c in cells(exp)][:4] == ["edge_cloud", "cloud_only", "edge_only", "edge_cloud"]
    assert {c.mode for c in cells(exp)} == {"edge_cloud", "cloud_only", "edge_only"}


@pytest.mark.parametrize("dotted, value, named", [
    ("workloads", {}, "workloads: Extra inputs are not permitted"),
    ("workload.num_promts", 3, "workload.num_promts: Extra inputs are not permitted"),
    ("workload.num_prompts", 0, "workload.num_prompts"),
    ("workload.datasets", ["imagenet"], "workload.datasets.0"),
    ("workload.split", "train", "workload.split"),
    ("workload.goodput", ["ttft=100"], "goodput 'ttft=100' is not KEY:MS"),
    ("matrix.edge_cloud", {"switches.kv_cach": False}, "matrix.edge_cloud: bad configuration: switches.kv_cach"),
    ("matrix.edge_cloud", {"draft.max_k": 0}, "matrix.edge_cloud: bad configuration: draft.max_k"),
    ("matrix.Bad-Label", {}, "row labels must match"),
    ("links", ["rtt=fast"], "bad link profile 'rtt=fast'"),
    ("links", [], "links"),
    ("question", "two\nlines", "question: must be one line"),
    ("name", "has space", "name"),
    ("repeats", 0, "repeats"),
    ("table", ["tok_per_s"], "unknown metric(s) ['tok_per_s']"),
    ("plots", [{"kind": "pie"}], "plots.0.kind"),
])
def test_bad_experiment_names_the_key(tmp_path, dotted, value, named):
    with pytest.raises(ExperimentError) as e:
        load_experiment(write(tmp_path, with_(GOOD, dotted, value)))
    assert named in str(e.value)
    assert "Traceback" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ExperimentError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ExperimentError, match="top level must be a mapping"):
        load_experiment(tmp_path / "list.yaml")


def test_set_changes_the_experiment_or_every_row(tmp_path):
    path = write(tmp_path, GOOD)
    exp = load_experiment(path, ["workload.num_prompts=5", "links=[rtt=7]", "draft.max_k=6",
                                 "switches.cloud_only=false"], repeats=3)
    assert exp.workload.num_prompts == 5 and exp.links == ["rtt=7"] and exp.repeats == 3
    assert exp.base == {"draft.max_k": 6, "switches.cloud_only": False}
    by_row = {c.row: dict(c.overrides) for c in cells(exp)}
    assert by_row["edge_cloud"] == {"draft.max_k": 6, "switches.cloud_only": False}
    assert by_row["cloud_only"]["switches.cloud_only"] is True          # the row's own override wins
    with pytest.raises(ExperimentError, match="key.path=value"):
        load_experiment(path, ["nonsense"])
    with pytest.raises(ExperimentError, match=r"base \(every row, and --set\): bad configuration: draft.max_kk"):
        load_experiment(path, ["draft.max_kk=3"])
    quick = load_experiment(path, quick=True)
    assert (quick.workload.num_prompts, quick.workload.max_tokens, quick.repeats) == (1, 16, 1)


def test_cells_rows_by_links_by_repeats(tmp_path):
    exp = load_experiment(write(tmp_path, {**GOOD, "repeats": 2}))
    got = [(c.row, c.mode, c.link, c.repeat) for c in cells(exp)]
    one = [("edge_cloud", "edge_cloud", "rtt=5"), ("cloud_only", "cloud_only", "rtt=5"),
           ("edge_only", "edge_only", None),                     # no cloud: no link, once per repeat
           ("edge_cloud", "edge_cloud", "rtt=50"), ("cloud_only", "cloud_only", "rtt=50")]   # rows interleaved
    assert got == [(*c, r) for r in range(2) for c in one]
    cell = next(c for c in cells(exp) if c.row == "cloud_only")
    assert cell.needs_cloud and cell.rtt_ms == 5.0
    assert cell.set_args() == ["--set", "switches.cloud_only=true"]
    assert not next(c for c in cells(exp) if c.row == "edge_only").needs_cloud
    assert len({c.slug for c in cells(exp)}) == len(cells(exp))


def test_list_prints_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    from ablations import population
    for path in experiment_files():
        exp = population.load(path) if population.kind_of(path) else load_experiment(path)
        assert exp.name in out and exp.question in out


def test_cli_bad_experiment_is_one_line(tmp_path, capsys):
    path = write(tmp_path, with_(GOOD, "matrix.edge_cloud", {"switches.nope": True}))
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "switches.nope" in err[0]
    assert not (tmp_path / "o").exists()


def test_run_takes_an_experiment_name(capsys):
    assert main(["run", "switches", "--set", "workload.num_prompts=0"]) == 2       # invalid: stops before running
    assert "experiments/switches.yaml: workload.num_prompts" in capsys.readouterr().err
    assert main(["run", "no_such_experiment"]) == 2
    assert "experiment file no_such_experiment not found" in capsys.readouterr().err


# --- processes -------------------------------------------------------------------------------------
def test_free_port_is_free():
    import socket
    ports = {free_port() for _ in range(5)}
    assert all(1024 < p < 65536 for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))          # nobody holds it


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stack_stops_every_process_even_one_that_ignores_sigint(tmp_path, monkeypatch):
    import ablations.processes as processes
    monkeypatch.setattr(processes, "STOP_GRACE_S", 1.0)
    with Stack(tmp_path) as stack:
        polite = stack.start("polite", [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"])
        stubborn = stack.start("stubborn", [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                                            "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"])
        polite.wait_line("ready", 30)
        stubborn.wait_line("ready", 30)
        pids = [polite.popen.pid, stubborn.popen.pid]
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 10
    assert not any(_alive(p) for p in pids)
    assert stack.stopped["polite"]["exit"] == -signal.SIGINT or stack.stopped["polite"]["exit"] != 0
    assert stack.stopped["stubborn"]["exit"] == -signal.SIGKILL
    assert (tmp_path / "polite.log").read_text().startswith("$ ")


def test_a_process_that_dies_is_reported_with_its_log(tmp_path):
    with Stack(tmp_path) as stack:
        proc = stack.start("cloud", [sys.executable, "-c", "import sys; print('error: no model here'); sys.exit(3)"])
        with pytest.raises(ProcessFailed) as e:
            proc.wait_line("serving on", 30)
    assert "cloud exited with status 3" in str(e.value) and "error: no model here" in str(e.value)


def test_runner_killed_leaves_no_orphans(tmp_path):
    """A runner that dies by SIGKILL (no cleanup) still takes its children with it (PR_SET_PDEATHSIG)."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    code = ("import sys, time; from pathlib import Path; from ablations.processes import Stack\n"
            f"s = Stack(Path({str(tmp_path)!r}))\n"
            "p = s.start('child', [sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(p.popen.pid, flush=True); time.sleep(60)\n")
    runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    child = int(runner.stdout.readline())
    assert _alive(child)
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child)


# --- figures ---------------------------------------------------------------------------------------
def canned_bench(latencies_s, output_lens, figures, ttfts_s):
    return {"median_ttft_ms": 100.0, "p99_ttft_ms": 150.0, "median_tpot_ms": 50.0, "p99_tpot_ms": 70.0,
            "median_itl_ms": 120.0, "median_e2el_ms": 2000.0, "output_throughput": 9.5,
            "completed": len(output_lens), "failed": 0, "errors": [""] * len(output_lens),
            "output_lens": output_lens, "latencies": latencies_s, "ttfts": ttfts_s,
            "tandem": {"tau": 4.0, "acceptance_rate": 0.75, "cloud_compute_ms_per_token": 20.0,
                       "requests": [{"success": True, "figures": f} for f in figures]}}


def test_summarise_and_the_per_round_bound():
    figures = [{"rounds": 10, "tokens": 40, "draft_ms_per_round": 100.0, "compute_ms_per_round": 80.0},
               {"rounds": 30, "tokens": 120, "draft_ms_per_round": 60.0, "compute_ms_per_round": 40.0},
               {"rounds": 5, "tokens": 21, "draft_ms_per_round": 50.0, "compute_ms_per_round": 30.0}]
    bench = canned_bench([4.0, 10.0, 1.75], [40, 120, 21], figures, [0.5, 1.0, 0.2])
    m = summarise("edge_cloud", 20.0, bench, {"latency_ms": {"p50": 55.0}})
    assert m["per_user_tok_s"] == 12.0                         # median of 10, 12, 12 tok/s
    assert m["tau"] == 4.0 and m["acceptance"] == 0.75 and m["verify_ms_p50"] == 55.0
    assert m["rounds_per_100_tokens"] == round(100 * 45 / 181, 3)
    assert m["draft_ms_per_round"] == round((10 * 100 + 30 * 60 + 5 * 50) / 45, 3)
    # work per request: rounds * (draft + RTT + compute) = 2000, 3600, 500 ms
    assert m["bound_round_ms"] == round((2000 + 3600 + 500) / 45, 3)
    assert m["bound_tok_s"] == round(float(np.median([40 / 2.0, 120 / 3.6, 21 / 0.5])), 3)
    assert m["bound_tpot_ms"] == round(float(np.median([(2000 - 500) / 39, (3600 - 1000) / 119, (500 - 200) / 20])), 3)
    assert m["per_user_tok_s"] <= m["bound_tok_s"]
    co = summarise("cloud_only", 20.0, bench, None)
    assert co["bound_tok_s"] is None and co["bound_tpot_ms"] is None and co["bound_round_ms"] is None


def _record(row, mode, link, repeat, tok_s, rtt=None):
    ds = {d: {"per_user_tok_s": tok_s, "tau": 4.0 if mode == "edge_cloud" else None, "completed": 2, "failed": 0}
          for d in ("humaneval", "mtbench")}
    return {"row": row, "mode": mode, "link": link, "rtt_ms": rtt, "repeat": repeat, "datasets": ds}


def test_rows_mean_over_repeats_and_edge_only_at_every_link(tmp_path):
    exp = load_experiment(write(tmp_path, {**GOOD, "repeats": 2}))
    records = [_record("edge_cloud", "edge_cloud", "rtt=5", 0, 10.0), _record("edge_cloud", "edge_cloud", "rtt=5", 1, 12.0),
               _record("edge_only", "edge_only", None, 0, 20.0),
               {"row": "cloud_only", "mode": "cloud_only", "link": "rtt=50", "repeat": 0, "error": "ProcessFailed: x"}]
    rows = rows_of(exp, records)
    ec = [r for r in rows if r["row"] == "edge_cloud" and r["dataset"] == "humaneval"]
    assert len(ec) == 1 and ec[0]["per_user_tok_s"] == 11.0 and ec[0]["spread"]["per_user_tok_s"] == [10.0, 12.0]
    assert ec[0]["repeats"] == 2 and ec[0]["completed"] == 2 and isinstance(ec[0]["completed"], int)
    eo = [r for r in rows if r["row"] == "edge_only" and r["dataset"] == "mtbench"]
    assert [r["rtt_ms"] for r in eo] == [5.0, 50.0] and all(r["measured_once"] for r in eo)
    co = [r for r in rows if r["row"] == "cloud_only"]
    assert [(r["rtt_ms"], r["error"]) for r in co] == [(50.0, "ProcessFailed: x")] * 2
    assert not any(r["row"] == "cloud_only" and r["rtt_ms"] == 5.0 for r in rows)     # never ran


def test_greedy_answers_compared_with_the_target_alone(tmp_path):
    exp = load_experiment(write(tmp_path, GOOD))

    def rec(row, mode, link, texts):
        return {"row": row, "mode": mode, "link": link, "repeat": 0,
                "datasets": {d: {"bench": {"generated_texts": texts}} for d in ("humaneval", "mtbench")}}
    records = [rec("cloud_only", "cloud_only", "rtt=5", ["a", "b"]), rec("cloud_only", "cloud_only", "rtt=50", ["a", "c"]),
               rec("edge_cloud", "edge_cloud", "rtt=5", ["a", "b"]), rec("edge_cloud", "edge_cloud", "rtt=50", ["a", "x"]),
               rec("edge_only", "edge_only", None, ["a", "c"])]
    rows = rows_of(exp, records)
    agreement(exp, records, rows)
    got = {(r["row"], r["link"], r["dataset"]): r.get("same_text_as_cloud_only") for r in rows}
    assert got[("edge_cloud", "rtt=5", "humaneval")] == [2, 2] and got[("edge_cloud", "rtt=50", "mtbench")] == [1, 2]
    assert got[("edge_only", "rtt=5", "humaneval")] == [1, 2] and got[("edge_only", "rtt=50", "humaneval")] == [2, 2]
    assert got[("cloud_only", "rtt=5", "humaneval")] is None


def test_report_derives_rows_again_from_the_raw_cells(tmp_path):
    """`report` re-summarises each cell's stored benchmark output: rows follow today's definitions."""
    figures = [{"rounds": 2, "tokens": 8, "draft_ms_per_round": 100.0, "compute_ms_per_round": 50.0}]
    result = canned_result("bars")
    result["experiment"]["links"] = ["rtt=5"]
    result["experiment"]["workload"]["datasets"] = ["humaneval"]
    result["experiment"]["workload"]["request_rate"] = float("inf")
    result["cells"] = [{"row": "edge_cloud", "mode": "edge_cloud", "link": "rtt=5", "rtt_ms": 5.0, "repeat": 0,
                        "logs": "tiny-logs/edge_cloud__rtt5__r0",
                        "datasets": {"humaneval": {"bench": canned_bench([1.0], [8], figures, [0.4]),
                                                   "cloud_stats": {"latency_ms": {"p50": 60.0}}}}}]
    report.write(result, tmp_path)
    kept = json.loads((tmp_path / "tiny.json").read_text())["cells"][0]["datasets"]["humaneval"]
    assert "bench" not in kept and kept["cloud_stats"]       # the benchmark's output lives in the logs archive
    assert main(["report", "tiny", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "tiny.json").read_text())["rows"] == result["rows"]   # no archive: rows stand
    bench = tmp_path / "tiny-logs" / "edge_cloud__rtt5__r0" / "bench_humaneval.json"
    bench.parent.mkdir(parents=True)
    bench.write_text(json.dumps(result["cells"][0]["datasets"]["humaneval"]["bench"]))
    with tarfile.open(tmp_path / "tiny-logs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tiny-logs", arcname="tiny-logs")
    shutil.rmtree(tmp_path / "tiny-logs")
    assert main(["report", "tiny", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "tiny.json").read_text()
    assert "Infinity" not in text and '"request_rate": "inf"' in text       # strict JSON
    [row] = json.loads(text)["rows"]
    assert (row["row"], row["per_user_tok_s"], row["verify_ms_p50"]) == ("edge_cloud", 8.0, 60.0)
    assert row["bound_round_ms"] == 155.0 and row["bound_tok_s"] == round(8 / 0.31, 3)


# --- report ----------------------------------------------------------------------------------------
def canned_result(kind="vs_rtt") -> dict:
    rows = []
    for mode, base in (("edge_cloud", 12.0), ("cloud_only", 8.0), ("edge_only", 15.0)):
        for rtt in (5.0, 50.0):
            for ds in ("humaneval", "mtbench"):
                rows.append({"row": mode, "mode": mode, "link": None if mode == "edge_only" else f"rtt={rtt:g}",
                             "rtt_ms": rtt, "dataset": ds, "repeats": 1, "measured_once": mode == "edge_only",
                             "per_user_tok_s": base - rtt / 10, "ttft_ms_p50": 100 + rtt, "tpot_ms_p50": 1000 / base,
                             "tau": 4.5 if mode == "edge_cloud" else None, "acceptance": None,
                             "bound_tok_s": base + 3 if mode == "edge_cloud" else None,
                             "bound_tpot_ms": 1000 / (base + 3) if mode == "edge_cloud" else None,
                             "completed": 2, "failed": 0})
    experiment = {**GOOD, "split": "heldout", "notes": "A canned note.", "base": {}, "repeats": 1,
                  "workload": {**GOOD["workload"], "split": "heldout", "request_rate": "inf", "burstiness": 1.0,
                               "max_concurrency": 1, "temperature": 0.0, "seed": 0, "goodput": [], "warmup": True},
                  "table": ["per_user_tok_s", "ttft_ms_p50", "tau"],
                  "plots": [{"kind": kind, "metrics": ["per_user_tok_s", "tpot_ms_p50", "tau"], "bound": True}]}
    del experiment["split"]
    meta = {"command": "python -m ablations run ablations/experiments/tiny.yaml --out X", "commit": "abc123",
            "machine": "Test CPU", "cpus": 2, "date": "2026-01-01 00:00 UTC", "versions": {"python": "3.11"},
            "load_start": "1.00", "load_end": "2.00", "duration_s": 12.5, "real": "Real: everything."}
    return {"meta": meta, "experiment": experiment, "rows": rows, "cells": []}


def test_report_renders_markdown_and_plot_from_json(tmp_path):
    files = report.write(canned_result(), tmp_path)
    assert [f.name for f in files] == ["tiny.json", "tiny.md", "tiny.png"]
    md = (tmp_path / "tiny.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# tiny" and "Command: `python -m ablations run" in md.split("|")[0]
    assert "| row | dataset | 5 ms | 50 ms |" in md                 # RTT across: one table per metric
    assert "| edge_cloud | humaneval | 11.50 | 7.00 |" in md       # 12 - rtt/10
    assert "edge_only: no cloud, so no link; measured once" in md and "A canned note." in md
    assert "Real: everything." in md and "![tiny](tiny.png)" in md
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "tiny.json").read_text())["rows"][0]["per_user_tok_s"] == 11.5


def test_report_bars_table(tmp_path):
    result = canned_result("bars")
    result["rows"] = [r for r in result["rows"] if r["rtt_ms"] == 5.0]
    result["experiment"]["links"] = ["rtt=5"]
    report.write(result, tmp_path)
    md = (tmp_path / "tiny.md").read_text()
    assert "| row | mode | link | dataset | tok/s per user | TTFT p50 (ms) | τ (tok/round) |" in md
    assert "| edge_only | edge_only | none (no cloud) | humaneval | 14.50 | 105 | – |" in md


def test_report_command_redraws_from_the_json(tmp_path, capsys):
    report.write(canned_result(), tmp_path)
    (tmp_path / "tiny.md").unlink()
    (tmp_path / "tiny.png").unlink()
    assert main(["report", "tiny", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "tiny.md").exists() and (tmp_path / "tiny.png").exists()
    assert main(["report", "nothing", "--out", str(tmp_path)]) == 2
    assert "no result file" in capsys.readouterr().err


# --- end to end (slow) -----------------------------------------------------------------------------
@pytest.mark.slow
def test_one_cell_end_to_end(tmp_path):
    """One real cell: cloud, link emulator and edge as processes, the benchmark over HTTP, the report."""
    path = write(tmp_path, {"name": "one_cell", "question": "Does one cell run end to end?",
                            "workload": {"datasets": ["humaneval"], "num_prompts": 1, "max_tokens": 8},
                            "links": ["rtt=10"], "base": {"cloud.n_ctx": 1024, "draft.n_ctx": 1024, "cloud.n_threads": 1,
                                                        "draft.n_threads": 1},
                            "matrix": {"edge_cloud": {}},
                            "plots": [{"kind": "bars", "metrics": ["per_user_tok_s", "tau"]}]})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    result = json.loads((out / "one_cell.json").read_text())
    assert {"command", "commit", "machine", "cpus", "date", "versions"} <= set(result["meta"])
    assert result["meta"]["command"].startswith("python -m ablations run ") and result["meta"]["complete"]
    [row] = result["rows"]
    assert row["mode"] == "edge_cloud" and row["rtt_ms"] == 10.0 and row["completed"] == 1 and row["failed"] == 0
    assert row["per_user_tok_s"] > 0 and row["tau"] >= 1 and row["bound_round_ms"] > 10.0
    [cell] = result["cells"]
    ds = cell["datasets"]["humaneval"]
    assert "bench" not in ds and ds["completed"] == 1
    with tarfile.open(out / "one_cell-logs.tar.gz") as tar:          # the benchmark's output, whole
        bench = json.load(tar.extractfile(f"one_cell-logs/{Path(cell['logs']).name}/bench_humaneval.json"))
    assert bench["output_lens"] == [8]
    assert ds["cloud_stats"]["rounds"] == ds["edge_stats"]["rounds"] > 0       # every round crossed the link
    assert cell["link_stats"]["profile"] == "rtt=10" and cell["link_stats"]["bytes_up"] > 0
    assert set(cell["processes"]) == {"linkemu", "edge"} and cell["cloud"]["reused"] is False
    [cloud] = result["clouds"]                                   # the cloud: kept by the runner, stopped at the end
    assert set(cloud["processes"]) == {"cloud"} and cloud["cells"] == 1
    assert not any(_alive(p["pid"]) for p in [*cell["processes"].values(), *cloud["processes"].values()])
    assert (out / "one_cell.md").exists() and (out / "one_cell.png").exists()
    assert (out / "one_cell-logs.tar.gz").exists()
