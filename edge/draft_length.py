"""How many tokens to draft this round (switches.adaptive_draft): the k that maximises the expected
committed tokens per second of one round.

One round drafts k tokens (k steps of the shared drafter, t_draft each; the tokens a prompt lookup
supplies cost nothing), crosses the link (RTT) and is verified (t_verify(k), the cloud's compute):

    rate(k) = E[tau(k)] / (max(0, k - free) * t_draft + RTT + t_verify(k))

With each draft token accepted with probability alpha given the ones before it were (a geometric
model, as Leviathan et al. 2023), the round commits the accepted prefix plus the target's own token:

    E[tau(k)] = sum_{i=0..k} alpha^i = (1 - alpha^(k+1)) / (1 - alpha)

A far link (RTT large beside k * t_draft) pays for a round mostly in RTT, so the best k grows; a low
alpha makes the extra tokens worth little, so it shrinks. With draft-ahead a round's drafting hides
behind the flight of the one before whenever that one holds (round_rate). The confidence gate may still stop a draft
before k.

The inputs are estimated online:
  alpha     per session: a Beta posterior over the per-token acceptance with forgetting. A round that
            drafted n tokens and had a accepted is a + (a < n) Bernoulli trials with a successes (the
            tokens after the first rejection were never tried). Prior: ALPHA0 worth PRIOR_TRIALS trials.
            Evidence fades per trial (FORGET_TRIAL), so a round of many tokens does not outweigh the
            later rounds that ended at their first token.
  t_draft   per edge (edge/drafter.py Drafter.step_ms): one llama_decode step of the shared drafter. A
            step advances every drafting session at once, so a session's draft of k tokens waits about
            k steps whatever the others do: the step, not the step / sessions, is its cost per token.
  t_verify  per link: a line c0 + c1 * (k + 1) fitted to the cloud's reported compute ms against the
            positions it verified (weighted least squares with forgetting): flat on a GPU, rising on a
            CPU cloud. Until k has spread (standard deviation >= 1) the line is flat at the mean: a
            slope from k in {1, 2} alone was noise that kept k at 1.
  RTT       the link's RFC 6298 SRTT (edge/link.py).

Prompt lookup (switches.ngram_draft) is a second draft source with an alpha of its own (a session's
lookups and its model drafts are right at different rates): each round the edge compares the best
lookup draft, m of the tokens found at no drafting cost, with the best model draft, and sends the one
with the higher rate. So a near link, where drafting is most of a round, takes a lookup even when it is
often wrong; a far one, where tau counts most, only a lookup about as good as the model (and a CPU cloud,
whose verify time grows with k, pays for a lookup's wrong tokens too).
"""
from __future__ import annotations

ALPHA0, PRIOR_TRIALS = 0.7, 4.0   # before a session's first round: acceptance 0.7, worth 4 tokens' evidence
LOOKUP_ALPHA0 = 0.5               # ... of prompt-lookup drafts
FORGET_TRIAL = 0.95                # alpha: a token 20 tries back weighs 0.95^20 = 0.36
FORGET = 0.9                      # verify cost: per round, the round 10 rounds back weighs 0.9^10 = 0.35
ALPHA_MAX = 0.98                  # keep 1 - alpha away from 0 (alpha = 1 would make every k as good as max_k)


def expected_tokens(alpha: float, k: int) -> float:
    """E[tau(k)] = (1 - alpha^(k+1)) / (1 - alpha): accepted drafts + the target's own token."""
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def round_rate(alpha: float, k: int, draft_ms: float, rtt_ms: float, verify_ms, ahead: bool = False) -> float:
    """Expected committed tokens per ms of a round that drafts k tokens in draft_ms.

    ahead (switches.draft_ahead): the round after this one is drafted while this one flies. When this
    one accepts all k and then the guess (p = alpha^(k+1)), that round is on the wire already and the
    cycle is max(draft, flight); otherwise the edge drafts afresh after the answer, draft + flight:
        cost = p * max(draft, RTT + t_verify) + (1 - p) * (draft + RTT + t_verify)"""
    alpha = min(max(alpha, 0.0), ALPHA_MAX)
    flight = rtt_ms + verify_ms(k)
    p = alpha ** (k + 1) if ahead else 0.0
    cost = p * max(draft_ms, flight) + (1 - p) * (draft_ms + flight)
    return expected_tokens(alpha, k) / max(cost, 1e-3)


def best_draft_length(alpha: float, t_draft_ms: float, rtt_ms: float, verify_ms, min_k: int, max_k: int,
                      free: int = 0, ahead: bool = False) -> int:
    """argmax over k in [min_k, max_k] of E[tau(k)] / (max(0, k - free) t_draft + RTT + t_verify(k))
    (with draft-ahead, the cost of round_rate). verify_ms: k -> the cloud's compute ms for a k-token
    draft. `free`: draft tokens that cost no drafting (a prompt lookup's). Ties go to the shorter draft."""
    best_k, best_rate = min_k, -1.0
    for k in range(min_k, max_k + 1):
        rate = round_rate(alpha, k, max(0, k - free) * t_draft_ms, rtt_ms, verify_ms, ahead)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


class Acceptance:
    """One session's alpha: Beta(successes + prior, failures + prior), older rounds forgotten."""

    def __init__(self, alpha0: float = ALPHA0) -> None:
        self.hits, self.trials = alpha0 * PRIOR_TRIALS, PRIOR_TRIALS

    @property
    def alpha(self) -> float:
        return self.hits / self.trials

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        trials = accepted + (accepted < drafted)
        fade = FORGET_TRIAL ** trials
        self.hits = fade * self.hits + accepted
        self.trials = fade * self.trials + trials


class VerifyCost:
    """The cloud's compute ms for a k-token draft: c0 + c1 (k + 1), fitted by least squares with forgetting."""

    def __init__(self) -> None:
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, drafted: int, compute_ms: float) -> None:
        x = drafted + 1.0
        self.w, self.sx, self.sy = FORGET * self.w + 1, FORGET * self.sx + x, FORGET * self.sy + compute_ms
        self.sxx, self.sxy = FORGET * self.sxx + x * x, FORGET * self.sxy + x * compute_ms

    def __call__(self, k: int) -> float:
        if self.w == 0:
            return 0.0
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        slope = max((self.sxy / self.w - mx * my) / var, 0.0) if var >= 1.0 else 0.0   # k spread < 1: flat
        return max(my + slope * (k + 1 - mx), 0.0)
