"""Slow and abusive websocket clients against a real gateway process.

Forty clients follow one run while an outside trainer reports over a thousand epochs: four of
them (10 %) never read their socket (a tiny receive buffer, so they really stall). The other
36 get every event in seq order; each never-reader is closed with 1013 after an exact prefix of
the feed; and the gateway's memory does not pay for the stalled clients: its peak RSS grows no
more than that of a control gateway fed the same stream with four readers and no stalled
client, give or take a bound far below what buffering the stream for them would cost.

A client opening sockets in a loop gets its share (ONESEEK_WS_MAX_PER_IP) and then 429s with
the JSON error envelope, and a closed socket frees its place.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest

from services.api import metrics_pb2, metrics_pb2_grpc
from tests.faults.test_report_restart import REPORTER, start_gateway
from tests.processes import GatewayProcess, ServiceProcess, free_port, workspace_env

pytestmark = pytest.mark.slow

RUN_ID = "run-20250606-120000"
CLIENTS = 40
NEVER_READ = 4
PER_IP = 44
REPORTS = 1300
"""Epochs reported while the clients follow: more than a stalled client's 1,024-frame allowance
plus what its socket buffers absorb."""
READER_WINDOW = 256
"""How far the pump may run ahead of the slowest reader: well within the 1,024 frames a client
may have waiting, so a reader is never dropped for the test process's own slowness."""
MODELS = [f"slow-client-model-{i:02d}" for i in range(30)]  # an epoch_end of about 5 KB
MEMORY_SLACK = 16 * 1024 * 1024
"""How much more the gateway with stalled clients may grow than the control (noise: 36 more
clients' objects and transient buffers). Buffering the stream for the four stalled clients
would cost four times the stream, over 25 MB."""
SEQ = re.compile(rb'"seq":\s*(\d+)')
TYPE = re.compile(rb'"type":\s*"(\w+)"')


def report(epoch: int) -> metrics_pb2.ReportMetricsRequest:
    request = metrics_pb2.ReportMetricsRequest(run_id=RUN_ID, epoch=epoch)
    for i, name in enumerate(MODELS):
        request.val_losses[name] = 2.0 + i / 1000 + 1 / epoch
        request.train_losses[name] = 2.2 + i / 1000 + 1 / epoch
        request.weights[name] = 1.0 + (i % 3 - 1) / 7
        request.lr_multipliers[name] = 1e-4 * (1.0 + (i % 3 - 1) / 7)
    return request


