"""Parse a request body (or a WebSocket text frame) into a JSON object, safely, for every server.

Every way a body can be bad ends in `BadBody` (an HTTP status and a one-line reason), never in an
exception a server would turn into a 500:
  - a Content-Type other than application/json                    -> 415
  - a charset other than UTF-8 (JSON is UTF-8: RFC 8259 section 8.1) -> 415
  - bytes that are not UTF-8                                         -> 400
  - malformed JSON, NaN/Infinity (not JSON), a top level that is not an object -> 400
  - nesting deeper than MAX_DEPTH (json.loads would hit RecursionError)          -> 400
  - an integer literal over Python's int-string limit (4300 digits: ValueError)  -> 400
"""
from __future__ import annotations

import json
import re
from typing import Optional

import numpy as np

JSON_TYPE = "application/json"
UTF8_NAMES = frozenset({"utf-8", "utf8"})
MAX_DEPTH = 64          # our messages nest 3 deep; well under Python's recursion limit on any stack
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)   # a JSON string literal (brackets inside do not nest)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class BadBody(ValueError):
    """A body that is not a usable JSON object: `status` (400/415) and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _reject_constant(name: str):
    raise BadBody(400, f"malformed JSON: {name} is not a JSON number")


def _depth_over(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than `limit` (vectorised, no recursion)."""
    if text.count("[") + text.count("{") <= limit:      # cheap exit for every ordinary message
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode()
    b = np.frombuffer(brackets, dtype=np.uint8)
    steps = (b == ord("[")).astype(np.int32) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def check_content_type(content_type: Optional[str], charset: Optional[str]) -> None:
    """415 unless the type is application/json and the charset (if any) UTF-8."""
    if (content_type or "").lower() != JSON_TYPE:
        raise BadBody(415, f"expected Content-Type {JSON_TYPE}, got '{content_type or ''}'")
    if charset is not None and charset.lower() not in UTF8_NAMES:
        raise BadBody(415, f"unsupported charset '{charset}': send JSON as UTF-8")


def parse_json_object(raw: bytes | str, content_type: Optional[str] = JSON_TYPE,
                      charset: Optional[str] = None, max_depth: int = MAX_DEPTH) -> dict:
    """The JSON object in `raw`, or BadBody. For HTTP pass the request's content_type and charset
    (aiohttp: request.content_type, request.charset); for a WebSocket text frame pass the str itself
    (its type and UTF-8 were settled by the WebSocket protocol)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        check_content_type(content_type, charset)
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadBody(400, f"the body is not valid UTF-8 (byte {e.start})") from None
    else:
        text = raw
    if _depth_over(text, max_depth):
        raise BadBody(400, f"malformed JSON: nested deeper than {max_depth} levels")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BadBody(400, f"malformed JSON: {e}") from None
    except RecursionError:                    # not reached after the depth check; kept as a backstop
        raise BadBody(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:                   # int literals over sys.get_int_max_str_digits()
        raise BadBody(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadBody(400, "the body must be a JSON object")
    return data
