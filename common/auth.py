"""Bearer tokens and exposure checks, shared by the cloud and the edge servers.

    bearer_matches(request.headers.get("Authorization"), token_or_tokens)   # constant-time
    check_exposure(host, token, allow_insecure, "cloud", "--auth-token", "--insecure")
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Iterable, Optional

from common.config import ConfigError


def bearer_matches(header: Optional[str], tokens: str | Iterable[str]) -> bool:
    """Whether an Authorization header is "Bearer <t>" for one of `tokens`, compared in constant
    time (hmac.compare_digest) against every token, so timing says nothing about which or how much."""
    got = (header or "").encode("utf-8", "surrogateescape")
    ok = False
    for token in [tokens] if isinstance(tokens, str) else tokens:
        if token:                                 # an empty token never matches
            ok |= hmac.compare_digest(got, b"Bearer " + token.encode("utf-8"))
    return ok


def is_loopback(host: Optional[str]) -> bool:
    """Whether binding `host` serves this machine only. "" / None / "0.0.0.0" / "::" (every interface)
    and any name other than localhost count as exposed."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: Optional[str], token: Optional[str], allow_insecure: bool, what: str,
                   token_flag: str = "--auth-token", insecure_flag: str = "--insecure") -> None:
    """Refuse (ConfigError: a CLI message, exit 2) to serve a non-loopback address without a token,
    unless it is explicitly allowed."""
    if token or allow_insecure or is_loopback(host):
        return
    raise ConfigError(f"refusing to serve the {what} on {host or 'every interface'} without a token: anyone who "
                      f"can reach it could use it. Set {token_flag} (clients send 'Authorization: Bearer <token>'), "
                      f"bind 127.0.0.1, or pass {insecure_flag} to allow it anyway")
