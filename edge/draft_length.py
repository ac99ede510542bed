"""How many tokens to draft this round (switches.adaptive_draft): the k that maximises the expected
committed tokens per second of one round.

One round drafts k tokens (k steps of the shared drafter: the first, t_first, also feeds the tokens
committed since the session's last draft; each next one, t_draft, the token before; the tokens a prompt
lookup supplies cost nothing), crosses the link (RTT) and is verified (t_verify(k), the cloud's compute):

    rate(k) = E[tau(k)] / (D(max(0, k - free)) + RTT + t_verify(k)),   D(n) = t_first + (n - 1) t_draft (D(0) = 0)

With each draft token accepted with probability alpha given the ones before it were (a geometric
model, as Leviathan et al. 2023), the round commits the accepted prefix plus the target's own token:

    E[tau(k)] = sum_{i=0..k} alpha^i = (1 - alpha^(k+1)) / (1 - alpha)

A far link (RTT large beside k * t_draft) pays for a round mostly in RTT, so the best k grows; a low
alpha makes the extra tokens worth little, so it shrinks. With draft-ahead a round's drafting overlaps
the flight of the one before whenever the round drafted ahead holds (round_cost).

The inputs are estimated online:
  alpha     per session: a Beta posterior over the per-token acceptance with forgetting. A round that
            drafted n tokens and had a accepted is a + (a < n) Bernoulli trials with a successes (the
            tokens after the first rejection were never tried). Prior: ALPHA0 worth PRIOR_TRIALS trials.
            Evidence fades per trial (FORGET_TRIAL), so a round of many tokens does not outweigh the
            later rounds that ended at their first token.
  t_draft   per edge (edge/drafter.py Drafter.step_ms, and first_ms for t_first): one llama_decode step
            of the shared drafter. A step advances every drafting session at once, so a session's draft of
            k tokens waits about k steps whatever the others do: the step, not the step / sessions, is its
            cost per token. The first step of a draft feeds one or two tokens (the target's own, and the
            draft's last when all were accepted), which on a CPU costs up to twice a step: priced as one,
            short drafts made every step look dear (ablations/results/round_profile.md).
  t_verify  per link: the cloud's reported compute ms per draft length seen (a mean with forgetting),
            joined by straight lines (VerifyCost): flat on a GPU, rising on a CPU cloud, and not a
            straight line there (llama.cpp takes a slower path from 8 positions on).
  RTT       the link's RFC 6298 SRTT (edge/link.py).
  p_ahead   per session (switches.draft_ahead): the share of its rounds whose round drafted ahead was
            kept (the same Beta estimate as alpha, one trial per round). Not alpha^(k+1): the guess a
            round ahead starts with is the token the gate stopped before, the one the drafter doubted.

Where the draft stops (the confidence gate of an adaptive draft, RateGate). The up-front k of a
geometric alpha is the best length *on average*; but the drafter knows, token by token, how sure it
is, and its confidence predicts acceptance. So an adaptive draft runs up to max_k and, after each step,
weighs the token it just made: with q_i = P(token i accepted | its confidence) (Calibration, learned
per edge from the cloud's answers), the draft's first j tokens are all accepted with P_j = q_1 ... q_j
and the round commits E(j) = 1 + P_1 + ... + P_j tokens in expectation. After step j it

  takes token j   when E(j) / cost(j) >= E(j-1) / cost(j-1), both paying the j steps already run (a
                  GPU's verify is flat: a made token is free to send; a CPU cloud pays for it);
  drafts on       when some m >= 1 more tokens, each accepted with the session's alpha, give
                  max_m E(j+m) / cost(j+m) > E(j) / cost(j): the next tokens are worth their steps.

cost(j) is round_rate's (j steps, the flight, the verify, the overlap draft-ahead buys). A far link
makes every round dear, so a draft runs on through tokens of middling confidence; a near one stops at
the first doubt; confident stretches (code that restates its prompt) run long at any RTT.

Prompt lookup (switches.ngram_draft) is a second draft source with an alpha of its own (a session's
lookups and its model drafts are right at different rates): each round the edge compares the best
lookup draft, m of the tokens found at no drafting cost, with the best model draft, and sends the one
with the higher rate. So a near link, where drafting is most of a round, takes a lookup even when it is
often wrong; a far one, where tau counts most, only a lookup about as good as the model (and a CPU cloud,
whose verify time grows with k, pays for a lookup's wrong tokens too).
"""
from __future__ import annotations

from typing import Optional

