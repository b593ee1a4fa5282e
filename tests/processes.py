"""Real processes for end-to-end tests: a workspace of demo models and a small dataset, a
service on a free loopback port that is waited for until its health check says SERVING (the
gateway: until /healthz answers), stopped with SIGTERM (or SIGKILL) afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ONESEEK = str(Path(sys.executable).parent / "oneseek")
REPO = Path(__file__).resolve().parents[1]


def workspace_env(
    root: Path, demo_models: Path, *, records: int = 60, **overrides: str
) -> dict[str, str]:
    """Environment for a suite under `root`: MODELS_DIR with links to the demo models (runs
    land in its oneseek-certified/), a dataset `small` of the sample's first `records` lines,
    state and metrics database under `root`, no tokens and no ledger unless overridden."""
    models = root / "models"
    models.mkdir(parents=True)
    for model in sorted(demo_models.iterdir()):
        if (model / "config.json").exists():
            (models / model.name).symlink_to(model, target_is_directory=True)
    datasets = root / "datasets"
    datasets.mkdir()
    lines = (REPO / "datasets" / "sample.jsonl").read_text().splitlines()[:records]
    (datasets / "small.jsonl").write_text("\n".join(lines) + "\n")
    env = {
        "MODELS_DIR": str(models),
        "DATASETS_DIR": str(datasets),
        "ONESEEK_STATE_DIR": str(root / "var"),
        "ONESEEK_DB_URL": f"sqlite:///{root / 'metrics.db'}",
        "ONESEEK_ADMIN_TOKEN": "",
        "ONESEEK_REPORT_TOKEN": "",
        "LEDGER_URL": "",
        "HF_HUB_OFFLINE": "1",
    }
    return {**env, **overrides}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(
    addr: str, timeout: float = 60.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process for {addr} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{addr} did not report SERVING within {timeout} s")


class ServiceProcess:
    """`oneseek <command> --addr 127.0.0.1:<port> ...` as a child process."""

    def __init__(self, command: str, *args: str, env: dict[str, str], log: Path) -> None:
        self.command = command
        self.args = list(args)
        self.env = env
        self.log = log
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        handle = open(self.log, "ab")  # noqa: SIM115 - owned by the child for its life
        self.process = subprocess.Popen(
            [ONESEEK, self.command, "--addr", self.addr, *self.args],
            env={**os.environ, **self.env},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        wait_serving(self.addr, timeout, self.process)
        return self

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class GatewayProcess:
    """`oneseek gateway --host 127.0.0.1 --port P`; restartable on the same port."""

    def __init__(self, env: dict[str, str], log: Path, token: str = "") -> None:
        self.env = env
        self.log = log
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, ready: str = "/healthz") -> GatewayProcess:
        """Starts the gateway and waits until `ready` answers 200 (/healthz: both services
        answer too; /api/config: the gateway alone)."""
        handle = open(self.log, "ab")  # noqa: SIM115 - owned by the child for its life
        self.process = subprocess.Popen(
            [ONESEEK, "gateway", "--host", "127.0.0.1", "--port", str(self.port)],
            env={**os.environ, **self.env},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}{ready}", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"the gateway did not answer {ready} within {timeout} s")

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> Any:
        """GET `path` with the admin token; the parsed JSON of a 200 answer."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
            return json.loads(reply.read())
