"""Tandem's settings: one YAML file (config/default.yaml), validated, overridable from the CLI.

Every section is a pydantic model with `extra="forbid"`, so an unknown key or a bad value fails with
a message naming the key (`cloud.bakend: Extra inputs are not permitted`). CLI flags become dotted
overrides (`--set cloud.port=9000`, or the named flags of each entry point) applied before validation.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


class ConfigError(ValueError):
    """Bad configuration; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfidenceStrategy(str, Enum):
    MAX_PROB = "max_prob"
    ENTROPY = "entropy"
    TEMPERATURE = "temperature"
    TOP_K_AGG = "top_k_agg"
    ENSEMBLE = "ensemble"


class ModelsConfig(_Section):
    cache_dir: Optional[str] = None          # None: $TANDEM_CACHE or ~/.cache/tandem
    draft: str = "qwen2.5-coder-0.5b-instruct-q4_k_m"    # a registry name (common/assets.py) or a GGUF path
    target: str = "qwen2.5-coder-1.5b-instruct-q4_k_m"
    draft_sha256: Optional[str] = Field(None, pattern="^[0-9a-fA-F]{64}$")   # checked only where given
    target_sha256: Optional[str] = Field(None, pattern="^[0-9a-fA-F]{64}$")


class DraftConfig(_Section):
    min_k: int = Field(1, ge=1, le=32)
    max_k: int = Field(12, ge=1, le=32)      # with switches.adaptive_draft the ceiling of the chosen k, else k itself
    top_n: int = Field(32, ge=1, le=1024)    # support of the sampled draft distribution q (sent to the cloud)
    n_ctx: int = Field(4096, ge=256)
    n_threads: int = Field(0, ge=0)          # 0: all cores
    ngram_max_n: int = Field(3, ge=1, le=16)  # switches.ngram_draft: longest suffix looked up in the context
    ngram_min_n: int = Field(2, ge=1, le=16)  # ... and the shortest that still counts as a match

    @model_validator(mode="after")
    def _bounds(self):
        if self.ngram_min_n > self.ngram_max_n:
            raise ValueError(f"ngram_min_n ({self.ngram_min_n}) > ngram_max_n ({self.ngram_max_n})")
        if self.min_k > self.max_k:
            raise ValueError(f"min_k ({self.min_k}) > max_k ({self.max_k})")
        return self


class ConfidenceConfig(_Section):
    strategy: ConfidenceStrategy = ConfidenceStrategy.MAX_PROB
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0)  # for TEMPERATURE: max-prob of softmax(logits / temperature)
    top_k: int = Field(5, ge=1, le=1000)     # for TOP_K_AGG: probability mass of the k best tokens
    weights: dict[ConfidenceStrategy, float] = Field(default_factory=lambda: {
        ConfidenceStrategy.MAX_PROB: 0.4, ConfidenceStrategy.ENTROPY: 0.3,
        ConfidenceStrategy.TEMPERATURE: 0.15, ConfidenceStrategy.TOP_K_AGG: 0.15})

    @model_validator(mode="after")
    def _weights(self):
        if ConfidenceStrategy.ENSEMBLE in self.weights:
            raise ValueError("weights: 'ensemble' cannot weight itself")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("weights: must be >= 0 with a positive sum")
        return self


class SamplingConfig(_Section):
    temperature: float = Field(0.0, ge=0.0, le=10.0)   # 0: greedy
    top_k: int = Field(0, ge=0)                         # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1, le=8192)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)


