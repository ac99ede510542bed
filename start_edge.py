"""Start a Tandem edge node: the draft model plus an HTTP API that streams answers.

  python start_edge.py --cloud-url http://CLOUD:8080      # drafts here, verifies there
  curl -N localhost:8081/v1/generate -H 'Content-Type: application/json' -d '{"prompt": "hi"}'
"""
from __future__ import annotations

import argparse
import sys

from aiohttp import web

from common.cli import run_async, wait_forever
from common.config import ConfigError, add_config_args, config_from_args


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Tandem edge node (draft model + HTTP API).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cloud-url", default=None, help="the cloud node, e.g. http://127.0.0.1:8080 (required "
                    "unless switches.draft_verify is off)")
    ap.add_argument("--host", default=None, help="bind address (default: edge.host)")
    ap.add_argument("--port", type=int, default=None, help="port (default: edge.port)")
    ap.add_argument("--max-k", type=int, default=None, help="longest draft (default: draft.max_k)")
    ap.add_argument("--strategy", default=None, help="confidence strategy (default: confidence.strategy)")
    ap.add_argument("--threshold", type=float, default=None, help="confidence threshold (default: confidence.threshold)")
    ap.add_argument("--auth-token", default=None, help="bearer token for the cloud")
    add_config_args(ap)
    return ap.parse_args(argv)


async def serve(args) -> None:
    from edge.node import EdgeNode
    from edge.server import make_app
    cfg = config_from_args(args, {"edge.cloud_url": args.cloud_url, "edge.host": args.host, "edge.port": args.port,
                                  "draft.max_k": args.max_k, "confidence.strategy": args.strategy,
                                  "confidence.threshold": args.threshold, "edge.auth_token": args.auth_token})
    if cfg.edge.cloud_url is None and cfg.switches.draft_verify:
        raise ConfigError("--cloud-url is required (or --set switches.draft_verify=false for edge-only)")
    async with EdgeNode(cfg, cfg.edge.cloud_url) as node:
        if node.client:
            await node.client.health()
        runner = web.AppRunner(make_app(node), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, cfg.edge.host, cfg.edge.port).start()
        print(f"tandem edge serving on http://{cfg.edge.host}:{cfg.edge.port} (cloud: {cfg.edge.cloud_url})",
              file=sys.stderr, flush=True)
        try:
            await wait_forever()
        finally:
            await runner.cleanup()


def main(argv=None) -> int:
    return run_async(lambda: serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
