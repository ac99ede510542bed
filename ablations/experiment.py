"""An experiment file (ablations/experiments/*.yaml): one question, its workload, the links, and a
matrix of configuration rows. Validated as common/config.py validates the config (pydantic,
extra=forbid): a bad key or value is one line naming it.

  name: rtt_sweep
  question: At my users' RTTs, what does a user see?        # one line
  workload: {datasets: [humaneval, mtbench], split: heldout, num_prompts: 6, max_tokens: 48, max_concurrency: 1}
  links: ["rtt=5", "rtt=20", "rtt=500,jitter=10"]          # ablations/linkemu.py LinkProfile strings
  base: {cloud.n_ctx: 2048}                                 # config overrides of every row
  matrix:                                                   # row label -> config overrides
    edge_cloud: {}
    cloud_only: {switches.cloud_only: true}
    edge_only: {switches.draft_verify: false}
  repeats: 1
  plots: [{kind: vs_rtt, metrics: [per_user_tok_s, ttft_ms_p50]}]
  device:                                                   # GPU runs only (absent on CPU runs)
    stage: /tmp/stage                                       # staged GGUFs (ablations/device.py)
    cpus: {edges: ["0-1", "2-3"], link: "4", clients: "5", cloud: "6-15"}

Cells are rows x links x repeats. A row whose configuration needs no cloud (edge-only, or the target
alone on the edge: local_target) sends nothing over a link, so it runs once per repeat and stands for
every link. The cloud is kept across cells whose cloud-side configuration (cloud_side) is the same.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.config import ConfigError, TandemConfig, load_config, parse_override, set_dotted

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"
LABEL = r"^[a-z][a-z0-9_]*$"
# what a report can show per (row, link, dataset); ablations/runner.py computes them
METRICS = ("per_user_tok_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50",
           "e2el_ms_p50", "output_throughput", "tau", "acceptance", "rounds_per_100_tokens",
           "compute_ms_per_token", "draft_ms_per_round", "verify_ms_p50", "bound_round_ms", "bound_tok_s",
           "bound_tpot_ms", "completed", "failed",
           # the link (switches.rtt_batching): WebSocket frames and bytes as the cloud counted them, its front end's CPU
           "frames_per_round", "frames_per_round_up", "frames_per_token", "bytes_per_token", "cpu_us_per_round",
           "hold_ms_p50", "hold_ms_p50_up", "added_ms_p50",
           # drafting (runner.speedup_rows): per-user tok/s over the fixed-k=4 row's, same link and dataset
           "speedup_vs_fixed")


class ExperimentError(ValueError):
    """A bad experiment file or --set; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Workload(_Strict):
    """What the clients send (ablations/bench.py): prompts of each dataset, one benchmark per dataset."""
    datasets: list[Literal["humaneval", "mtbench"]] = Field(min_length=1)
    split: Literal["all", "tune", "heldout"] = "heldout"     # measurements use held-out prompts
    num_prompts: int = Field(ge=1)                            # per dataset
    max_tokens: int = Field(ge=1, le=8192)
    request_rate: float = Field(math.inf, gt=0)               # requests/s (Poisson; inf: all at once)
    burstiness: float = Field(1.0, gt=0)                      # gamma shape of the arrivals (1: Poisson)
    max_concurrency: Optional[int] = Field(1, ge=1)           # requests in flight at most (1: one user at a time)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = Field(0, ge=0)
    goodput: list[str] = []                                   # SLOs as vLLM's --goodput: "ttft:2000", "tpot:100"
    warmup: bool = True                                       # one short unmeasured request per cell first

    @field_validator("goodput")
    @classmethod
    def _slos(cls, v):
        from ablations.bench import parse_goodput
        parse_goodput(v)            # ValueError: "goodput 'x' is not KEY:MS (keys ttft, tpot, e2el)"
        return v


