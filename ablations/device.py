"""What only the device (GPU) runs need: the staged models, found as `common.assets install` would
leave them. An experiment file's `device:` block (ablations/experiment.py Device) names the stage
folder; the runner calls stage_models() before any process starts, so every child (cloud, edge)
finds the GGUFs through TANDEM_CACHE.

The device has no network: the staging kit (shared/device/README.md) puts the files there, each
sha256-checked by its append.sh:
  <stage>/qwen/model.gguf                                  the target (qwen2.5-coder-1.5b-instruct q4_k_m)
  <stage>/tandem/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf   the draft
The vLLM backend dequantizes the target into <stage>/tandem/<target>-bfloat16/ the first time a cloud
starts with cloud.vllm.model_dir null (~30 s on the H200 host; cloud/backends/torch_backend.py
dequantized_dir) and reuses that folder for every later cloud of the same device session.
"""
from __future__ import annotations

import os
from pathlib import Path

TARGET_GGUF = "qwen/model.gguf"
CACHE = "tandem"


def stage_models(stage: str | Path) -> Path:
    """Point TANDEM_CACHE at <stage>/tandem, with the staged target linked in under its registry name,
    and stamp the GGUFs there as verified (the staging kit checked their sha256), so model_path()
    takes them without hashing 1 GB again. Returns the cache folder."""
    from common.assets import MODELS, _stamp, _stamp_text
    from common.config import ModelsConfig
    stage = Path(stage)
    cache = stage / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{ModelsConfig().target}.gguf"
    if not target.exists() and (stage / TARGET_GGUF).exists():
        target.symlink_to((stage / TARGET_GGUF).resolve())
    found = []
    for name, model in MODELS.items():
        p = cache / f"{name}.gguf"
        if p.exists():
            _stamp(p).write_text(_stamp_text(p, model))
            found.append(name)
    if not found:
        raise FileNotFoundError(f"no staged model under {stage}: expected {stage / TARGET_GGUF} and "
                                f"{cache}/<draft>.gguf (shared/device/README.md)")
    os.environ["TANDEM_CACHE"] = str(cache)
    return cache
