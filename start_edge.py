"""Start a Tandem edge node: the draft model plus an HTTP API (OpenAI-compatible) and a chat page.

  python start_edge.py --cloud-url http://CLOUD:8080      # drafts here, verifies there
  open http://127.0.0.1:8081/                              # the chat page
  curl -N localhost:8081/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'

The edge starts even when its cloud is not up yet: it answers per edge.fallback (edge-only by
default) and its link reconnects when the cloud appears. A URL that is not a Tandem cloud (an edge, a
typo, no http://) is refused at once, before the model loads.
"""
from __future__ import annotations

import argparse
import logging
import sys

from common.cli import HelpFormatter, run_async, wait_forever
from common.config import add_config_args, config_from_args

log = logging.getLogger("tandem.edge")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Tandem edge node (draft model + HTTP API).", formatter_class=HelpFormatter)
    ap.add_argument("--cloud-url", default=None, help="the cloud node, e.g. http://127.0.0.1:8080 (required "
                    "unless switches.draft_verify is off)")
    ap.add_argument("--host", default=None, help="bind address (default: edge.host)")
    ap.add_argument("--port", type=int, default=None, help="port, 0 = any free (default: edge.port)")
    ap.add_argument("--max-k", type=int, default=None, help="longest draft (default: draft.max_k)")
    ap.add_argument("--strategy", default=None, help="confidence strategy (default: confidence.strategy)")
    ap.add_argument("--threshold", type=float, default=None, help="confidence threshold (default: confidence.threshold)")
    ap.add_argument("--auth-token", default=None, help="bearer token for the cloud (default: edge.auth_token)")
    ap.add_argument("--api-key", dest="api_keys", action="append", default=None, metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on the edge's API, repeatable (default: edge.api_keys)")
    ap.add_argument("--insecure", action="store_true", default=None,
                    help="serve a non-loopback --host without an API key (default: edge.allow_insecure)")
    add_config_args(ap)
    return ap.parse_args(argv)


async def serve(args) -> None:
    from common.auth import check_exposure
    from common.cloud_identity import check_cloud_url, identify_cloud
    from common.config import ConfigError
    from common.errors import CloudUnavailable
    from common.http_limits import start_site
    cfg = config_from_args(args, {"edge.cloud_url": args.cloud_url, "edge.host": args.host, "edge.port": args.port,
                                  "draft.max_k": args.max_k, "confidence.strategy": args.strategy,
                                  "confidence.threshold": args.threshold, "edge.auth_token": args.auth_token,
                                  "edge.api_keys": args.api_keys, "edge.allow_insecure": args.insecure})
    edge = cfg.edge
    if edge.cloud_url is None and cfg.switches.draft_verify:
        raise ConfigError("--cloud-url is required (or --set switches.draft_verify=false for edge-only)")
    check_exposure(edge.host, edge.api_keys, edge.allow_insecure, "edge API", "--api-key", "--insecure")
    cloud_state = "edge-only"
    if edge.cloud_url is not None:
        check_cloud_url(edge.cloud_url)
        try:
            await identify_cloud(edge.cloud_url, edge.auth_token, edge.connect_timeout_s)
            cloud_state = "up"
        except CloudUnavailable as e:      # not fatal: serve per edge.fallback until the link sees it
            cloud_state = f"not reachable yet, serving per edge.fallback={edge.fallback} until it is ({e})"
    from edge.node import EdgeNode
    from edge.server import make_app
    async with EdgeNode(cfg, edge.cloud_url) as node:
        runner, url = await start_site(make_app(node), edge.host, edge.port, edge.limits)
        print(f"tandem edge serving on {url} (chat page: {url}/, OpenAI API: {url}/v1; "
              f"cloud {edge.cloud_url or '-'}: {cloud_state})", file=sys.stderr, flush=True)
        try:
            await wait_forever()
        finally:
            await runner.cleanup()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_async(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