class Plot(_Strict):
    kind: Literal["bars", "vs_rtt"]      # bars: one bar per row; vs_rtt: metric against link RTT, a line per row
    metrics: list[str] = Field(default_factory=lambda: ["per_user_tok_s", "ttft_ms_p50", "tpot_ms_p50", "tau"],
                               min_length=1)
    bound: bool = False                  # vs_rtt: draw the per-round bound beside tok/s and TPOT

    @field_validator("metrics")
    @classmethod
    def _known(cls, v):
        bad = [m for m in v if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; known: {', '.join(METRICS)}")
        return v


def parse_cpus(spec: str) -> frozenset[int]:
    """'0-5,8' -> {0, 1, 2, 3, 4, 5, 8} (a CPU set as `taskset -c` writes it)."""
    out: set[int] = set()
    for part in str(spec).split(","):
        a, dash, b = part.strip().partition("-")
        if not a.isdigit() or (dash and not b.isdigit()) or (dash and int(b) < int(a)):
            raise ValueError(f"'{spec}' is not a CPU set like '0-1' or '0,2,4-7'")
        out.update(range(int(a), int(b or a) + 1))
    return frozenset(out)


class Cpus(_Strict):
    """Where each process runs (Linux CPU affinity, inherited by its threads and children)."""
    edges: list[str] = Field(min_length=1)   # one CPU set per lane: a cell's edge runs alone on its lane's set,
                                             # and the lanes' cells run at once against the one shared cloud
    cloud: Optional[str] = None              # the cloud node: its engine and HTTP front-end processes
    link: Optional[str] = None               # the link emulators
    clients: Optional[str] = None            # the runner and its benchmark clients

    @field_validator("edges")
    @classmethod
    def _edges(cls, v):
        sets = [parse_cpus(s) for s in v]
        for i, a in enumerate(sets):
            for j in range(i):
                if a & sets[j]:
                    raise ValueError(f"lanes {j} ('{v[j]}') and {i} ('{v[i]}') share CPU(s) {sorted(a & sets[j])}")
        return v

    @field_validator("cloud", "link", "clients")
    @classmethod
    def _set(cls, v):
        if v is not None:
            parse_cpus(v)
        return v

    @model_validator(mode="after")
    def _edges_alone(self):
        """An edge's CPUs are its own: nothing else is placed on them."""
        edges = frozenset().union(*(parse_cpus(s) for s in self.edges))
        for name in ("cloud", "link", "clients"):
            spec = getattr(self, name)
            if spec is not None and parse_cpus(spec) & edges:
                raise ValueError(f"{name} ('{spec}') shares CPU(s) {sorted(parse_cpus(spec) & edges)} with the edges")
        return self

    def sets(self) -> dict[str, Optional[frozenset[int]]]:
        return {"cloud": self.cloud and parse_cpus(self.cloud), "link": self.link and parse_cpus(self.link),
                "clients": self.clients and parse_cpus(self.clients)}

    def check(self, available: set[int]) -> None:
        """Every named CPU exists here (ExperimentError naming the missing ones)."""
        named = set().union(*(parse_cpus(s) for s in self.edges),
                            *(parse_cpus(s) for s in (self.cloud, self.link, self.clients) if s is not None))
        if named - available:
            raise ExperimentError(f"device.cpus names CPU(s) {sorted(named - available)} this machine does not "
                                  f"give the runner (it has {min(available)}-{max(available)}); "
                                  "run with --set device=null on another machine")


class Device(_Strict):
    """What only the device (GPU) runs need; CPU runs leave the block out."""
    stage: Optional[str] = None          # staged GGUFs: <stage>/qwen/model.gguf (target), <stage>/tandem/<draft>.gguf
    cpus: Optional[Cpus] = None


class Experiment(_Strict):
    name: str = Field(pattern=LABEL)
    question: str = Field(min_length=1)
    notes: str = ""                      # shown in the report under the table
    workload: Workload
    links: list[str] = Field(min_length=1)
    base: dict[str, Any] = {}            # config overrides of every row (dotted keys)
    matrix: dict[str, dict[str, Any]] = Field(min_length=1)
    repeats: int = Field(1, ge=1)
    table: list[str] = Field(default_factory=lambda: ["per_user_tok_s", "ttft_ms_p50", "tpot_ms_p50", "tau",
                                                      "acceptance"])
    plots: list[Plot] = []
    device: Optional[Device] = None      # GPU runs: staged models, CPU placement, parallel lanes

    @field_validator("question")
    @classmethod
    def _one_line(cls, v):
        if "\n" in v.strip():
            raise ValueError("must be one line")
        return v.strip()

    @field_validator("matrix")
    @classmethod
    def _labels(cls, v):
        import re
        bad = [k for k in v if not re.match(LABEL, k)]
        if bad:
            raise ValueError(f"row labels must match {LABEL}: {bad}")
        return v

    @field_validator("table")
    @classmethod
    def _table(cls, v):
        return Plot._known(v)

    @field_validator("links")
    @classmethod
    def _links(cls, v):
        for s in v:
            link_rtt_ms(s)          # raises ValueError naming the bad profile
        return v

    @model_validator(mode="after")
    def _rows_are_configs(self):
        """Every row's configuration must load: a misspelt switch fails here, before any process starts."""
        try:
            load_config(overrides=self.base)
        except ConfigError as e:
            raise ValueError(f"base (every row, and --set): {e}") from None
        for label in self.matrix:
            try:
                row_config(self, label)
            except ConfigError as e:
                raise ValueError(f"matrix.{label}: {e}") from None
        return self


def link_rtt_ms(profile: str) -> float:
    from ablations.linkemu import LinkProfile
    try:
        return float(LinkProfile.parse(profile).rtt_ms)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"bad link profile '{profile}': {e}") from None


def row_overrides(exp: Experiment, label: str) -> dict[str, Any]:
    """The row's config overrides: the experiment's base, then the row's own."""
    return {**exp.base, **exp.matrix[label]}


def row_config(exp: Experiment, label: str) -> TandemConfig:
    return load_config(overrides=row_overrides(exp, label))


LOCAL_MODES = ("edge_only", "local_target")      # modes that run on the edge alone (no cloud, no link)


def row_mode(exp: Experiment, label: str) -> str:
    """edge_cloud | edge_only | cloud_only: what the row's configuration makes of the edge;
    local_target: edge-only with the target as the edge's model (what a user could run locally)."""
    from edge.generator import resolve_mode
    cfg = row_config(exp, label)
    mode = resolve_mode(cfg).value
    if mode == "edge_only" and cfg.models.draft == cfg.models.target:
        return "local_target"
    return mode


