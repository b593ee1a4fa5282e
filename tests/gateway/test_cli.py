"""The gateway as its own process: it serves; SIGTERM closes websockets with 1001, exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.gateway.conftest import ADMIN, Suite
from tests.processes import free_port

pytestmark = pytest.mark.slow


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the gateway exited"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise TimeoutError(url)


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "gateway", "--host", "127.0.0.1"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


async def test_sigterm_closes_feeds_and_exits_cleanly(
    suite: Suite, finished_run: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        **suite.env,
        "ONESEEK_TRAINING_ADDR": suite.training.addr,
        "ONESEEK_METRICS_ADDR": suite.metrics.addr,
        "ONESEEK_GATEWAY_PORT": str(port),
    }
    log = tmp_path / "gateway.log"
    process = await asyncio.to_thread(_spawn, env, log)
    try:
        await asyncio.to_thread(_wait_http, f"http://127.0.0.1:{port}/healthz", process)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/ws/training?runId={finished_run}&token={ADMIN}"
            ws = await session.ws_connect(url)
            first = json.loads((await ws.receive(10)).data)
            assert first["type"] == "initial_state"
            process.send_signal(signal.SIGTERM)
            while True:
                message = await ws.receive(15)
                if message.type == aiohttp.WSMsgType.CLOSE:
                    assert message.data == 1001
                    break
        assert await asyncio.to_thread(process.wait, 15) == 0
        output = log.read_text()
        assert "gateway stopped" in output
        assert ADMIN not in output  # the websocket's ?token= never reaches the log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