class VllmConfig(_Section):
    design: str = Field("in_engine", pattern="^(in_engine|request_per_round)$")
    model_dir: Optional[str] = None          # bf16 HF folder; None: dequantize the target GGUF into the cache
    load_format: str = "auto"                # "dummy": random weights (benchmarks of big shapes)
    execution: str = Field("graphs", pattern="^(eager|graphs|compiled)$")
    num_speculative_tokens: int = Field(4, ge=1, le=64)   # in_engine: draft slots per step (>= edge max_k)
    draft_timeout_s: float = Field(30.0, gt=0)            # in_engine: a session parked longer is aborted
    gather_ms: Optional[float] = Field(None, ge=0.0)      # in_engine: wait up to this for drafts due soon; None: one step
    switch_interval_ms: float = Field(0.5, gt=0.0)        # in_engine: Python's GIL switch interval (engine thread vs HTTP)
    engine_process: bool = True              # in_engine: engine in a child process, HTTP front end in this one
    frontends: int = Field(4, ge=1, le=64)   # in_engine + engine_process: HTTP front-end processes on one port
    busy_poll_ms: float = Field(10.0, ge=0.0)   # in_engine + engine_process: poll for this long after activity before sleeping
    pad_drafts: bool = True                  # in_engine: fill every draft to k slots: uniform steps replay a CUDA graph
    early_answers: bool = True               # in_engine: answer rounds inside the step, before vLLM's output processing
    attention_backend: Optional[str] = None  # vLLM's attention backend (e.g. TRITON_ATTN); None: vLLM picks
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    max_num_seqs: int = Field(256, ge=1)
    prompt_logprobs: int = Field(20, ge=1)   # top-K per draft position for sampled verification
    max_inflight: int = Field(256, ge=1)     # requests in vLLM at once; the rest wait in our priority queue


class ServerLimitsConfig(_Section):
    """Connection limits of one HTTP server (cloud.limits, edge.limits), applied by common/http_limits.py."""
    header_timeout_s: float = Field(10.0, gt=0)     # a request line + headers must arrive within this, else closed
    keepalive_timeout_s: float = Field(60.0, gt=0)  # an idle keep-alive connection is closed after this
    body_timeout_s: float = Field(30.0, gt=0)       # a request body must arrive within this, else 408
    max_connections: int = Field(1024, ge=1)        # more open connections at once get 503 and are closed


class CloudConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    backend: str = Field("llama_cpp", pattern="^(llama_cpp|torch|vllm)$")
    n_ctx: int = Field(4096, ge=256)
    n_threads: int = Field(0, ge=0)
    n_seq: int = Field(8, ge=1, le=64)       # llama_cpp backend: sessions whose KV stays resident (n_ctx tokens each)
    exact: bool = False                      # greedy output bit for bit the target alone's (see cloud/backends/base.py)
    max_draft: int = Field(16, ge=1, le=64)
    max_sessions: int = Field(64, ge=1)
    session_ttl_s: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(4 << 20, ge=1024)
    priority_aging_per_s: float = Field(1000.0, ge=0.0)  # priority units a waiting request gains per second
    auth_token: Optional[str] = None         # when set, requests need "Authorization: Bearer <token>"
    metrics_token: Optional[str] = None      # also opens /stats, /metrics and /health's details (not /v1/*)
    allow_insecure: bool = False             # start_cloud.py: serve a non-loopback host without auth_token
    max_sessions_per_client: Optional[int] = Field(None, ge=1)   # per client address; its own oldest go first
    limits: ServerLimitsConfig = ServerLimitsConfig()
    torch_device: str = "cpu"
    torch_dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")
    vllm: VllmConfig = VllmConfig()


class EdgeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    cloud_url: Optional[str] = None          # None: embed a CPU cloud in-process
    request_timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0, le=10)
    retry_backoff_s: float = Field(0.2, ge=0)
    rtt_probe_interval_s: float = Field(5.0, gt=0)
    probe_down_interval_s: float = Field(1.0, gt=0)       # /health probes while the cloud is down (edge/link.py)
    transport: str = Field("ws", pattern="^(ws|http)$")    # verify rounds: one WebSocket (HTTP POST as fallback) | POST only
    reconnect_max_backoff_s: float = Field(10.0, gt=0)    # cap of the WebSocket's reconnect backoff (doubling)
    ws_heartbeat_s: float = Field(10.0, gt=0)             # WebSocket ping interval; no pong within half of it: reconnect
    auth_token: Optional[str] = None
    limits: ServerLimitsConfig = ServerLimitsConfig()   # the edge API's connection limits (common/http_limits.py)
    api_keys: list[str] = Field(default_factory=list)   # edge API keys ("Authorization: Bearer <key>"); empty: open
    allow_insecure: bool = False             # start_edge.py: serve a non-loopback host without api_keys
    max_body_bytes: int = Field(1 << 20, ge=1024)       # larger request bodies get 413
    max_sessions: int = Field(8, ge=1, le=64)     # generations drafted at once (one draft-model sequence each)
    max_queue: int = Field(32, ge=0)              # more wait in a queue this long; past it: HTTP 429 + Retry-After
    fallback: str = Field("edge_only", pattern="^(edge_only|fail)$")   # cloud unreachable mid-answer


