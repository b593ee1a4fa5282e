"""Load generator for the ingest bench, in its own process: `--clients` concurrent reporters, each
reporting epoch after epoch of its own outside run for `--seconds`.

    python bench/report_load.py --url http://127.0.0.1:P/api/training/{run}/metrics \
        --clients 64 --seconds 5 --prefix run-20260101-000001 --out result.json

`{run}` becomes `<prefix>-<client>`. The result: requests answered 200 per run (its epochs
1..n were acknowledged), other answers by status, and the elapsed time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from urllib.parse import urlsplit


class Reporter(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection reporting epoch after epoch of its run, written by
    hand so the generator costs a fraction of what it loads (an aiohttp client would cost
    about as much CPU per request as the server it measures)."""

    def __init__(self, host: str, path: str, until: float, done: asyncio.Future[None]) -> None:
        self.host = host
        self.path = path
        self.until = until
        self.done = done
        self.epoch = 0
        self.acked = 0
        self.refused: Counter[str] = Counter()
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        epoch = self.epoch + 1
        body = json.dumps(
            {
                "epoch": epoch,
                "val_losses": {"tiny-llama": 2.5 - epoch * 1e-4, "tiny-qwen2": 2.7},
                "train_losses": {"tiny-llama": 2.6, "tiny-qwen2": 2.8},
                "weights": {"tiny-llama": 1.1, "tiny-qwen2": 0.9},
            }
        ).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").lower()
        length = 0
        for line in head.split("\r\n")[1:]:
            if line.startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        status = head[9:12]
        if status == "200":
            self.epoch += 1
            self.acked = self.epoch
        else:
            self.refused[status] += 1
        if time.monotonic() < self.until:
            self._send()
        elif not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run(url: str, clients: int, seconds: float, prefix: str) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url.replace("{run}", "RUN"))
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    started = time.monotonic()
    reporters = []
    for i in range(clients):
        path = parts.path.replace("RUN", f"{prefix}-{i + 1}")
        reporter = Reporter(f"{host}:{port}", path, started + seconds, loop.create_future())
        await loop.create_connection(lambda r=reporter: r, host, port)  # type: ignore[misc]
        reporters.append(reporter)
    await asyncio.gather(*(r.done for r in reporters))
    elapsed = time.monotonic() - started
    refused: Counter[str] = Counter()
    for reporter in reporters:
        refused.update(reporter.refused)
        if reporter.transport is not None:
            reporter.transport.close()
    return {
        "acked": {f"{prefix}-{i + 1}": r.acked for i, r in enumerate(reporters)},
        "refused": dict(refused),
        "elapsed": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args.url, args.clients, args.seconds, args.prefix))
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
