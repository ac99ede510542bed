"""The population report's figures (ablations/population.py): worst_class_slowdown, the per-class table
from users' outputs, and the experiment files. Fast: no models, no processes."""
import dataclasses

import pytest

from ablations import population
from ablations.bench import RequestOutput
from ablations.experiment import EXPERIMENTS, ExperimentError


def per_class(**p99):
    return {c: {"users": 1, "tpot_ms_p99": v} for c, v in p99.items()}


def test_worst_class_slowdown_is_the_largest_p99_tpot_ratio():
    fifo = per_class(very_good=100.0, good=200.0, bad=400.0, very_bad=1000.0)
    health = per_class(very_good=80.0, good=190.0, bad=600.0, very_bad=1300.0)
    d = population.worst_class_slowdown(fifo, health)
    assert d["value"] == 1.5 and d["class"] == "bad"
    assert d["per_class"] == {"very_good": 0.8, "good": 0.95, "bad": 1.5, "very_bad": 1.3}


def test_worst_class_slowdown_skips_classes_without_users():
    fifo = per_class(very_good=100.0, good=200.0, bad=None)
    health = per_class(very_good=50.0, good=220.0, bad=None)
    d = population.worst_class_slowdown(fifo, health)
    assert d["value"] == 1.1 and d["class"] == "good" and set(d["per_class"]) == {"very_good", "good"}
    assert population.worst_class_slowdown({}, {})["value"] is None


def result(uid, ttft, latency, tokens, ok=True):
    o = RequestOutput(id=uid, success=ok, ttft=ttft, latency=latency, output_tokens=tokens,
                      chunk_times=[ttft, latency] if ok else [], chunk_tokens=[1, tokens - 1] if ok else [])
    return {"uid": uid, "output": dataclasses.asdict(o), "cloud_times": [ttft - 0.01, latency - 0.01] if ok else []}


def test_class_table_and_policy_result():
    users = [{"uid": "a", "rtt_class": "very_good"}, {"uid": "b", "rtt_class": "very_good"},
             {"uid": "c", "rtt_class": "bad"}, {"uid": "d", "rtt_class": "bad"}]
    res = [result("a", 1.0, 2.0, 11), result("b", 2.0, 4.0, 11), result("c", 3.0, 13.0, 11),
           result("d", 0.0, 0.0, 0, ok=False)]
    t = population.class_table(res, users)
    assert t["very_good"]["users"] == 2 and t["very_good"]["tpot_ms_p50"] == 150.0     # (100 + 200) / 2
    assert t["very_good"]["ttft_ms_p99"] == pytest.approx(1990.0)                    # numpy's linear percentile
    assert (t["bad"]["users"], t["bad"]["failed"], t["bad"]["tpot_ms_p99"]) == (2, 1, 1000.0)
    assert t["good"] == {"users": 0, "failed": 0, "ttft_ms_p50": None, "ttft_ms_p99": None, "tpot_ms_p50": None,
                         "tpot_ms_p99": None}
    s = population.policy_summary(res, users, window_s=5.0)
    assert s["tokens"] == 33 and s["effective_tok_s"] == pytest.approx(33 / 13, abs=1e-3)
    assert sum(s["timeline"]["client_tokens"]) == sum(s["timeline"]["cloud_tokens"]) == 33


@pytest.mark.parametrize("name", ["population", "gpu_population", "gpu_goodput", "gpu_goodput_all"])
def test_experiment_files_load(name):
    exp = population.load(EXPERIMENTS / f"{name}.yaml")
    assert population.kind_of(EXPERIMENTS / f"{name}.yaml") == exp.kind
    assert population.kind_of(EXPERIMENTS / "switches.yaml") is None


def test_bad_population_file_names_the_key(tmp_path):
    bad = (EXPERIMENTS / "population.yaml").read_text().replace("  fifo:", "  lifo:")
    (tmp_path / "x.yaml").write_text(bad)
    with pytest.raises(ExperimentError, match="the rows fifo and health"):
        population.load(tmp_path / "x.yaml")


def test_rows_features_and_versus():
    exp = population.load(EXPERIMENTS / "population.yaml", ["rows=[fifo_all,health_all]"])
    assert exp.labels() == ["fifo_all", "health_all"]
    off, on = {"parallel_prefill": False, "draft_ahead": False}, {"parallel_prefill": True, "draft_ahead": True}
    assert exp.features("fifo") == off and exp.features("health_all") == on      # off unless a row or section says
    assert (exp.versus("fifo"), exp.versus("health"), exp.versus("health_all")) == (None, "fifo", "fifo_all")
    with pytest.raises(ExperimentError, match="rows: nope not in the matrix"):
        population.load(EXPERIMENTS / "population.yaml", ["rows=[fifo,nope]"])
    with pytest.raises(ExperimentError, match="versus"):
        population.load(EXPERIMENTS / "population.yaml", ["matrix.health.versus=health"])
    goodput = population.load(EXPERIMENTS / "gpu_goodput_all.yaml")
    assert goodput.features("qwen14b") == on and goodput.goodput.systems == ["tandem"]


def test_each_policy_is_compared_with_its_fifo_row():
    exp = population.load(EXPERIMENTS / "population.yaml", ["rows=[fifo_all,health_all]"])

    def cell(p99, tok_s):
        return {"summary": {"per_class": per_class(very_good=p99, good=2 * p99), "effective_tok_s": tok_s}}
    res = population.population_result(exp, {"fifo_all": cell(100.0, 4.0), "health_all": cell(150.0, 5.0)}, {})
    d = res["slowdown_vs_fifo"]["health_all"]
    assert (d["versus"], d["value"], d["effective_tok_s_ratio"]) == ("fifo_all", 1.5, 1.25)
    assert "worst_class_slowdown" not in res and set(res["slowdown_vs_fifo"]) == {"health_all"}   # no fifo row run