class CoalesceConfig(_Section):
    """switches.rtt_batching's thresholds, one policy for every hop (common/coalesce.py says the rule)."""
    min_rtt_ms: float = Field(100.0, ge=0.0)      # links below this RTT send every frame at once
    rtt_fraction: float = Field(0.5, ge=0.0, le=1.0)   # above it a frame waits at most this fraction of the RTT
    max_wait_ms: float = Field(250.0, ge=0.0)     # ... and never longer than this
    sse_min_rtt_ms: float = Field(300.0, ge=0.0)  # user stream: every chunk at once below this user RTT
    sse_chunks: int = Field(8, ge=1, le=1024)     # above it up to this many chunks in one SSE event
    sse_far_rtt_ms: float = Field(1000.0, ge=0.0)  # and above this user RTT
    sse_far_chunks: int = Field(20, ge=1, le=1024)  # up to this many


class Switches(_Section):
    """Ablation switches. Each is read in exactly one place (named beside it)."""
    confidence_gating: bool = True   # edge/drafter.py Drafter.__init__: off = always draft max_k
    draft_verify: bool = True        # edge/generator.py resolve_mode: off = edge-only
    cloud_only: bool = False         # edge/generator.py resolve_mode: target-only through the cloud
    kv_cache: bool = True            # edge/generator.py Generator.__init__: edge KV reuse + cloud prefix reuse
    health_priority: bool = True     # cloud/verifier.py Verifier.__init__: off = FIFO admission
    batched_drafting: bool = True    # edge/drafter.py Drafter.__init__: off = one session's draft at a time
    network_context_prompt: bool = False   # edge/node.py EdgeNode.__init__: on = the user's RTT in the chat prompt
                                     # (edge/network_context.py)
    rtt_batching: bool = True        # edge/node.py + edge/openai_api.py via common/coalesce.py from_config (the edge
                                     # asks the cloud to coalesce its link's answers, ?coalesce=1): off = every message
                                     # its own frame / SSE event
    batched_verify: bool = False     # cloud/verifier.py Verifier.__init__: on = a CPU cloud verifies the rounds waiting
                                     # together in one llama_decode (cloud/verify_batcher.py)
    adaptive_draft: bool = True      # edge/generator.py Generator.__init__: k per round from RTT, costs and acceptance
                                     # (edge/draft_length.py); off = always draft.max_k
    draft_ahead: bool = True         # edge/generator.py Generator.__init__: draft round r+1 while r is in flight, send it
    ngram_draft: bool = True         # edge/generator.py Generator.__init__: prompt-lookup drafts first (edge/ngram.py)
    parallel_prefill: bool = True    # edge/generator.py Generator.__init__: round 0 goes with no draft at once (both
                                     # sides prefill together), the edge drafts meanwhile


class TandemConfig(_Section):
    models: ModelsConfig = ModelsConfig()
    draft: DraftConfig = DraftConfig()
    confidence: ConfidenceConfig = ConfidenceConfig()
    sampling: SamplingConfig = SamplingConfig()
    cloud: CloudConfig = CloudConfig()
    edge: EdgeConfig = EdgeConfig()
    coalesce: CoalesceConfig = CoalesceConfig()
    switches: Switches = Switches()


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b' (ConfigError where a key on the way is not a section)."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{key}: {err['msg']}")
    return "bad configuration: " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TandemConfig:
    """Load YAML (default config/default.yaml), apply dotted overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    try:
        return TandemConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def add_config_args(ap) -> None:
    """Flags every entry point shares."""
    ap.add_argument("--config", default=None, help=f"YAML config (default {DEFAULT_CONFIG})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set draft.max_k=6 (repeatable)")


def config_from_args(args, named: dict[str, Any]) -> TandemConfig:
    """`named` maps dotted keys to the values of an entry point's own flags (None = not given)."""
    overrides = dict(named)
    for item in args.overrides:
        key, value = parse_override(item)
        overrides[key] = value
    return load_config(args.config, overrides)