def _switch_readers() -> dict[str, str]:
    """switch -> the file that reads it, from common/config.py (each Switches field's comment names it)."""
    import inspect
    import re
    from common.config import Switches
    src = inspect.getsource(Switches)
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+): bool = \w+\s+#\s*([\w/]+\.py)", src, re.M)}


EDGE_SECTIONS = ("draft", "confidence", "sampling", "edge")   # config sections only the edge reads


def cloud_side(key: str) -> bool:
    """Might the cloud process read this config key? A key is edge-side only where that is known: the
    sections only the edge reads (EDGE_SECTIONS: nothing under cloud/ reads them), the draft's
    `models.draft*`, and a switch whose reader (its comment in common/config.py) is under edge/. Every
    other key counts as cloud-side: the `cloud` section, the target's models.target*, models.cache_dir,
    a switch read under cloud/ or common/ (a policy both sides share), a new section. The safe side:
    a cell that changes one gets a fresh cloud."""
    section, _, rest = key.partition(".")
    if section in EDGE_SECTIONS:
        return False
    if section == "models":
        return not rest.startswith("draft")
    if section == "switches":
        reader = _switch_readers().get(rest)
        return reader is None or not reader.startswith("edge/")
    return True


def _format(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    try:
        set_dotted(tree, dotted, value)
    except ConfigError as e:
        raise ExperimentError(f"--set {e}") from None


def load_experiment(path: str | Path, sets: list[str] = (), repeats: Optional[int] = None,
                    quick: bool = False) -> Experiment:
    """Read and validate an experiment file. `sets` ("key=value"): a key under one of the experiment's
    own fields (workload.num_prompts=2, links=[rtt=5], repeats=3) changes the experiment; any other key
    is a config override added to `base` (draft.max_k=6), so it applies to every row (a row's own
    overrides still win). quick: one prompt per dataset, 16 tokens, one repeat (a smoke run)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"experiment file {path} not found") from None
    except yaml.YAMLError as e:
        raise ExperimentError(f"experiment file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ExperimentError(f"experiment file {path}: top level must be a mapping")
    for item in sets:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            raise ExperimentError(f"--set {e}") from None
        if key.split(".")[0] in Experiment.model_fields:
            _set_dotted(tree, key, value)
        else:
            tree.setdefault("base", {})
            if not isinstance(tree["base"], dict):
                raise ExperimentError("base: must be a mapping")
            tree["base"][key] = value
    if repeats is not None:
        tree["repeats"] = repeats
    if quick and isinstance(tree.get("workload"), dict):
        tree["workload"].update(num_prompts=1, max_tokens=16)
        tree["repeats"] = 1
    try:
        return Experiment.model_validate(tree)
    except ValidationError as e:
        raise ExperimentError(f"{path}: {_format(e)}") from None


def experiment_files() -> list[Path]:
    return sorted(EXPERIMENTS.glob("*.yaml"))


@dataclass(frozen=True)
class Cell:
    """One run: a row's configuration over one link (None: the row needs no cloud), one repeat."""
    row: str
    mode: str
    overrides: tuple[tuple[str, Any], ...]
    link: Optional[str]
    repeat: int

    @property
    def needs_cloud(self) -> bool:
        return self.mode not in LOCAL_MODES

    @property
    def cloud_overrides(self) -> tuple[tuple[str, Any], ...]:
        """The overrides the cloud reads: cells with the same ones share one cloud process."""
        return tuple(sorted(((k, v) for k, v in self.overrides if cloud_side(k)), key=lambda kv: kv[0]))

    @property
    def rtt_ms(self) -> Optional[float]:
        return None if self.link is None else link_rtt_ms(self.link)

    @property
    def slug(self) -> str:
        link = "nolink" if self.link is None else self.link.replace("=", "").replace(",", "_")
        return f"{self.row}__{link}__r{self.repeat}"

    def set_args(self, overrides: Optional[tuple] = None) -> list[str]:
        """The overrides (default: all of the cell's) as command-line flags of start_cloud.py /
        start_edge.py (JSON is YAML)."""
        out = []
        for key, value in self.overrides if overrides is None else overrides:
            out += ["--set", f"{key}={json.dumps(value)}"]
        return out


def cells(exp: Experiment) -> list[Cell]:
    """Every run, in the order they run: repeat by repeat, link by link, the rows interleaved within a
    link, so a drift of a shared machine's load falls on every row alike rather than on whichever rows
    come last. A row without a cloud runs once per repeat (at the first link)."""
    rows = [(label, row_mode(exp, label), tuple(row_overrides(exp, label).items())) for label in exp.matrix]
    out = []
    for repeat in range(exp.repeats):
        for i, link in enumerate(exp.links):
            for label, mode, overrides in rows:
                if mode not in LOCAL_MODES:
                    out.append(Cell(label, mode, overrides, link, repeat))
                elif i == 0:
                    out.append(Cell(label, mode, overrides, None, repeat))
    return out
