"""Add the drafter's draft-ahead guess to recorded edge traces (for the replay's draft-ahead clients).

A draft-ahead edge (edge/generator.py) sends round r+1 while round r is on the wire, drafted after r's
whole draft and its guess of the target's next token: the draft model's own argmax there. Traces
recorded without draft-ahead lack that guess; this computes it with the same llama.cpp draft model,
for every recorded round at output position j with draft D: argmax of the drafter after
prompt + output[:j] + D. Where the guess is right and r accepted all of D, the recorded next round
(at j + len(D) + 1) is exactly the draft the draft-ahead edge would have sent early (same model, same
context, greedy), so the replay can send it early too.

  python -m ablations.trace_guesses ablations/results/gpu_traces15.json      # rewrites it in place
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.assets import model_path
from common.llama_runtime import LlamaRunner


def guesses(runner: LlamaRunner, s: dict) -> dict[str, int]:
    out = {}
    for pos, (draft, _ms) in sorted(s["trace"].items(), key=lambda kv: int(kv[0])):
        ctx = s["prompt"] + s["fallback"][:int(pos)] + draft
        logits, _ = runner.extend_to(ctx, 1, reuse=True)
        out[pos] = int(np.argmax(logits[-1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    sessions = json.loads(args.traces.read_text())
    runner = LlamaRunner(model_path("qwen2.5-coder-0.5b-instruct-q4_k_m"), 4096, args.threads)
    hits = rounds = 0
    for s in tqdm(sessions, desc="sessions"):
        s["guess"] = guesses(runner, s)
        for pos, (L, a) in s["accepted"].items():       # how often draft-ahead would have hit
            j = int(pos)
            rounds += 1
            hits += a == L and j + L < len(s["fallback"]) and s["fallback"][j + L] == s["guess"][pos]
    args.traces.write_text(json.dumps(sessions))
    print(f"{len(sessions)} sessions, {rounds} rounds: the draft-ahead round would be right after {hits} "
          f"({hits / max(rounds, 1):.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
