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


def start_when_idle(stub: Any, request: Any, busy_for: float = 30.0) -> str:
    """`stub.StartRun(request)`'s run id, asked again while the service answers
    FAILED_PRECONDITION for up to `busy_for` seconds (an earlier test's worker may still be on
    its way out, and the service trains one run at a time)."""
    deadline = time.monotonic() + busy_for
    while True:
        try:
            return str(stub.StartRun(request, timeout=30).run_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"the training service stayed busy: {error.details()}") from None
            time.sleep(0.1)


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


class ChildProcess:
    """An `oneseek` command as a child process, its output in `log`."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        handle = open(self.log, "ab")  # noqa: SIM115 - owned by the child for its life
        self.process = subprocess.Popen(
            [ONESEEK, *args],
            env={**os.environ, **self.env},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        return self.process

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


class ServiceProcess(ChildProcess):
    """`oneseek <command> --addr 127.0.0.1:<port> ...`, ready once its health check says
    SERVING."""

    def __init__(self, command: str, *args: str, env: dict[str, str], log: Path) -> None:
        super().__init__(env, log)
        self.command = command
        self.args = list(args)
        self.addr = f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        process = self._spawn(self.command, "--addr", self.addr, *self.args)
        wait_serving(self.addr, timeout, process)
        return self


class GatewayProcess(ChildProcess):
    """`oneseek gateway --host 127.0.0.1 --port P`; restartable on the same port."""

    def __init__(self, env: dict[str, str], log: Path, token: str = "") -> None:
        super().__init__(env, log)
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, ready: str = "/healthz") -> GatewayProcess:
        """Starts the gateway and waits until `ready` answers 200 (/healthz: both services
        answer too; /api/config: the gateway alone)."""
        process = self._spawn("gateway", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                code = process.returncode
                raise RuntimeError(f"the gateway exited with {code}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}{ready}", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"the gateway did not answer {ready} within {timeout} s")

    def get(self, path: str) -> Any:
        """GET `path` with the admin token; the parsed JSON of a 200 answer."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
            return json.loads(reply.read())
