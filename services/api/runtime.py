"""What both gRPC servers and every client share: options, auth, TLS, health, reflection,
addresses, and the error answer that names its field.

Keepalive and message sizes are set deliberately: streams are long-lived (a run lasts hours),
so both ends ping an idle connection and a dead peer is noticed within about a minute; events
are small, so 16 MiB is generous for a full metrics history and refuses absurd messages. Every
channel retries a lost connection at least once a second (gRPC's own backoff grows to two
minutes), so a service that comes back is reached again within a second.

TLS is optional: a server given a certificate and key (`--tls-cert/--tls-key` or
ONESEEK_TLS_CERT/ONESEEK_TLS_KEY) listens with TLS only; a client given a CA bundle
(`--tls-ca` or ONESEEK_TLS_CA) connects with TLS and trusts that bundle only. Without them
everything is plaintext, which is safe only on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import inspect
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from services.core.errors import InvalidInput, OneSeekError

DEFAULT_TRAINING_ADDR = "127.0.0.1:50051"
DEFAULT_METRICS_ADDR = "127.0.0.1:50052"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_KEEPALIVE,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
]
RECONNECT_BACKOFF_MS = 1000
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *_KEEPALIVE,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
]


def training_addr() -> str:
    return os.environ.get("ONESEEK_TRAINING_ADDR") or DEFAULT_TRAINING_ADDR


def metrics_addr() -> str:
    return os.environ.get("ONESEEK_METRICS_ADDR") or DEFAULT_METRICS_ADDR


def admin_token() -> str | None:
    return os.environ.get("ONESEEK_ADMIN_TOKEN") or None


def report_token() -> str | None:
    return os.environ.get("ONESEEK_REPORT_TOKEN") or None


# ---- TLS ------------------------------------------------------------------------------------

TLS_CERT_ENV = "ONESEEK_TLS_CERT"
TLS_KEY_ENV = "ONESEEK_TLS_KEY"
TLS_CA_ENV = "ONESEEK_TLS_CA"


def _read_pem(path: str, what: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InvalidInput(
            f"{flag}: cannot read the {what} {path!r} ({error.strerror or error}); give the "
            "path of a PEM file this process can read.",
            field=flag,
        ) from None
    if b"-----BEGIN" not in data:
        raise InvalidInput(
            f"{flag}: {path!r} is not a PEM file (no '-----BEGIN' line); give the {what} "
            "in PEM format.",
            field=flag,
        )
    return data


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and private key, both PEM."""

    certificate_chain: bytes
    private_key: bytes

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])


def server_tls(cert: str | None = None, key: str | None = None) -> ServerTls | None:
    """The server's TLS material from the flags, else ONESEEK_TLS_CERT / ONESEEK_TLS_KEY; None
    when neither is set. One without the other is refused rather than silently serving
    plaintext."""
    cert = cert or os.environ.get(TLS_CERT_ENV) or None
    key = key or os.environ.get(TLS_KEY_ENV) or None
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "--tls-cert (ONESEEK_TLS_CERT)" if cert is None else "--tls-key (ONESEEK_TLS_KEY)"
        raise InvalidInput(
            f"TLS needs both a certificate and its private key: {missing} is missing.",
            field="--tls-cert" if cert is None else "--tls-key",
        )
    return ServerTls(
        certificate_chain=_read_pem(cert, "certificate", "--tls-cert"),
        private_key=_read_pem(key, "private key", "--tls-key"),
    )


def client_tls_ca(path: str | None = None) -> bytes | None:
    """The CA bundle a client trusts, from the flag, else ONESEEK_TLS_CA; None: plaintext."""
    path = path or os.environ.get(TLS_CA_ENV) or None
    return None if path is None else _read_pem(path, "CA certificate", "--tls-ca")


