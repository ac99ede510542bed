"""Engine arguments shared by both vLLM designs and the GPU benchmark (one place for them)."""
from __future__ import annotations

from common.config import VllmConfig

PROPOSER = "cloud.backends.vllm_plugins.BoardProposer"
SCHEDULER = "cloud.backends.vllm_plugins.EdgeDraftScheduler"


def engine_kwargs(model_dir: str, cfg: VllmConfig, n_ctx: int, spec_tokens: int = 0, **extra) -> dict:
    """kwargs for vLLM's (Async)EngineArgs; spec_tokens > 0 adds our scheduler and proposer."""
    kw = dict(model=model_dir, dtype="bfloat16", skip_tokenizer_init=True, enable_prefix_caching=True,
              scheduling_policy="priority", max_model_len=n_ctx, tensor_parallel_size=cfg.tensor_parallel_size,
              data_parallel_size=cfg.data_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
              max_num_seqs=cfg.max_num_seqs, load_format=cfg.load_format, seed=0)
    if cfg.attention_backend:
        kw["attention_backend"] = cfg.attention_backend
    if cfg.execution == "eager":
        kw["enforce_eager"] = True
    elif cfg.execution == "graphs":            # CUDA graphs for decode steps without torch.compile
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
        if spec_tokens:                         # capture uniform spec steps (1 + k per request) of every session
            kw["compilation_config"]["max_cudagraph_capture_size"] = cfg.max_num_seqs * (1 + spec_tokens)
            kw["max_num_batched_tokens"] = max(2048, cfg.max_num_seqs * (1 + spec_tokens))
    if spec_tokens:
        kw["speculative_config"] = {"method": "custom_class", "model": PROPOSER,
                                    "num_speculative_tokens": spec_tokens}
        kw["scheduler_cls"] = SCHEDULER
    kw.update(extra)
    return kw
