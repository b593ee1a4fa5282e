"""Many websocket clients in one process, each as light as a client can be (a raw asyncio
protocol: the handshake, then frame parsing), so the bench measures the server, not its clients.

    python bench/ws_clients.py --port P --path /ws/training?runId=... --clients 500 \
        [--port P2 --path /ws --clients 500 ...] --out result.json

One `--port/--path/--clients` triple per target. Prints `ready N` once every connection has had
its first message, then records the monotonic time each `epoch_end` reached each client, and
ends when every connection has seen `training_complete` (or closed), or after --timeout. The
result, per target: connections, connections closed early, and per seq [count, first, last].
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from typing import Any

_KEY = base64.b64encode(os.urandom(16)).decode()


class Target:
    def __init__(self, name: str, port: int, path: str, clients: int) -> None:
        self.name = name
        self.port = port
        self.path = path
        self.clients = clients
        self.connected = 0
        self.greeted = 0
        self.finished = 0
        self.closed_early = 0
        self.codes: dict[str, int] = {}
        self.seqs: dict[int, list[float]] = {}  # seq -> [count, first, last]

    def record(self, seq: int, now: float) -> None:
        entry = self.seqs.get(seq)
        if entry is None:
            self.seqs[seq] = [1, now, now]
        else:
            entry[0] += 1
            entry[1] = min(entry[1], now)
            entry[2] = max(entry[2], now)

    def result(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "connected": self.connected,
            "finished": self.finished,
            "closed_early": self.closed_early,
            "close_codes": self.codes,
            "seqs": {str(seq): entry for seq, entry in sorted(self.seqs.items())},
        }


class FeedClient(asyncio.Protocol):
    def __init__(self, target: Target, changed: asyncio.Event) -> None:
        self.target = target
        self.changed = changed
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.greeted = False
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            (
                f"GET {self.target.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.target.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()  # before any parsing: what the client would see first
        buf = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            if b" 101 " not in buf[: buf.find(b"\r\n")]:
                self._end("http " + buf[9:12].decode(errors="replace"))
                return
            self.upgraded = True
            self.target.connected += 1
            buf = buf[end + 4 :]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length, head = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size - pos < head + length:
                break
            payload = buf[pos + head : pos + head + length]
            pos += head + length
            if opcode == 1:
                self._message(payload, now)
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._end(str(code))
                return
            elif opcode == 9 and self.transport is not None:  # pong, masked with a zero key
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
        self.buffer = buf[pos:]

    def _message(self, payload: bytes, now: float) -> None:
        message = json.loads(payload)
        kind = message.get("type")
        if not self.greeted:
            self.greeted = True
            self.target.greeted += 1
            self.changed.set()
        if kind == "epoch_end":
            self.target.record(int(message["seq"]), now)
        elif kind == "training_complete":
            self.finished = True
            self.target.finished += 1
            self.changed.set()

    def _end(self, code: str) -> None:
        if not self.finished:
            self.target.closed_early += 1
            self.target.codes[code] = self.target.codes.get(code, 0) + 1
            self.finished = True
            self.changed.set()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self._end("lost")


async def run(targets: list[Target], timeout: float, parallel: int) -> None:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    gate = asyncio.Semaphore(parallel)
    clients: list[FeedClient] = []

    async def connect(target: Target) -> None:
        async with gate:
            client = FeedClient(target, changed)
            clients.append(client)
            try:
                await loop.create_connection(lambda: client, "127.0.0.1", target.port)
            except OSError as error:
                client.finished = True
                target.closed_early += 1
                target.codes[type(error).__name__] = target.codes.get(type(error).__name__, 0) + 1
                return
            while not client.greeted and not client.finished:
                changed.clear()
                await changed.wait()

    await asyncio.gather(*(connect(t) for t in targets for _ in range(t.clients)))
    print(f"ready {sum(t.greeted for t in targets)}", flush=True)
    deadline = loop.time() + timeout
    while not all(c.finished for c in clients) and loop.time() < deadline:
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            break
    for client in clients:
        if client.transport is not None:
            client.transport.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--path", action="append", required=True)
    parser.add_argument("--clients", type=int, action="append", required=True)
    parser.add_argument("--name", action="append")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--parallel", type=int, default=100)
    args = parser.parse_args()
    names = args.name or [str(i) for i in range(len(args.port))]
    targets = [
        Target(name, port, path, count)
        for name, port, path, count in zip(names, args.port, args.path, args.clients, strict=True)
    ]
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(run(targets, args.timeout, args.parallel))
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump({t.name: t.result() for t in targets}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
