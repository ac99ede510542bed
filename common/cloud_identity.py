"""Is this URL a Tandem cloud? Checked once before anything loads, so that a typo, a missing http:// or
an edge's address gives one clear line instead of a JSON decode error later."""
from __future__ import annotations

import asyncio
from typing import Optional
from urllib.parse import urlsplit

import aiohttp

from common.config import ConfigError
from common.errors import CloudError, CloudUnavailable
from common.protocol import PROTOCOL_VERSION

IDENTITY_KEYS = ("protocol", "backend")     # what a Tandem cloud's /health carries and an edge's does not


def check_cloud_url(url: str) -> str:
    """The URL without a trailing slash; ConfigError unless it is http(s)://host[:port][/path]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"cloud URL '{url}' must look like http://HOST:PORT (e.g. http://127.0.0.1:8080)")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"cloud URL '{url}' has a bad port") from None
    return url.rstrip("/")


async def identify_cloud(url: str, auth_token: Optional[str] = None, timeout_s: float = 5.0) -> dict:
    """GET {url}/health; return it if it is a Tandem cloud's. CloudUnavailable when nothing answers,
    CloudError when it refuses (401), ConfigError when something else answers (an edge, a web server)."""
    url = check_cloud_url(url)
    headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            async with http.get(url + "/health", headers=headers) as r:
                status, ctype = r.status, r.content_type
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise CloudUnavailable(f"cloud at {url} unreachable: {type(e).__name__}: {e}") from None
    return check_cloud_health(url, status, body, auth_token, ctype)


def check_cloud_health(url: str, status: int, body, auth_token: Optional[str] = None, ctype: str = "") -> dict:
    """A /health answer checked to be a Tandem cloud's, speaking our protocol: CloudError(401) when
    the token is missing or wrong, ConfigError (a ValueError) when something else answered."""
    if status == 401:
        raise CloudError(401, {"error": f"{(body or {}).get('error', 'unauthorized') if isinstance(body, dict) else 'unauthorized'}"
                                        f"; set edge.auth_token to the cloud's token"})
    if isinstance(body, dict) and body.get("auth_required") and not auth_token:
        raise CloudError(401, {"error": "the cloud requires a bearer token; set edge.auth_token"})
    if status != 200 or not isinstance(body, dict) or not all(k in body for k in IDENTITY_KEYS):
        hint = " (it looks like a Tandem edge: give the cloud's URL, started by start_cloud.py)" \
            if isinstance(body, dict) and "draft_model" in body else ""
        raise ConfigError(f"{url} is not a Tandem cloud: its /health answered {status} {ctype} without "
                          f"{' and '.join(repr(k) for k in IDENTITY_KEYS)}{hint}")
    if body["protocol"] != PROTOCOL_VERSION:
        raise ConfigError(f"{url} speaks Tandem protocol {body['protocol']!r}, this edge {PROTOCOL_VERSION!r}: "
                          f"run the same Tandem version on both")
    return body
