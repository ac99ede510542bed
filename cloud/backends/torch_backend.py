"""Target on torch/transformers: the GGUF dequantized (fp32 on CPU is the exact reference; also runs
on CUDA). The first load dequantizes with transformers' GGUF reader and saves a safetensors copy in
the cache, so later loads take seconds. Each session keeps its own DynamicCache, cropped on rollback.
Exact mode (cloud.exact): the same forward-pass shapes as the target alone, so greedy is bit for bit."""
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
                 max_sessions: int = 64, cache: str | None = None, exact: bool = False):
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
        self.exact = exact       # exact mode: the prompt in one forward pass, every later token alone
        self.sessions: OrderedDict[str, tuple[list[int], object, int]] = OrderedDict()   # tokens, KV, prompt length

    def logits(self, session_id: str, tokens: list[int], n_logits: int, reuse: bool,
               prompt_len: int | None = None) -> tuple[np.ndarray, int]:
        from transformers import DynamicCache
        cached, cache, n_prompt = self.sessions.pop(session_id, ([], None, 0))
        keep = 0
        if reuse and cache is not None:
            keep = max(min(common_prefix(cached, tokens), len(tokens) - n_logits), 0)
            extra = cache.get_seq_length() - keep
            if extra > 0:
                cache.crop(-extra)     # drop the rejected/stale tail
        if keep == 0:
            cache = DynamicCache(config=self.model.config)
            n_prompt = prompt_len if prompt_len is not None else len(tokens) - n_logits + 1
        # fp32 matmuls also depend on shapes (a k+1-row product rounds differently from k+1 one-row
        # products), so exact mode runs the same forward passes as the target alone: the prompt at
        # once, then one token per pass. The default mode evaluates all new tokens in one pass.
        passes = [tokens[keep:]]
        if self.exact:
            batched = min(max(n_prompt - keep, 0), len(tokens) - keep)
            passes = ([tokens[keep:keep + batched]] if batched else []) + [[t] for t in tokens[keep + batched:]]
        rows = []
        with self.torch.inference_mode():
            for ids in passes:
                out = self.model(input_ids=self.torch.tensor([ids], device=self.device), past_key_values=cache,
                                 use_cache=True, logits_to_keep=min(n_logits, len(ids)))
                cache = out.past_key_values
                rows.append(out.logits[0].float().cpu().numpy())
        self.sessions[session_id] = (list(tokens), cache, n_prompt)
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return np.concatenate(rows)[-n_logits:], keep

    def drop(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
