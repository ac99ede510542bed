"""GPU experiment for the vLLM backend (request-per-round baseline), end to end on the device.

  # here (CPU): tokenize the prompts once (the device has no llama.cpp tokenizer)
  python -m ablations.gpu_vllm prepare
  # on the device, after staging vLLM and the target GGUF (shared/device/README.md; the calls used are
  # listed in ablations/results/gpu_vllm.md):
  python -m ablations.gpu_vllm run --gguf /tmp/stage/qwen/model.gguf --out $OUT

What is real: vLLM 0.26 AsyncLLMEngine with the 1.5B target (GGUF dequantized to bf16 on the device),
our aiohttp cloud (cloud/server.py + Verifier + VllmBackend) on loopback, the wire protocol, and the
acceptance function. What is replayed: the drafts. No llama.cpp drafter runs on the device in this
script; each round's draft is the target's own greedy continuation (from vLLM alone) with every 4th
token replaced, i.e. oracle-style drafts. That tests that verification is lossless and measures the
cloud's per-round cost; it does not measure real acceptance rates.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS_FILE = Path(__file__).resolve().parent / "results" / "gpu_prompts.json"


def prepare() -> None:
    from common.assets import model_path
    from common.llama_runtime import LlamaRunner
    from common.prompts import chat, humaneval, mtbench
    runner = LlamaRunner(model_path("qwen2.5-coder-0.5b-instruct-q4_k_m"), 4096)
    rows = [{"id": p.id, "set": "humaneval", "ids": runner.tokenize(chat(p.text))} for p in humaneval()[:32]]
    rows += [{"id": p.id, "set": "mtbench", "ids": runner.tokenize(chat(p.text))} for p in mtbench()[:32]]
    PROMPTS_FILE.write_text(json.dumps(rows))
    print(f"wrote {len(rows)} prompts to {PROMPTS_FILE}")


def draft_from(ref: list[int], pos: int, k: int, vocab: int) -> list[int]:
    """Oracle-style draft: the target's own next k tokens, every 4th (by position) replaced."""
    out = []
    for j in range(pos, min(pos + k, len(ref))):
        out.append(ref[j] if (j + 1) % 4 else (ref[j] + 1) % vocab)
    return out