def memory(process: GatewayProcess) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of the process, in bytes, from /proc."""
    assert process.process is not None
    found = {}
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


@dataclass
class Setup:
    metrics: ServiceProcess
    gateway: GatewayProcess
    control: GatewayProcess


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("slow-clients")
    no_models = root / "no-models"  # an outside run only: no base model is loaded
    no_models.mkdir()
    env = workspace_env(root / "work", no_models, ONESEEK_REPORT_TOKEN=REPORTER)
    nowhere = f"127.0.0.1:{free_port()}"
    metrics = ServiceProcess(
        "metrics-service", "--training-addr", nowhere, env=env, log=root / "metrics.log"
    ).start()
    gateway_env = {
        **env,
        "ONESEEK_TRAINING_ADDR": nowhere,
        "ONESEEK_METRICS_ADDR": metrics.addr,
        "ONESEEK_WS_MAX_PER_IP": str(PER_IP),
    }
    started: list[GatewayProcess] = []
    try:
        started.append(start_gateway(gateway_env, root / "gateway.log"))
        started.append(start_gateway(gateway_env, root / "control.log"))
        yield Setup(metrics, *started)
    finally:
        codes = [gateway.stop() for gateway in started]
        assert metrics.stop() == 0, metrics.output()
        assert codes == [0] * len(started), [g.output() for g in started]


# ---- clients ------------------------------------------------------------------------------------


def feed_url(gateway: GatewayProcess) -> str:
    return f"{gateway.url.replace('http', 'ws')}/ws/training?runId={RUN_ID}"


@dataclass
class Reader:
    """A client that reads everything: the seq of each event after its initial_state."""

    ws: aiohttp.ClientWebSocketResponse
    initial_seq: int = -1
    seqs: list[int] = field(default_factory=list)
    closed_with: int | None = None

    async def read_until(self, last: int) -> None:
        while not self.seqs or self.seqs[-1] < last:
            message = await self.ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                self.closed_with = self.ws.close_code
                return
            head = message.data[:200].encode()
            kind = TYPE.search(head)
            number = SEQ.search(head)
            assert kind is not None and number is not None, head
            if kind.group(1) == b"heartbeat":
                continue
            if kind.group(1) == b"initial_state":
                self.initial_seq = int(number.group(1))
            else:
                self.seqs.append(int(number.group(1)))


class NeverReader:
    """A raw websocket whose owner never reads after the handshake, with a receive buffer as
    small as the kernel allows, so the gateway's writes to it really stall."""

    def __init__(self, gateway: GatewayProcess) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(
            (
                f"GET /ws/training?runId={RUN_ID} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{gateway.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(1024)
            assert chunk, "the gateway closed during the handshake"
            received += chunk
        head, _, self.data = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.sock = sock

    def drain(self, timeout: float = 20) -> None:
        """Reads everything the gateway sent, up to its close (or `timeout` of silence)."""
        self.sock.settimeout(timeout)
        try:
            while chunk := self.sock.recv(1 << 20):
                self.data += chunk
        except (ConnectionResetError, TimeoutError):
            pass  # what came before is what matters; a missing close frame fails below
        finally:
            self.sock.close()

    def frames(self) -> list[tuple[int, bytes]]:
        """(opcode, payload) of every complete frame received (server frames are unmasked)."""
        found, at, data = [], 0, self.data
        while at + 2 <= len(data):
            opcode, size, start = data[at] & 0x0F, data[at + 1] & 0x7F, at + 2
            if size == 126:
                (size,), start = struct.unpack("!H", data[start : start + 2]), start + 2
            elif size == 127:
                (size,), start = struct.unpack("!Q", data[start : start + 8]), start + 8
            if start + size > len(data):
                break
            found.append((opcode, data[start : start + size]))
            at = start + size
        return found


def too_slow_closes(gateway: GatewayProcess) -> int:
    return gateway.output().count("websocket client too slow, closing 1013")


# ---- the test -----------------------------------------------------------------------------------


async def test_slow_and_abusive_clients(setup: Setup) -> None:
    gateway, control = setup.gateway, setup.control
    with grpc.insecure_channel(setup.metrics.addr) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        token = (("authorization", f"Bearer {REPORTER}"),)
        stub.ReportMetrics(report(1), timeout=10, metadata=token)

        async with aiohttp.ClientSession() as session:
            readers = [
                Reader(await session.ws_connect(feed_url(gateway)))
                for _ in range(CLIENTS - NEVER_READ)
            ]
            stalled = [await asyncio.to_thread(NeverReader, gateway) for _ in range(NEVER_READ)]
            controls = [Reader(await session.ws_connect(feed_url(control))) for _ in range(4)]

            # ---- abusive: one address opening sockets in a loop
            extra, refusals = [], []
            for _ in range(PER_IP + 20):
                try:
                    extra.append(await session.ws_connect(feed_url(gateway)))
                except aiohttp.WSServerHandshakeError as refused:
                    refusals.append(refused.status)
            assert len(extra) == PER_IP - CLIENTS
            assert refusals == [429] * (PER_IP + 20 - len(extra))
            async with session.get(feed_url(gateway).replace("ws", "http", 1)) as plain:
                body = await plain.json()
                assert plain.status == 429 and plain.headers["Retry-After"]
                assert body["error"] == "too_many_requests" and str(PER_IP) in body["message"]
            for ws in extra:
                await ws.close()
            deadline = time.monotonic() + 10
            while True:  # the freed places are given again
                try:
                    extra = [await session.ws_connect(feed_url(gateway))]
                    break
                except aiohttp.WSServerHandshakeError as refused:
                    assert refused.status == 429 and time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            await extra[0].close()

            # ---- slow: a stream of reports, read by all but four
            baseline = {"gateway": memory(gateway), "control": memory(control)}
            last = REPORTS + 1
            errors: list[BaseException] = []

            def slowest_reader() -> int:
                return min(r.seqs[-1] if r.seqs else 1 for r in [*readers, *controls])

            def pump() -> None:
                try:
                    for epoch in range(2, last + 1):
                        # the readers are this test's own code on a busy machine: keep them
                        # within a few hundred events, so only the never-readers fall behind
                        while slowest_reader() < epoch - READER_WINDOW:
                            time.sleep(0.002)
                        stub.ReportMetrics(report(epoch), timeout=30, metadata=token)
                except BaseException as error:  # seen by the test, not lost in the thread
                    errors.append(error)

            pumping = threading.Thread(target=pump, name="outside-trainer", daemon=True)
            pumping.start()

            def wait_for_closes() -> None:
                while too_slow_closes(gateway) < NEVER_READ and pumping.is_alive():
                    time.sleep(0.05)

            async def drain_when_dropped() -> None:
                # the never-readers read only once the gateway has closed all of them
                await asyncio.to_thread(wait_for_closes)
                await asyncio.gather(*(asyncio.to_thread(s.drain) for s in stalled))

            reading = [r.read_until(last) for r in [*readers, *controls]]
            await asyncio.wait_for(asyncio.gather(*reading, drain_when_dropped()), 180)
            await asyncio.to_thread(pumping.join, 30)
            assert errors == []
            peak = {"gateway": memory(gateway), "control": memory(control)}
            for ws in [r.ws for r in [*readers, *controls]]:
                await ws.close()

    grown = {name: peak[name]["VmHWM"] - baseline[name]["VmRSS"] for name in peak}
    stream = sum(len(report(e).SerializeToString()) for e in (2, last)) // 2 * REPORTS
    print(
        f"readers {len(readers)}+{len(controls)} got {REPORTS} events each; "
        f"never-readers got {[len(c.frames()) for c in stalled]} frames; "
        f"peak growth {grown['gateway'] >> 20} MiB vs control {grown['control'] >> 20} MiB "
        f"(stream about {stream >> 20} MiB)"
    )

    # every reader got every event, in seq order, right after its initial_state
    for reader in [*readers, *controls]:
        assert reader.closed_with is None
        assert reader.initial_seq == 1
        assert reader.seqs == list(range(2, last + 1))

    # every never-reader was closed 1013 after an exact prefix of the feed
    assert too_slow_closes(gateway) == NEVER_READ
    for client in stalled:
        frames = client.frames()
        texts = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
        assert texts[0]["type"] == "initial_state" and texts[0]["seq"] == 1
        got = [t["seq"] for t in texts[1:] if t["type"] != "heartbeat"]
        assert got == list(range(2, 2 + len(got))) and len(got) < REPORTS
        closes = [payload for opcode, payload in frames if opcode == 0x8]
        assert closes, f"no close frame after {len(got)} events"
        assert struct.unpack("!H", closes[0][:2])[0] == 1013

    # the stalled clients cost the gateway no more memory than the control's readers do
    assert grown["gateway"] - grown["control"] < MEMORY_SLACK, (grown, stream)
