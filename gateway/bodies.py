"""JSON in and out of the gateway: one compact encoder (a non-finite number becomes null, as
browsers cannot parse NaN) and a strict reader of request bodies (no NaN, no duplicate keys).
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from aiohttp import web

from gateway.errors import ApiError

JSON_TYPE = "application/json"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def encode(obj: Any) -> bytes:
    """Compact UTF-8 JSON. The common case takes one `json.dumps`; only a document that holds
    NaN or infinity is walked again to turn those into null."""
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False)
    return text.encode()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(obj), status=status, content_type=JSON_TYPE)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ApiError.bad_request(
                f"Field {key!r} appears twice in the request body; send each field once.",
                field=key,
            )
        result[key] = value
    return result


def parse_object(raw: bytes, what: str = "The request body") -> dict[str, Any]:
    """`raw` as a JSON object, or ApiError 400 saying what is wrong with it."""
    if not raw.strip():
        raise ApiError.bad_request(f"{what} is empty; send a JSON object.", field="body")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ApiError.bad_request(f"{what} is not UTF-8 text.", field="body") from None
    except json.JSONDecodeError as error:
        raise ApiError.bad_request(
            f"{what} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}.",
            field="body",
        ) from None
    except (ValueError, RecursionError) as error:  # NaN, or an integer with thousands of digits
        raise ApiError.bad_request(
            f"{what} is not acceptable JSON: {error}.", field="body"
        ) from None
    if not isinstance(data, dict):
        raise ApiError.bad_request(
            f"{what} must be a JSON object ({{...}}), got {type(data).__name__}.", field="body"
        )
    return data


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object; a body over the size limit is refused with 413
    (by aiohttp's `client_max_size`, turned into the error envelope by the middleware)."""
    return parse_object(await request.read())