ALPHA0, PRIOR_TRIALS = 0.7, 4.0   # before a session's first round: acceptance 0.7, worth 4 tokens' evidence
LOOKUP_ALPHA0 = 0.5               # ... of prompt-lookup drafts
FORGET_TRIAL = 0.95                # alpha: a token 20 tries back weighs 0.95^20 = 0.36
FORGET = 0.9                      # verify cost: per round of a length, the one 10 such rounds back weighs 0.35
SPAN_MIN = 2                      # ... and no slope beyond the lengths seen until they span this many
CAL_BINS, CAL_PRIOR = 10, 3.0       # confidence -> acceptance: 10 bins, each starting at its midpoint worth 3 tokens
CAL_FORGET = 0.995                 # ... and remembering about the last 200 tokens that fell in it
ALPHA_MAX = 0.98                  # keep 1 - alpha away from 0 (alpha = 1 would make every k as good as max_k)


def expected_tokens(alpha: float, k: int) -> float:
    """E[tau(k)] = (1 - alpha^(k+1)) / (1 - alpha): accepted drafts + the target's own token."""
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def round_cost(draft_ms: float, flight_ms: float, p_ahead: float) -> float:
    """A round's ms (D = draft_ms, F = flight_ms = RTT + t_verify). p_ahead = P(the round drafted ahead of
    it holds): the session's measured share (switches.draft_ahead; 0 without it). The edge keeps one round
    ahead: round r+1 is drafted from r's send, and r+2 from when r+1 takes r's place in flight (at r's
    answer, or when r+1's draft is done, whichever is later). While rounds hold, answers come at F, D+F,
    2F+D, 2F+2D, ... when D < F (two rounds per D + F), and every D when D >= F: a cycle of
    max(D, (D + F) / 2). A round whose ahead round does not hold is followed by one drafted after its
    answer: D + F.
        cost = p * max(D, (D + F) / 2) + (1 - p) * (D + F)"""
    return p_ahead * max(draft_ms, (draft_ms + flight_ms) / 2) + (1 - p_ahead) * (draft_ms + flight_ms)


def drafting_ms(steps: int, t_draft_ms: float, first_ms: Optional[float] = None) -> float:
    """D(steps): the drafter's time for a draft of `steps` decode steps, the first at first_ms (t_draft
    where not known) and each next one at t_draft."""
    if steps <= 0:
        return 0.0
    return (t_draft_ms if first_ms is None else first_ms) + (steps - 1) * t_draft_ms


def round_rate(alpha: float, k: int, draft_ms: float, rtt_ms: float, verify_ms, p_ahead: float = 0.0) -> float:
    """Expected committed tokens per ms of a round that drafts k tokens in draft_ms: E[tau(k)] / round_cost."""
    alpha = min(max(alpha, 0.0), ALPHA_MAX)
    return expected_tokens(alpha, k) / max(round_cost(draft_ms, rtt_ms + verify_ms(k), p_ahead), 1e-3)


def best_draft_length(alpha: float, t_draft_ms: float, rtt_ms: float, verify_ms, min_k: int, max_k: int,
                      free: int = 0, p_ahead: float = 0.0, first_ms: Optional[float] = None) -> int:
    """argmax over k in [min_k, max_k] of E[tau(k)] / (D(max(0, k - free)) + RTT + t_verify(k))
    (with draft-ahead, the cost of round_rate). verify_ms: k -> the cloud's compute ms for a k-token
    draft. `free`: draft tokens that cost no drafting (a prompt lookup's). Ties go to the shorter draft."""
    best_k, best_rate = min_k, -1.0
    for k in range(min_k, max_k + 1):
        rate = round_rate(alpha, k, drafting_ms(k - free, t_draft_ms, first_ms), rtt_ms, verify_ms, p_ahead)
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


class Calibration:
    """P(a drafted token is accepted | the drafter's confidence in it), per edge: CAL_BINS bins over [0, 1],
    each a Beta posterior with slow forgetting. Prior: the confidence itself (max_prob is the draft model's
    probability of its own token), worth CAL_PRIOR tokens. A round's tokens up to its first rejection
    were tried: the accepted ones count as hits, the rejected one as a miss, the rest not at all."""

    def __init__(self) -> None:
        mid = [(b + 0.5) / CAL_BINS for b in range(CAL_BINS)]
        self.hits, self.trials = [m * CAL_PRIOR for m in mid], [CAL_PRIOR] * CAL_BINS

    @staticmethod
    def _bin(conf: float) -> int:
        return min(max(int(conf * CAL_BINS), 0), CAL_BINS - 1)

    def q(self, conf: float) -> float:
        b = self._bin(conf)
        return self.hits[b] / self.trials[b]

    def table(self) -> list[dict]:
        """Per bin: its confidence range, the acceptance it now predicts, and the evidence behind it (faded
        tokens, the prior's CAL_PRIOR included)."""
        return [{"confidence": [b / CAL_BINS, (b + 1) / CAL_BINS], "accepted": round(h / t, 3),
                 "weight": round(t, 1)} for b, (h, t) in enumerate(zip(self.hits, self.trials))]

    def observe(self, confidences: list[float], accepted: int) -> None:
        for i, conf in enumerate(confidences[:accepted + 1]):
            b = self._bin(conf)
            self.hits[b] = CAL_FORGET * self.hits[b] + (i < accepted)
            self.trials[b] = CAL_FORGET * self.trials[b] + 1.0


class RateGate:
    """Where an adaptive draft stops (module docstring): called by the drafter with each new token's
    confidence, it answers (take the token, draft on). Built per draft on the event loop, used in the
    drafter's thread: it holds its own copies of the inputs (verify ms per length precomputed)."""

    def __init__(self, calibration: Calibration, alpha: float, t_draft_ms: float, rtt_ms: float, verify_ms,
                 max_k: int, p_ahead: float = 0.0, first_ms: Optional[float] = None) -> None:
        self.q = calibration.q
        self.alpha = min(max(alpha, 0.0), ALPHA_MAX)
        self.t_draft, self.first, self.rtt, self.max_k, self.p_ahead = t_draft_ms, first_ms, rtt_ms, max_k, p_ahead
        self.verify = [verify_ms(j) for j in range(max_k + 1)]
        self.p, self.e, self.j = 1.0, 1.0, 0          # P_j, E(j), j: the draft so far

    def _rate(self, j: int, e: float, p: float, steps: int) -> float:
        """E / cost of a j-token draft (all accepted with p) that ran `steps` drafting steps."""
        cost = round_cost(drafting_ms(steps, self.t_draft, self.first), self.rtt + self.verify[j], self.p_ahead)
        return e / max(cost, 1e-3)

    def __call__(self, conf: float, forced: bool = False) -> tuple[bool, bool]:
        """forced: the token is taken whatever it is worth (the draft has not reached its min_k yet)."""
        j = self.j + 1
        p = self.p * self.q(conf)
        e = self.e + p
        if not forced and self._rate(j, e, p, j) < self._rate(j - 1, self.e, self.p, j):
            return False, False                           # not worth sending: stop before it
        self.p, self.e, self.j = p, e, j
        now = self._rate(j, e, p, j)
        more_e, more_p = e, p
        for m in range(j + 1, self.max_k + 1):           # the next tokens at the session's alpha each
            more_p *= self.alpha
            more_e += more_p
            if self._rate(m, more_e, more_p, m) > now:
                return True, True
        return True, False


class VerifyCost:
    """The cloud's compute ms for a k-token draft, from what the rounds took: per draft length seen, a mean
    with forgetting (FORGET per round of that length); between two lengths seen, the straight line between
    them; beyond them, the slope across all the lengths seen (flat until they span SPAN_MIN: a slope from
    k in {1, 2} alone was noise that kept k at 1). Not one line fitted to every round: a CPU cloud's cost
    is not a line (llama.cpp decodes 8 or more positions on a slower path: 1 position 54 ms, 7 positions
    324, 8 positions 519, ablations/results/round_profile.md), and a line through the lengths a session
    happens to use (mostly 1, a few 7 or more) priced k = 2..6 up to 30 % too dear, which kept drafts short."""

    def __init__(self) -> None:
        self.w: dict[int, float] = {}             # per draft length: faded weight, and faded sum of compute ms
        self.sum: dict[int, float] = {}

    def observe(self, drafted: int, compute_ms: float) -> None:
        self.w[drafted] = FORGET * self.w.get(drafted, 0.0) + 1.0
        self.sum[drafted] = FORGET * self.sum.get(drafted, 0.0) + compute_ms

    def __call__(self, k: int) -> float:
        if not self.w:
            return 0.0
        seen = sorted(self.w)
        at = {j: self.sum[j] / self.w[j] for j in seen}
        lo, hi = seen[0], seen[-1]
        slope = max((at[hi] - at[lo]) / (hi - lo), 0.0) if hi - lo >= SPAN_MIN else 0.0
        if k <= lo:
            return max(at[lo] - slope * (lo - k), 0.0)
        if k >= hi:
            return at[hi] + slope * (k - hi)
        below = max(j for j in seen if j <= k)
        above = min(j for j in seen if j >= k)
        if below == above:
            return at[k]
        return at[below] + (at[above] - at[below]) * (k - below) / (above - below)