async def run(args) -> dict:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    import aiohttp
    from vllm import SamplingParams as VSP
    from cloud.backends.torch_backend import dequantized_dir
    from cloud.backends.vllm_backend import VllmBackend
    from cloud.server import start_cloud
    from cloud.verifier import Verifier
    from common.config import load_config
    from common.protocol import VerifyRequest

    t0 = time.time()
    model_dir = dequantized_dir(Path(args.gguf), "bfloat16", args.cache)
    result = {"dequantize_s": round(time.time() - t0, 1)}
    cfg = load_config(overrides={"cloud.backend": "vllm", "cloud.vllm.model_dir": str(model_dir),
                                 "cloud.max_sessions": 4096, "cloud.n_ctx": 4096,
                                 "cloud.vllm.enforce_eager": args.eager})
    log = lambda msg: print(f"[gpu_vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    log(f"dequantized in {result['dequantize_s']} s")
    t0 = time.time()
    backend = VllmBackend(Path(args.gguf), cfg.cloud.vllm, cfg.cloud.n_ctx)
    result["engine_up_s"] = round(time.time() - t0, 1)
    log(f"engine up in {result['engine_up_s']} s")
    verifier = Verifier(backend, cfg.cloud, cfg.switches)
    runner, url = await start_cloud(verifier, cfg, "127.0.0.1", 0)
    prompts = json.loads(PROMPTS_FILE.read_text())[:args.prompts]
    n_new, k = args.max_tokens, 4

    async def plain(p, rid):
        out = None
        async for o in backend.engine.generate({"prompt_token_ids": p["ids"]},
                                               VSP(max_tokens=n_new, temperature=0.0, ignore_eos=True, detokenize=False),
                                               request_id=rid):
            out = o
        return list(out.outputs[0].token_ids)

    # 1. the target alone (vLLM), all prompts concurrently: reference outputs + plain throughput
    t0 = time.perf_counter()
    refs = await asyncio.gather(*[plain(p, f"ref{i}") for i, p in enumerate(prompts)])
    plain_s = time.perf_counter() - t0
    result["plain"] = {"sessions": len(prompts), "tokens": sum(map(len, refs)),
                       "tokens_per_s": round(sum(map(len, refs)) / plain_s, 1)}
    log(f"plain: {result['plain']}")

    # 2. the same prompts through our cloud over HTTP, one session each, oracle-style drafts
    round_ms = []

    async def spec(http, i, p, ref):
        out, seq, cloud_len, ctx = [], 0, 0, list(p["ids"])
        while len(out) < n_new:
            d = draft_from(ref, len(out), k, backend.n_vocab) or [0]
            req = VerifyRequest(session_id=f"s{i}", seq=seq, base_len=cloud_len, append=ctx[cloud_len:], draft=d)
            t = time.perf_counter()
            async with http.post(url + "/v1/verify", data=req.model_dump_json(),
                                 headers={"Content-Type": "application/json"}) as r:
                body = await r.json()
            round_ms.append((time.perf_counter() - t) * 1e3)
            if r.status != 200:
                raise RuntimeError(f"verify failed: {r.status} {body}")
            new = d[:body["accepted"]] + [body["next_token"]]
            out += new
            ctx += new
            cloud_len, seq = body["committed_len"], seq + 1
        return out[:n_new], seq

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[spec(http, i, p, r) for i, (p, r) in enumerate(zip(prompts, refs))])
        spec_s = time.perf_counter() - t0
    identical = [o == r for (o, _), r in zip(outs, refs)]
    rounds = sum(s for _, s in outs)
    result["lossless_prompts"] = len(prompts)
    result["lossless_identical"] = int(sum(identical))
    result["lossless_by_set"] = {s: f"{sum(i for i, p in zip(identical, prompts) if p['set'] == s)}/"
                                    f"{sum(p['set'] == s for p in prompts)}" for s in ("humaneval", "mtbench")}
    result["first_divergence"] = [next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), None)
                                  for (o, _), r in zip(outs, refs)]
    result["request_per_round"] = {"sessions": len(prompts), "rounds": rounds,
                                   "tokens_per_s": round(len(prompts) * n_new / spec_s, 1),
                                   "rounds_per_s": round(rounds / spec_s, 1),
                                   "round_ms_p50": round(float(np.median(round_ms)), 2)}
    result["capacity_ratio_request_per_round"] = round(result["request_per_round"]["tokens_per_s"]
                                                       / result["plain"]["tokens_per_s"], 3)

    log(f"request per round: {result['request_per_round']}, identical {result['lossless_identical']}/{len(prompts)}")
    # 3. verify latency for k=4 at a 1k-token context, with and without prefix-cache reuse
    ctx = (prompts[0]["ids"] * 20)[:1000]
    for reuse in (True, False):
        cfg_k = []
        for rnd in range(12):
            toks = ctx + refs[0][:rnd * 5]
            t = time.perf_counter()
            await backend.alogits(f"lat{reuse}", toks + refs[0][rnd * 5:rnd * 5 + 4], 5, reuse, 0)
            cfg_k.append((time.perf_counter() - t) * 1e3)
        result[f"verify_ms_p50_{'reuse' if reuse else 'no_reuse'}"] = round(float(np.median(cfg_k[2:])), 2)

    # 4. a fixture for the CPU test of the logprob conversion, recorded from this engine
    final = None
    toks = prompts[1]["ids"] + refs[1][:6]
    async for o in backend.engine.generate({"prompt_token_ids": toks, "cache_salt": "fixture"},
                                           VSP(max_tokens=1, temperature=0.0, logprobs=5, prompt_logprobs=5,
                                                detokenize=False), request_id="fixture"):
        final = o
    fixture = {"prompt": toks, "n_logits": 5,
               "prompt_logprobs": [None if e is None else {str(t): lp.logprob for t, lp in e.items()}
                                   for e in final.prompt_logprobs[-4:]],
               "sample_logprobs": {str(t): lp.logprob for t, lp in final.outputs[0].logprobs[0].items()},
               "generated": final.outputs[0].token_ids[0]}
    (Path(args.out) / "vllm_fixture.json").write_text(json.dumps(fixture))

    import torch
    import vllm
    result["device"] = torch.cuda.get_device_name(0)
    result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
    result["drafts"] = "replayed oracle-style (target's own greedy output, every 4th token replaced); no real edges"
    result["max_tokens"] = n_new
    result["stats"] = verifier.stats.snapshot()
    await runner.cleanup()
    backend.close()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "run"])
    ap.add_argument("--gguf", default="/tmp/stage/qwen/model.gguf")
    ap.add_argument("--cache", default="/tmp/tandem-cache")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=None, help="use the first N prompts")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs): faster start")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare()
        return 0
    result = asyncio.run(run(args))
    result["command"] = "python -m ablations.gpu_vllm " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out, "gpu_vllm.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("stats", "first_divergence")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
