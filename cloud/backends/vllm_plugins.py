"""The two classes vLLM loads by name for the in-engine design (imported only inside vLLM).

* `EdgeDraftScheduler` (`scheduler_cls`): before vLLM's own schedule(), every running request that
  is decoding asks the DraftBoard what to do: park (its draft is still on the wire: not stepped, KV
  stays resident), step with the edge's spec tokens, or (not ours) leave it alone. Running requests
  are ordered by the same health-factor key as the admission queue (healthiest and longest-waiting
  first), which decides who gets the token budget when it binds. Parked requests are out of `running`
  while vLLM schedules, so vLLM alone would admit waiting requests past max_num_seqs: the backend's
  waiting room (board_backend.py, common/scheduling.py) keeps at most max_num_seqs requests in the
  engine and decides, by the same key, which new session gets a freed seat. After vLLM's update_from_output
  (tokens appended, stops checked) it hands the step's new tokens to the backend (`on_outputs`): the
  board's only source of tokens, answered at once, before vLLM's output processing, or after the
  step (`cloud.vllm.early_answers`).
* `BoardProposer` (`speculative_config={"method": "custom_class", ...}`): vLLM calls its propose()
  in the GPU worker after every step. Edge drafts do not originate there (they arrive over HTTP in
  the front end and enter at the scheduler, which is where the decision to step a request is made),
  so it proposes nothing; its role is to switch on vLLM's spec-decode path (draft slots in the
  batch, the rejection sampler). Keeping drafts out of the worker means no process boundary to
  cross, also with tensor parallelism (workers in other processes).

The board is found through `BOARD`, set by the backend before the engine starts; the engine core
runs in the backend's process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
"""
from __future__ import annotations

import time

from vllm.v1.core.sched.scheduler import Scheduler

from cloud.backends.draft_board import PARK, DraftBoard

BOARD: DraftBoard | None = None


class EdgeDraftScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.board = BOARD
        self.last_scheduled_tokens = 0
        self.schedule_s = 0.0        # time spent in schedule() (ours + vLLM's), for the profile
        self.on_outputs = None       # the backend's early answers: called with each step's outputs

    def schedule(self, *args, **kwargs):
        t0 = time.perf_counter()
        parked = []
        if self.board is not None and self.running:
            keep = []
            for req in self.running:
                if req.num_tokens - req.num_computed_tokens != 1:      # prefill (or chunk): vLLM's call
                    keep.append(req)
                    continue
                spec = self.board.spec_for(req.request_id, req.all_token_ids, self.num_spec_tokens)
                if spec is PARK:
                    parked.append(req)
                    continue
                if spec is not None:
                    req.spec_token_ids = spec
                keep.append(req)
            keep.sort(key=lambda r: self.board.sort_key(r.request_id, r.arrival_time))
            self.running = keep
        try:
            out = super().schedule(*args, **kwargs)
        finally:
            self.running.extend(parked)
        self.last_scheduled_tokens = out.total_num_scheduled_tokens
        self.schedule_s += time.perf_counter() - t0
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        """vLLM's own update (new tokens appended, stop conditions checked), then the step's new tokens
        go to the backend at once, before the engine's output processing: the answers leave earlier."""
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.on_outputs is not None:
            self.on_outputs([(o.request_id, o.new_token_ids, o.finished) for eco in outputs.values()
                             for o in eco.outputs])
        return outputs


class BoardProposer:
    """vLLM's custom_class proposer interface: built with the VllmConfig, propose() every step."""

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        return [[] for _ in sampled_token_ids]
