"""Seed 000's network-aware prompt (switches.network_context_prompt, read in edge/node.py): the model
is told the user's link, so that it answers more briefly where every token takes longer to arrive.

* A static system instruction (`SYSTEM_INSTRUCTION`), the same bytes for every user and every
  request, says that the user's RTT appears at the end of their message. Being identical and first,
  it stays in every prefix cache (the edge's KV, the cloud's prefix cache).
* A small block is appended to the LAST user message only (earlier turns are left as they were, so
  a conversation's earlier prefix is unchanged from turn to turn):

      <network_context>
      RTT: 250 ms
      Status: Normal
      </network_context>

  RTT is the user's round-trip time to the edge in ms, rounded; Status is Excellent below 100 ms,
  Poor above 300 ms, Normal between (the rounded value decides, so the block never contradicts
  itself). An unknown RTT adds no block (the instruction stays, so the prefix does not change).
* Where the request has its own system message: the instruction is put at the start of that message
  (ours, a blank line, theirs), not as a second system message. One system message renders under any
  chat template (some accept a system message only as the first one, some only one), and our bytes
  still come first, so the cached prefix is shared up to where the request's own text begins. A
  request without a system message gets ours as its first message (for Qwen2.5's template, this
  replaces its default system prompt, as any system message does).
* The wording: of three instructions measured with the 1.5B target (ablations/results/network_context.md),
  the two that cut Poor answers hardest also let the status into what the model says ("Hand dryers are
  not recommended for use on a Poor network connection."); this one kept it out, at a weaker cut.
"""
from __future__ import annotations

import math
from typing import Optional

EXCELLENT_BELOW_MS = 100
POOR_ABOVE_MS = 300

SYSTEM_INSTRUCTION = (
    "You are a helpful assistant. The user's latest message ends with a <network_context> block: the "
    "round-trip time (RTT) of their network connection in milliseconds and its status, Excellent, Normal or "
    "Poor. It only sets how long your answer is, never what it says; do not mention it. Excellent: answer "
    "exactly as you would without it. Normal: the same answer, a little tighter. Poor: only the essential "
    "answer, as short as possible, with no preamble, no examples and no repetition.")


def status_word(rtt_ms: float) -> str:
    """Excellent below 100 ms, Poor above 300 ms, else Normal (of the RTT rounded to whole ms)."""
    ms = round(rtt_ms)
    return "Excellent" if ms < EXCELLENT_BELOW_MS else "Poor" if ms > POOR_ABOVE_MS else "Normal"


def network_block(rtt_ms: float) -> str:
    ms = round(rtt_ms)
    return f"\n\n<network_context>\nRTT: {ms} ms\nStatus: {status_word(ms)}\n</network_context>"


def with_network_context(messages: list[dict], rtt_ms: Optional[float]) -> list[dict]:
    """The messages (validated {"role", "content"} dicts) with the instruction and the block; the input
    is not changed."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = SYSTEM_INSTRUCTION + "\n\n" + out[0]["content"]
    else:
        out.insert(0, {"role": "system", "content": SYSTEM_INSTRUCTION})
    if rtt_ms is not None and math.isfinite(rtt_ms) and rtt_ms >= 0:
        last_user = next((m for m in reversed(out) if m["role"] == "user"), None)
        if last_user is not None:
            last_user["content"] += network_block(rtt_ms)
    return out
