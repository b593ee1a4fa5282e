"""The error envelope: the gRPC status table, JSON bodies in and out, and the middleware that
turns anything a handler raises into the envelope (never HTML, never a 500 for bad input)."""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st

from gateway.bodies import encode, parse_object
from gateway.errors import (
    ERROR_CODES,
    FIELD_METADATA_KEY,
    STATUS_OF_GRPC,
    ApiError,
    error_middleware,
    from_rpc,
)
from services.core.errors import InvalidInput, NotFound


def rpc_error(code: grpc.StatusCode, details: str, trailing: Any = ()) -> aio.AioRpcError:
    return aio.AioRpcError(
        code, aio.Metadata(), aio.Metadata(*trailing), details=details, debug_error_string=""
    )


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "bad_request"),
        (grpc.StatusCode.NOT_FOUND, 404, "not_found"),
        (grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict"),
        (grpc.StatusCode.ALREADY_EXISTS, 409, "conflict"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "unauthorized"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "forbidden"),
        (grpc.StatusCode.UNIMPLEMENTED, 501, "not_implemented"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 503, "service_unavailable"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "too_many_requests"),
        (grpc.StatusCode.INTERNAL, 502, "service_error"),
        (grpc.StatusCode.UNKNOWN, 502, "service_error"),
    ],
)
def test_grpc_status_table(code: grpc.StatusCode, status: int, error: str) -> None:
    problem = from_rpc(rpc_error(code, "Something precise."), "training service", "h:1")
    assert (problem.status, problem.code) == (status, error)
    if status == 503:
        assert "training service" in problem.message and "h:1" in problem.message
        assert "unavailable" in problem.message
    elif status not in (401, 502):
        assert problem.message == "Something precise."


def test_every_mapped_status_has_a_code() -> None:
    assert set(STATUS_OF_GRPC.values()) <= set(ERROR_CODES)


def test_the_field_comes_from_trailing_metadata() -> None:
    named = rpc_error(grpc.StatusCode.NOT_FOUND, "gone", [(FIELD_METADATA_KEY, "datasetId")])
    assert from_rpc(named, "s", "a").field == "datasetId"
    assert from_rpc(rpc_error(grpc.StatusCode.NOT_FOUND, "gone"), "s", "a").field is None


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    )
)
def test_encode_is_always_valid_json(value: Any) -> None:
    decoded = json.loads(encode(value))  # strict: NaN and Infinity would be refused here

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) and not math.isfinite(a):
            return b is None
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return bool(a == b or (a != a and b is None))

    assert same(value, decoded)


@pytest.mark.parametrize(
    "raw",
    [b"", b"  ", b"[1]", b'"x"', b"null", b"{", b'{"a":1,"a":2}', b'{"a":NaN}', b"\xff"],
)
def test_parse_object_refuses_with_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        parse_object(raw)
    assert refused.value.status == 400 and refused.value.field in ("body", "a")


async def test_middleware_turns_everything_into_the_envelope() -> None:
    async def domain(request: web.Request) -> web.StreamResponse:
        raise NotFound("No such model 'x'.", field="baseModels")

    async def invalid(request: web.Request) -> web.StreamResponse:
        raise InvalidInput("epochs must be from 1 to 100.", field="epochs")

    async def bug(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("secret internals")

    async def body(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({})

    app = web.Application(client_max_size=100, middlewares=[error_middleware(100)])
    app.add_routes(
        [
            web.get("/domain", domain),
            web.get("/invalid", invalid),
            web.get("/bug", bug),
            web.post("/body", body),
        ]
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        cases = [
            ("get", "/domain", 404, "not_found", "baseModels"),
            ("get", "/invalid", 400, "bad_request", "epochs"),
            ("get", "/bug", 500, "internal_error", None),
            ("get", "/missing", 404, "not_found", None),
            ("post", "/domain", 405, "method_not_allowed", None),
        ]
        for method, path, status, code, field in cases:
            response = await client.request(method, path)
            assert response.status == status
            data = await response.json()
            assert data["error"] == code and data["field"] == field
            assert "secret" not in data["message"]
        big = await client.post("/body", data=b"x" * 1000)
        assert big.status == 413 and (await big.json())["error"] == "payload_too_large"
    finally:
        await client.close()
