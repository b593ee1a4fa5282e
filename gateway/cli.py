"""`oneseek gateway [--host 127.0.0.1 --port 3001]`: serve the gateway until SIGTERM or SIGINT.

Refuses (exit 2) to listen on a non-loopback address without ONESEEK_ADMIN_TOKEN. On a signal:
stops accepting, closes every websocket with 1001, cancels and awaits every task, closes the
gRPC channels, exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from gateway.app import AccessLog, create_app
from gateway.settings import GatewaySettings
from services.api.runtime import configure_logging

log = logging.getLogger("oneseek.gateway")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SHUTDOWN_GRACE = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen host (default $ONESEEK_GATEWAY_HOST or 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, help="listen port (default $ONESEEK_GATEWAY_PORT or 3001)"
    )
    parser.add_argument("--training-addr", help="training service (default $ONESEEK_TRAINING_ADDR)")
    parser.add_argument("--metrics-addr", help="metrics service (default $ONESEEK_METRICS_ADDR)")


async def serve(settings: GatewaySettings, ready: Callable[[int], None] | None = None) -> None:
    """Runs the gateway until SIGTERM or SIGINT. `ready` gets the bound port."""
    runner = web.AppRunner(
        create_app(settings), access_log_class=AccessLog, shutdown_timeout=SHUTDOWN_GRACE
    )
    await runner.setup()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=SHUTDOWN_GRACE)
        await site.start()
        port = settings.port
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            port = sockets[0].getsockname()[1]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        log.info("gateway listening on http://%s:%d/", settings.host, port)
        if ready is not None:
            ready(port)
        await stopping.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
        log.info("gateway stopped")


def run(args: argparse.Namespace) -> int:
    configure_logging("gateway")
    try:
        settings = GatewaySettings.from_env(
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            training=getattr(args, "training_addr", None),
            metrics=getattr(args, "metrics_addr", None),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = settings.startup_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        asyncio.run(serve(settings))
    except OSError as error:
        print(
            f"error: the gateway cannot listen on {settings.host}:{settings.port}: {error}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oneseek gateway", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