def channel_credentials(root_certificates: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def client_channel(
    addr: str,
    root_certificates: bytes | None = None,
    options: list[tuple[str, Any]] | None = None,
    interceptors: Sequence[Any] | None = None,
) -> aio.Channel:
    """An asyncio channel to `addr`: TLS trusting `root_certificates` when given."""
    opts = CHANNEL_OPTIONS if options is None else options
    if root_certificates is None:
        return aio.insecure_channel(addr, options=opts, interceptors=interceptors)
    credentials = channel_credentials(root_certificates)
    return aio.secure_channel(addr, credentials, options=opts, interceptors=interceptors)


def blocking_channel(addr: str, root_certificates: bytes | None = None) -> grpc.Channel:
    """A blocking channel (health checks from `oneseek up` and scripts), TLS as above."""
    if root_certificates is None:
        return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(
        addr, channel_credentials(root_certificates), options=CHANNEL_OPTIONS
    )


def add_listening_port(server: aio.Server, addr: str, tls: ServerTls | None) -> int:
    """Binds `addr` with TLS when `tls` is given; the bound port (0 when binding failed)."""
    if tls is None:
        return server.add_insecure_port(addr)
    return server.add_secure_port(addr, tls.credentials())


# ---- errors ---------------------------------------------------------------------------------

FIELD_METADATA_KEY = "oneseek-field"
"""Trailing metadata naming the request field an error is about (the gateway reads it)."""


def _metadata_safe(value: str) -> bool:
    return len(value) <= 256 and all(" " <= char <= "~" for char in value)


async def abort(
    context: aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    field: str | None = None,
) -> NoReturn:
    """Ends the call with `code` and `message`, naming `field` in trailing metadata.

    A field name can come from the caller (an unknown key): metadata values must be printable
    ASCII, so any other name stays in the message only."""
    trailing = ((FIELD_METADATA_KEY, field),) if field and _metadata_safe(field) else ()
    await context.abort(code, message, trailing_metadata=trailing)
    raise AssertionError("unreachable: abort raises")


def status_code(error: OneSeekError) -> grpc.StatusCode:
    """The gRPC status the error carries (`OneSeekError.grpc_status`)."""
    return grpc.StatusCode[error.grpc_status]


async def abort_with(context: aio.ServicerContext[Any, Any], error: OneSeekError) -> NoReturn:
    """Ends the call with the error's own status, message and field."""
    await abort(context, status_code(error), error.message, error.field)


Context = aio.ServicerContext[Any, Any]
Method = TypeVar("Method", bound=Callable[..., Any])


def rpc(method: Method) -> Method:
    """A servicer method, unary or server-streaming, whose OneSeekError (even mid-stream) ends
    the call with the error's own status, message and field."""
    if inspect.isasyncgenfunction(method):

        async def stream(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except OneSeekError as error:
                await abort_with(context, error)

        return cast(Method, functools.wraps(method)(stream))

    async def unary(self: Any, request: Any, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except OneSeekError as error:
            await abort_with(context, error)

    return cast(Method, functools.wraps(method)(unary))


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`, or none."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _digest(text: str) -> bytes:
    # surrogatepass: a header aiohttp decoded with surrogate escapes must not raise here
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def token_matches(header: str | None, tokens: Iterable[str | None]) -> bool:
    """Constant-time comparison of a `Bearer <token>` header against every allowed token.

    Both sides are hashed first, so neither the time taken nor an early length mismatch says
    anything about a token's length or content; every allowed token is always compared."""
    if not header or not header.startswith("Bearer "):
        return False
    offered = _digest(header[len("Bearer ") :])
    matched = False
    for token in tokens:
        if token:
            matched |= hmac.compare_digest(offered, _digest(token))
    return matched


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


class TokenAuthInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Mutating RPCs need `authorization: Bearer <token>` when a token is configured.

    `protected` maps a full method name (`/pkg.Service/Method`) to a callable returning the
    tokens that may call it (read at call time, so tests and operators can rotate them).
    A method whose tokens are all unset is open: the loopback-only default of `oneseek up`.
    """

    def __init__(self, protected: dict[str, Callable[[], list[str | None]]]) -> None:
        self._protected = protected

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        allowed = self._protected.get(details.method)
        if allowed is None:
            return await continuation(details)
        tokens = [t for t in allowed() if t]
        if not tokens:
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization")
        if token_matches(header if isinstance(header, str) else None, tokens):
            return await continuation(details)
        message = (
            "Missing bearer token: send metadata 'authorization: Bearer <token>'."
            if header is None
            else "The bearer token is not valid for this call."
        )

        async def deny(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny)


async def add_health_and_reflection(
    server: aio.Server, service_names: list[str]
) -> health_aio.HealthServicer:
    """Registers the standard health service (every name SERVING) and server reflection. On
    shutdown call the servicer's `enter_graceful_shutdown()`: every name turns NOT_SERVING."""
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)
    return servicer


@contextlib.asynccontextmanager
async def stop_signals() -> AsyncIterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs: a process's shutdown goes
    inside the block, so a second signal during it is absorbed instead of killing it."""
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class _KeyValueFormatter(logging.Formatter):
    """`time level logger message run_id=...`: greppable, with the run id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        run_id = getattr(record, "run_id", None)
        return f"{line} run_id={run_id}" if run_id else line


def configure_logging(service: str, level: str | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        _KeyValueFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("ONESEEK_LOG_LEVEL") or "INFO")
