"""Errors that cross layers: raised by the edge's cloud client, reported by every entry point
(common/cli.py) without the ground floor importing the edge."""
from __future__ import annotations


class CloudError(RuntimeError):
    """The cloud answered with an error (4xx/5xx)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"cloud answered {status}: {body.get('error', body)}")
        self.status, self.body = status, body


class CloudUnavailable(RuntimeError):
    """The cloud could not be reached (after retries)."""
