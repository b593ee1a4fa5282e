"""The event-latency baseline: a chain of three bare processes re-streaming an event, as thin as
grpc.aio and aiohttp allow: source (gRPC server stream) -> relay (gRPC client and server
stream) -> websocket server (gRPC client, aiohttp websocket) -> the bench's websocket client.

    python bench/bare_chain.py source --port P --out stamps.json   # reads `emit`/`done` lines
    python bench/bare_chain.py relay --port P --upstream 127.0.0.1:S
    python bench/bare_chain.py ws --port P --upstream 127.0.0.1:R

Messages are raw bytes (no protobuf): `{"type": "epoch_end", "seq": n, ...}`, about 600 bytes,
stamped by the source when it creates them; `done` sends a training_complete and ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

METHOD = "/bench.Chain/Stream"


def _identity(data: bytes) -> bytes:
    return data


class Hub:
    """The subscribers of one process's stream: one queue each."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes]] = set()

    def publish(self, message: bytes) -> None:
        for queue in self.queues:
            queue.put_nowait(message)

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queues.add(queue)
        try:
            yield b'{"type": "hello"}'
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)


async def serve_grpc(hub: Hub, port: int) -> aio.Server:
    server = aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Chain",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(
                hub.stream, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def follow(upstream: str, deliver: Any) -> None:
    async with aio.insecure_channel(upstream) as channel:
        call = channel.unary_stream(
            METHOD, request_serializer=_identity, response_deserializer=_identity
        )(b"")
        try:
            async for message in call:
                await deliver(message)
        except aio.AioRpcError:
            return  # the source ended the chain


async def source(port: int, out: str) -> None:
    hub = Hub()
    server = await serve_grpc(hub, port)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    created: dict[int, float] = {}
    seq = 0
    pad = "x" * 540
    while line := (await reader.readline()).decode().split():
        if line[0] == "done":
            break
        for _ in range(int(line[1])):
            seq += 1
            created[seq] = time.monotonic()
            hub.publish(json.dumps({"type": "epoch_end", "seq": seq, "pad": pad}).encode())
    hub.publish(b'{"type": "training_complete", "seq": 0}')
    await asyncio.to_thread(Path(out).write_text, json.dumps(created))
    await asyncio.sleep(0.5)
    await server.stop(None)


async def relay(port: int, upstream: str) -> None:
    hub = Hub()
    server = await serve_grpc(hub, port)
    print("ready", flush=True)

    async def deliver(message: bytes) -> None:
        hub.publish(message)

    await follow(upstream, deliver)
    await server.stop(None)


async def websocket(port: int, upstream: str) -> None:
    from aiohttp import web

    clients: set[web.WebSocketResponse] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('{"type": "hello"}')
        clients.add(ws)
        try:
            async for _message in ws:
                pass
        finally:
            clients.discard(ws)
        return ws

    async def deliver(message: bytes) -> None:
        text = message.decode()
        for ws in list(clients):
            await ws.send_str(text)

    app = web.Application()
    app.add_routes([web.get("/ws", handler)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await follow(upstream, deliver)
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("source", "relay", "ws"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.role == "source":
        asyncio.run(source(args.port, args.out))
    elif args.role == "relay":
        asyncio.run(relay(args.port, args.upstream))
    else:
        asyncio.run(websocket(args.port, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
