"""Target on torch/transformers: the GGUF dequantized (fp32 on CPU is the exact reference; also runs
on CUDA). The first load dequantizes with transformers' GGUF reader and saves a safetensors copy in
the cache, so later loads take seconds. Each session keeps its own DynamicCache, cropped on rollback."""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from cloud.backends.base import Backend
from common.assets import cache_dir
from common.tokens import common_prefix


def dequantized_dir(gguf: Path, dtype: str, cache: str | None = None) -> Path:
    """An HF folder with the GGUF's weights dequantized to `dtype`, made once and cached."""
    import torch
    from transformers import AutoModelForCausalLM
    out = cache_dir(cache) / f"{gguf.stem}-{dtype}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    print(f"dequantizing {gguf.name} to {dtype} (once; cached in {out}) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype))
    if getattr(model, "hf_quantizer", None) is not None:   # plain weights now: save as an ordinary HF model
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.replace(out)
    return out


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, gguf: Path, n_ctx: int, device: str = "cpu", dtype: str = "float32",
                 max_sessions: int = 64, cache: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        folder = dequantized_dir(gguf, dtype, cache)
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.device = device
        self.n_vocab = self.model.config.vocab_size
        self.n_ctx = min(n_ctx, self.model.config.max_position_embeddings)
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, tuple[list[int], object]] = OrderedDict()

    def logits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool) -> tuple[np.ndarray, int]:
        from transformers import DynamicCache
        cached, cache = self.sessions.pop(session_id, ([], None))
        keep = 0
        if reuse and cache is not None:
            keep = max(min(common_prefix(cached, tokens), len(tokens) - n_logits), 0)
            extra = cache.get_seq_length() - keep
            if extra > 0:
                cache.crop(-extra)     # drop the rejected/stale tail
        if keep == 0:
            cache = DynamicCache(config=self.model.config)
        ids = self.torch.tensor([tokens[keep:]], device=self.device)
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=n_logits)
        self.sessions[session_id] = (list(tokens), out.past_key_values)
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return out.logits[0, -n_logits:].float().cpu().numpy(), keep

    def drop(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
