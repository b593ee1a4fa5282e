"""`oneseek gateway [--host 127.0.0.1 --port 3001]`: serve the gateway until SIGTERM or SIGINT.

Refuses (exit 2) to listen on a non-loopback address without ONESEEK_ADMIN_TOKEN. On a signal:
stops accepting, closes every websocket with 1001, cancels and awaits every task, closes the
gRPC channels, exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.app import AccessLog, create_app
from gateway.settings import GatewaySettings
from services.api.runtime import client_tls_ca, configure_logging, stop_signals

log = logging.getLogger("oneseek.gateway")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SHUTDOWN_GRACE = 10.0


_TOKEN_IN_TEXT = re.compile(r"token=[^&\s'\"]*")


def _malformed_http_in_one_line(record: logging.LogRecord) -> bool:
    """aiohttp logs a client's malformed HTTP (raw non-ASCII in the request line, oversized
    headers) at ERROR with a traceback, although it is the client's mistake and is answered
    400: one warning line says enough. The request line may carry a `?token=`: redacted."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
        detail = _TOKEN_IN_TEXT.sub("token=<redacted>", str(error.message).splitlines()[0])[:300]
        record.msg = f"{record.getMessage()}: answered {error.code}: {detail}"
        record.args = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
    return True


async def serve(
    settings: GatewaySettings,
    ready: Callable[[int], None] | None = None,
    tls_ca: bytes | None = None,
) -> None:
    """Runs the gateway until SIGTERM or SIGINT. `ready` gets the bound port; `tls_ca` is the
    CA bundle of the services' TLS certificates (None: plaintext gRPC)."""
    runner = web.AppRunner(
        create_app(settings, tls_ca=tls_ca),
        access_log_class=AccessLog,
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    await runner.setup()
    async with stop_signals() as stop:
        try:
            site = web.TCPSite(
                runner, settings.host, settings.port, shutdown_timeout=SHUTDOWN_GRACE
            )
            await site.start()
            sockets = getattr(getattr(site, "_server", None), "sockets", None) or []
            port = sockets[0].getsockname()[1] if sockets else settings.port
            log.info("gateway listening on http://%s:%d/", settings.host, port)
            if ready is not None:
                ready(port)
            await stop.wait()
            log.info("shutting down")
        finally:
            await runner.cleanup()
            log.info("gateway stopped")


def run(args: argparse.Namespace) -> int:
    configure_logging("gateway")
    logging.getLogger("aiohttp.server").addFilter(_malformed_http_in_one_line)
    try:
        settings = GatewaySettings.from_env(
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            training=getattr(args, "training_addr", None),
            metrics=getattr(args, "metrics_addr", None),
        )
        tls_ca = client_tls_ca(getattr(args, "tls_ca", None))
    except ValueError as error:  # InvalidInput is a ValueError too
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = settings.startup_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        asyncio.run(serve(settings, tls_ca=tls_ca))
    except OSError as error:
        print(
            f"error: the gateway cannot listen on {settings.host}:{settings.port}: {error}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK
