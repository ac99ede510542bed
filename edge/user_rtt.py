"""The user's round-trip time to the edge, for one HTTP request: the `X-Client-RTT` header (ms) where the
client sends one (seed 000's convention), else the kernel's smoothed RTT of the request's TCP socket
(Linux TCP_INFO, tcpi_rtt), else None.

A stop-gap for the network-aware prompt (edge/network_context.py); the RTT measurement of the
edge-user link (issue 15, item 1) may replace it: its callers need only user_rtt_ms(request).
"""
from __future__ import annotations

import math
import socket
import struct
from typing import Optional

HEADER = "X-Client-RTT"
_TCPI_RTT_OFFSET = 68            # struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_rtt (µs) is the 16th


class BadClientRtt(ValueError):
    """The header is there but is not a number of milliseconds."""


def header_rtt_ms(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        ms = float(value.strip().removesuffix("ms").strip())
    except ValueError:
        raise BadClientRtt(f"{HEADER} must be the client's round-trip time in milliseconds, not {value!r}") from None
    if not math.isfinite(ms) or ms < 0:
        raise BadClientRtt(f"{HEADER} must be a finite number of milliseconds >= 0, not {value!r}")
    return ms


def socket_rtt_ms(sock) -> Optional[float]:
    """The kernel's smoothed RTT of a TCP socket in ms (None where TCP_INFO is not available)."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, ValueError):
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    return struct.unpack_from("I", info, _TCPI_RTT_OFFSET)[0] / 1e3


def user_rtt_ms(request) -> Optional[float]:
    """The RTT of an aiohttp request's client in ms, or None (BadClientRtt for a malformed header)."""
    ms = header_rtt_ms(request.headers.get(HEADER))
    if ms is not None:
        return ms
    transport = request.transport
    return socket_rtt_ms(transport.get_extra_info("socket") if transport is not None else None)
