"""ablations/round_profile.py's summaries and report from canned rounds (no models): medians per draft
length, the edge's own overhead, tok/s over the rounds, and a report that sets prices beside waits."""
import json

from ablations import round_profile as rp


def canned() -> dict:
    rounds = [{"k": 1, "committed": 2, "draft_ms": 60.0, "compute_ms": 100.0, "round_trip_ms": 102.0, "wait_ms": 170.0}] * 5
    rounds += [{"k": 4, "committed": 5, "draft_ms": 160.0 + i, "compute_ms": 220.0, "round_trip_ms": 222.0,
                "wait_ms": 390.0 + 2 * i} for i in range(5)]
    fitted = {"first_step_ms": 60.0, "step_ms": 35.0, "rtt_ms": 0.5,
              "model_cost_ms": {str(k): 160.0 + 80.0 * (k - 1) for k in range(1, 13)}}
    row = {"rounds": rounds, "fitted": fitted, "by_k": rp.by_k(rounds), "tau": 3.5,
           "tok_s": round(sum(r["committed"] for r in rounds) / sum(r["wait_ms"] for r in rounds) * 1e3, 2)}
    meta = {"command": "python -m ablations.round_profile --out X", "machine": "Test CPU", "cpus": 2, "load_start": "0.1",
            "load_end": "0.2", "commit": "abc", "date": "2026-01-01", "duration_s": 1.0, "prompts": 1, "max_tokens": 8}
    result = {"meta": meta, "decode_ms": {"target": {n: 50.0 * n for n in range(1, 14)},
                                          "draft": {n: 30.0 * n for n in range(1, 14)}}, "rows": {"adaptive": row}}
    result["findings"] = rp.findings(result)
    return json.loads(json.dumps(result))          # as read back from the JSON: keys are strings


def test_by_k_takes_medians_and_the_edge_overhead():
    s = rp.by_k([{"k": 2, "draft_ms": d, "compute_ms": 10.0, "round_trip_ms": rt, "wait_ms": w}
                 for d, rt, w in ((100.0, 50.0, 160.0), (90.0, 60.0, 151.0), (300.0, 50.0, 360.0))])
    assert s[2]["rounds"] == 3 and s[2]["draft_ms"] == 100.0 and s[2]["wait_ms"] == 160.0
    assert s[2]["overhead_ms"] == 10.0             # median of 10, 1, 10


def test_report_sets_prices_beside_waits(tmp_path):
    result = canned()
    assert "adaptive k=4: waits 394 ms, priced 400 (+2 %)" in result["findings"]
    assert "adaptive k=1: waits 170 ms, priced 160 (-6 %), overhead 8 ms" in result["findings"]
    md = rp.markdown(result)
    assert "| adaptive | 4 | 5 | 162 | 220 | 222 | 394 | 10 | 400.0 |" in md
    assert "| target | 50 | 100 | 150 |" in md and md.startswith("# round_profile")
    rp.plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
