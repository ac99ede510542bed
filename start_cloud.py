"""Start a Tandem cloud node: the target model behind POST /v1/verify (see common/protocol.py).

  python start_cloud.py                              # llama.cpp target on this CPU, 127.0.0.1:8080
  python start_cloud.py --backend torch              # transformers fp32 reference (CPU or --set cloud.torch_device=cuda)
  python start_cloud.py --backend vllm --host 0.0.0.0 --auth-token "$TOKEN"   # vLLM on a GPU (see README)

A host other than loopback needs --auth-token (or cloud.auth_token): without one, anyone who can reach
the port could use the target. --insecure (cloud.allow_insecure) serves it open anyway.
"""
from __future__ import annotations

import argparse
import logging
import sys

from common.auth import check_exposure, is_loopback
from common.cli import HelpFormatter, run_async, wait_forever
from common.config import add_config_args, config_from_args


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Tandem cloud node (target verifier).",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--host", default=None, help="bind address (default: cloud.host)")
    ap.add_argument("--port", type=int, default=None, help="port, 0 = any free (default: cloud.port)")
    ap.add_argument("--backend", choices=["llama_cpp", "torch", "vllm"], default=None,
                    help="target backend (default: cloud.backend)")
    ap.add_argument("--n-ctx", type=int, default=None, help="target context window (default: cloud.n_ctx)")
    ap.add_argument("--max-draft", type=int, default=None, help="longest accepted draft (default: cloud.max_draft)")
    ap.add_argument("--auth-token", default=None, help="require 'Authorization: Bearer TOKEN' on /v1/*, /stats, /metrics")
    ap.add_argument("--exact", action="store_true", default=None,
                    help="greedy output bit for bit the target alone's (cloud.exact; costs speed)")
    ap.add_argument("--insecure", action="store_true", default=None,
                    help="allow a non-loopback --host without a token (cloud.allow_insecure)")
    add_config_args(ap)
    return ap.parse_args(argv)


async def serve(args) -> None:
    from cloud.node import CloudNode
    cfg = config_from_args(args, {"cloud.host": args.host, "cloud.port": args.port, "cloud.backend": args.backend,
                                  "cloud.n_ctx": args.n_ctx, "cloud.max_draft": args.max_draft,
                                  "cloud.auth_token": args.auth_token, "cloud.allow_insecure": args.insecure,
                                  "cloud.exact": args.exact})
    check_exposure(cfg.cloud.host, cfg.cloud.auth_token, cfg.cloud.allow_insecure, "cloud")
    if not is_loopback(cfg.cloud.host) and not cfg.cloud.auth_token:
        print(f"warning: serving the cloud on {cfg.cloud.host or 'every interface'} with no token (--insecure): "
              "anyone who can reach it can use it", file=sys.stderr, flush=True)
    node = await CloudNode.start(cfg)
    print(f"tandem cloud ({cfg.cloud.backend}) serving on {node.url}", file=sys.stderr, flush=True)
    try:
        await wait_forever()
    finally:
        await node.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_async(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
