"""`GET /ws/training?runId=…[&since=SEQ]`: one websocket client of a run's feed.

A client that keeps up gets each frame (framed once by the feed, the same bytes for everyone)
written straight to its socket, with no task switch: that is what makes thousands of clients
cheap. A client whose socket is backed up gets a bounded backlog instead, drained by its own
sender task with flow control; when the backlog overflows the client is closed with 1013 (it
reconnects with `since`) and nobody else ever waits for it.

Close codes: 1008 no or invalid runId, bad since, unknown run (the last two after one
`{"type": "error"}` message); 1013 too slow, or the metrics service is unavailable (try again
later); 1001 gateway shutdown. An address that already holds `ws_max_per_ip` websockets is
refused before the upgrade: 429 with the JSON error envelope and Retry-After, which costs the
gateway no websocket at all (a close code would need the upgrade first).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from gateway.errors import ApiError
from gateway.feeds import FeedError, RunFeeds, error_message
from gateway.frames import payload_of
from gateway.settings import GatewaySettings
from services.core.errors import InvalidInput
from services.core.training_config import validate_run_id

log = logging.getLogger("oneseek.gateway.websocket")

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
GOING_AWAY = 1001
MAX_INCOMING_BYTES = 4096  # clients only listen; anything large is not one of ours
DIRECT_WRITE_LIMIT = 64 * 1024
"""Below this many unsent bytes a client counts as keeping up (asyncio's default high-water
mark): frames go straight to its socket."""


_CLOSE_CODES = {"not_found": POLICY_VIOLATION, "going_away": GOING_AWAY}
RETRY_AFTER_SECONDS = 5


class OpenSockets:
    """How many websockets each client address holds open, against the per-address limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_address: dict[str, int] = {}
        self._refusing: set[str] = set()  # warned about once, until it is under the limit again

    def take(self, address: str) -> bool:
        """Counts one more socket of `address`; False (nothing counted) when it is at the limit."""
        held = self.by_address.get(address, 0)
        if self.limit and held >= self.limit:
            if address not in self._refusing:
                self._refusing.add(address)
                log.warning("websocket refused: %d open from %s (the limit)", held, address)
            return False
        self.by_address[address] = held + 1
        return True

    def give_back(self, address: str) -> None:
        held = self.by_address.get(address, 0) - 1
        if held > 0:
            self.by_address[address] = held
        else:
            self.by_address.pop(address, None)
        if held < self.limit:
            self._refusing.discard(address)

    def refusal(self) -> web.Response:
        problem = ApiError(
            429,
            f"This address already has {self.limit} websockets open, the most one address may "
            "hold: close one, or reconnect in a moment.",
        )
        return web.Response(
            body=json.dumps(problem.envelope()).encode(),
            status=429,
            content_type="application/json",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


class SocketClient:
    """A websocket as a feed subscriber: the owner of its sender and closer tasks."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, settings: GatewaySettings):
        self.ws = ws
        self.request = request
        self.settings = settings
        self.ended: tuple[int, str] | None = None
        self._transport = request.transport
        self._sending = False  # the sender task is writing: new frames must queue behind it
        self._backlog: collections.deque[bytes] = collections.deque()
        self._replayed = 0  # replay frames still queued: they do not count against the limit
        self._skip_through = -1
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    # ---- what the feed calls (never waits) --------------------------------------------------

    def offer(self, frame: bytes, seq: int | None, *, replay: bool = False) -> None:
        if self.ended is not None or (seq is not None and seq <= self._skip_through):
            return
        transport = self._transport
        if (
            not self._backlog
            and not self._sending
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() < DIRECT_WRITE_LIMIT
        ):
            transport.write(frame)
            return
        if replay:
            self._replayed += 1
        elif len(self._backlog) - self._replayed >= self.settings.client_queue_size:
            log.warning(
                "websocket client too slow, closing 1013 peer=%s seq=%s queued=%d",
                self.request.remote,
                seq,
                len(self._backlog),
            )
            self.end(
                TRY_AGAIN_LATER,
                f"Too slow: {self.settings.client_queue_size} messages waiting. "
                "Reconnect with since=<last seq received>.",
            )
            return
        self._backlog.append(frame)
        self._wake.set()

    def skip_through(self, seq: int) -> None:
        self._skip_through = seq

    def end(self, code: int, reason: str) -> None:
        if self.ended is not None:
            return
        self.ended = (code, reason)
        self._backlog.clear()
        self._closer = asyncio.create_task(self._close(code, reason))

    # ---- the connection -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Sends until the client leaves or is ended; returns when both tasks are done."""
        self._sender = asyncio.create_task(self._send())
        try:
            async for _message in self.ws:
                pass  # clients only listen; reading answers pings and their close
        finally:
            # the client left, the handler is cancelled, or the closer is already at work
            self.ended = self.ended or (1000, "")
            self._sender.cancel()
            await asyncio.wait([t for t in (self._sender, self._closer) if t is not None])

    async def _send(self) -> None:
        ws = self.ws
        try:
            while True:
                while self._backlog:
                    frame = self._backlog.popleft()
                    if self._replayed:
                        self._replayed -= 1
                    self._sending = True
                    try:
                        # waits while the client's socket is backed up (writer_limit=0)
                        await ws.send_frame(payload_of(frame), WSMsgType.TEXT)
                    finally:
                        self._sending = False
                self._wake.clear()
                await self._wake.wait()
        except ConnectionError:
            return  # the client went away mid-send; the handler sees it too

    async def _close(self, code: int, reason: str) -> None:
        if self._sender is not None:
            # it may be stuck waiting for a stalled client's socket: only the close matters now
            self._sender.cancel()
            await asyncio.wait([self._sender])
        await close_socket(self.ws, self.request, code, reason, self.settings.close_timeout)


async def close_socket(
    ws: web.WebSocketResponse, request: web.Request, code: int, reason: str, timeout: float
) -> None:
    """Sends the close frame and waits (at most `timeout`) for the client's; a client that
    never reads has its socket dropped then, so it pins no memory."""
    transport = request.transport
    # a client that never answers the close is simply dropped below
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(
            ws.close(code=code, message=_close_reason(reason), drain=False), timeout
        )
    if transport is not None and transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(timeout, transport.abort)


def _close_reason(reason: str) -> bytes:
    """At most 123 bytes of UTF-8, cut on a character boundary (RFC 6455 section 5.5)."""
    return reason.encode()[:123].decode(errors="ignore").encode()


def _since(request: web.Request) -> int | None:
    raw = request.query.get("since")
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise InvalidInput(
            f"since must be the seq of the last event received (a whole number of 0 or more), "
            f"got {raw!r}.",
            field="since",
        )
    return int(raw)


def _cap_send_buffer(request: web.Request, size: int) -> None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and size > 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError as error:  # a socket type without the option: keep the default
            log.debug("SO_SNDBUF not set: %s", error)


def training_feed(settings: GatewaySettings, feeds: RunFeeds) -> Handler:
    """The handler of the websocket feed; its route and access check are in gateway.routes."""
    sockets = OpenSockets(settings.ws_max_per_ip)

    async def handler(request: web.Request) -> web.StreamResponse:
        address = request.remote or ""
        if not sockets.take(address):
            return sockets.refusal()
        try:
            return await serve(request)
        finally:
            sockets.give_back(address)

    async def serve(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            compress=False,  # one encoded frame for every client; deflate is per connection
            writer_limit=0,  # the backlog's sends wait for a backed-up socket, every time
            max_msg_size=MAX_INCOMING_BYTES,
            timeout=settings.close_timeout,
        )
        await ws.prepare(request)
        _cap_send_buffer(request, settings.client_send_buffer)
        run_id = request.query.get("runId") or ""
        if not run_id:
            await close_socket(
                ws, request, POLICY_VIOLATION, "runId is required", settings.close_timeout
            )
            return ws
        try:
            validate_run_id(run_id)
            since = _since(request)
        except InvalidInput as error:
            await _refuse(ws, request, run_id, "bad_request", error.message, POLICY_VIOLATION)
            return ws
        client = SocketClient(ws, request, settings)
        try:
            feed = await feeds.attach(run_id, client, since)
        except FeedError as error:
            code = _CLOSE_CODES.get(error.code, TRY_AGAIN_LATER)
            await _refuse(ws, request, run_id, error.code, str(error), code)
            return ws
        try:
            await client.serve()
        finally:
            feed.detach(client)
        return ws

    async def _refuse(
        ws: web.WebSocketResponse,
        request: web.Request,
        run_id: str,
        code: str,
        message: str,
        close_code: int,
    ) -> None:
        try:
            await ws.send_frame(error_message(run_id[:200], code, message), WSMsgType.TEXT)
        except ConnectionError:
            return
        await close_socket(ws, request, close_code, message, settings.close_timeout)

    return handler
