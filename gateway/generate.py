"""Using what a run trained, over HTTP: a generation streamed as Server-Sent Events and an
export streamed as a tar download, each one gRPC stream of the training service relayed as it
comes. Every refusal (bad input, unknown run or model, a run still training, too many
generations) is answered with the error envelope before the first byte of the stream."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web
from grpc import aio

from gateway.bodies import encode
from gateway.errors import ApiError, from_rpc
from gateway.upstream import Service
from services.api import training_pb2
from services.api.codec import message_to_dict
from services.api.runtime import bearer

SSE_TYPE = "text/event-stream"
TAR_TYPE = "application/x-tar"


class ClientSlots:
    """How many generations each client address has open; one more than `limit` is refused
    with 429, so one client cannot take every slot of the training service."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        if self.limit and self._open[client] >= self.limit:
            raise ApiError(
                429,
                f"This client has {self._open[client]} generations open already (the limit is "
                f"{self.limit}); wait for one to end or stop it.",
            )
        self._open[client] += 1
        try:
            yield
        finally:
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]


def generate_event_dict(event: training_pb2.GenerateEvent) -> tuple[str, dict[str, Any]]:
    """An event's SSE name (started, token, done) and its data: the payload's fields and the
    model's name."""
    kind = event.WhichOneof("payload") or "token"
    return kind, {"model": event.model, **message_to_dict(getattr(event, kind))}


def sse(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + encode(data) + b"\n\n"


async def _first(call: Any, service: Service) -> Any:
    """The stream's first message, or its refusal as ApiError; None when it ended empty."""
    try:
        async for message in call:
            return message
    except aio.AioRpcError as error:
        raise from_rpc(error, service.name, service.addr) from None
    return None


async def _rest(call: Any, service: Service) -> AsyncIterator[Any]:
    try:
        async for message in call:
            yield message
    except aio.AioRpcError as error:
        raise from_rpc(error, service.name, service.addr) from None


async def relay_generation(
    request: web.Request,
    service: Service,
    method: Any,
    message: training_pb2.GenerateRequest,
    token: str | None,
) -> web.StreamResponse:
    """The Generate stream as SSE: `started`, `token`..., `done` per model, `end` last (or
    `error`, then `end`, when it fails after it began). A client that goes away cancels the
    call, and the service the generation."""
    call = method(message, metadata=bearer(token))
    try:
        first = await _first(call, service)
        response = web.StreamResponse(
            headers={
                "Content-Type": SSE_TYPE,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold the pieces back
            }
        )
        await response.prepare(request)
        if first is not None:
            await response.write(sse(*generate_event_dict(first)))
            try:
                async for event in _rest(call, service):
                    await response.write(sse(*generate_event_dict(event)))
            except ApiError as error:
                await response.write(sse("error", error.envelope()))
        await response.write(sse("end", {}))
        await response.write_eof()
        return response
    finally:
        call.cancel()  # a no-op once the stream ended; ends the generation of a client gone


async def relay_export(
    request: web.Request,
    service: Service,
    method: Any,
    message: training_pb2.ExportModelRequest,
    token: str | None,
) -> web.StreamResponse:
    """The ExportModel stream as a tar download named by its first chunk."""
    call = method(message, metadata=bearer(token))
    try:
        first = await _first(call, service)
        if first is None:
            raise ApiError(502, "The training service sent an empty export.")
        response = web.StreamResponse(
            headers={
                "Content-Type": TAR_TYPE,
                "Content-Disposition": f'attachment; filename="{first.filename}"',
            }
        )
        await response.prepare(request)
        await response.write(first.data)
        try:
            async for chunk in _rest(call, service):
                await response.write(chunk.data)
        except ApiError:
            # the headers are out: cut the download short, so the client sees a broken archive
            # rather than a complete-looking one
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
    finally:
        call.cancel()
