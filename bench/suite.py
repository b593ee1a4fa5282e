"""The suite as the benches drive it: demo assets, and the three real processes on free loopback
ports (training service with its workers replaced by the bench's epoch emitter, metrics service,
gateway), started and waited for, stopped with SIGTERM.

Only the worker body is swapped (see launch_training.py): the service, the pipe, the metrics
service and the gateway are the production code, unmodified.
"""

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

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
ONESEEK = str(Path(sys.executable).parent / "oneseek")
WS_LIMIT_ENV = "ONESEEK_WS_MAX_PER_IP"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit(wanted: int = 65536) -> int:
    """Lifts this process's open-file limit towards `wanted` (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def demo_assets(root: Path) -> tuple[Path, Path]:
    """(models dir, datasets dir) with the demo models and the sample dataset, made once."""
    from services.training.demo_assets import create_demo_assets

    models, datasets = root / "models", root / "datasets"
    if not (models / "tiny-llama" / "config.json").exists():
        create_demo_assets(models, datasets, log=lambda _: None)
    return models, datasets


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_grpc(addr: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the process for {addr} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{addr} did not report SERVING within {timeout} s")


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            args, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT
        )


class Suite:
    """Training service (bench emitter workers), metrics service and gateway under `root`."""

    def __init__(
        self,
        root: Path,
        models: Path,
        datasets: Path,
        *,
        gateway_stamps: Path | None = None,
        metrics_stamps: Path | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db = root / "metrics.db"
        self.training_addr = f"127.0.0.1:{free_port()}"
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.gateway_port = free_port()
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.gateway_stamps = gateway_stamps
        self.metrics_stamps = metrics_stamps
        # the run folders land in MODELS_DIR/oneseek-certified: a private MODELS_DIR of links
        own_models = root / "models"
        own_models.mkdir(exist_ok=True)
        for model in sorted(models.iterdir()):
            link = own_models / model.name
            if (model / "config.json").exists() and not link.exists():
                link.symlink_to(model, target_is_directory=True)
        self.env = {
            "MODELS_DIR": str(own_models),
            "DATASETS_DIR": str(datasets),
            "ONESEEK_STATE_DIR": str(root / "var"),
            "ONESEEK_DB_URL": f"sqlite:///{self.db}",
            "ONESEEK_TRAINING_ADDR": self.training_addr,
            "ONESEEK_METRICS_ADDR": self.metrics_addr,
            "ONESEEK_ADMIN_TOKEN": "",
            "ONESEEK_REPORT_TOKEN": "",
            "LEDGER_URL": "",
            "HF_HUB_OFFLINE": "1",
            # thousands of bench clients come from one address: lift the per-address limit
            WS_LIMIT_ENV: "0",  # 0: no limit
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> Suite:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        logs = self.root
        training = spawn(
            [PYTHON, str(BENCH / "launch_training.py"), "--addr", self.training_addr],
            self.env,
            logs / "training.log",
        )
        self.processes["training"] = training
        wait_grpc(self.training_addr, training)
        args = [PYTHON, str(BENCH / "launch_metrics.py"), "--addr", self.metrics_addr]
        if self.metrics_stamps is not None:
            args += ["--stamps", str(self.metrics_stamps)]
        metrics = spawn(args, self.env, logs / "metrics.log")
        self.processes["metrics"] = metrics
        wait_grpc(self.metrics_addr, metrics)
        args = [PYTHON, str(BENCH / "launch_gateway.py"), "--port", str(self.gateway_port)]
        if self.gateway_stamps is not None:
            args += ["--stamps", str(self.gateway_stamps)]
        gateway = spawn(args, self.env, logs / "gateway.log")
        self.processes["gateway"] = gateway
        wait_http(f"{self.url}/healthz", gateway)

    def extra_gateway(self, name: str, *flags: str) -> str:
        """Another gateway on the same services (e.g. with a fix turned off); its URL."""
        port = free_port()
        args = [PYTHON, str(BENCH / "launch_gateway.py"), "--port", str(port), *flags]
        process = spawn(args, self.env, self.root / f"{name}.log")
        self.processes[name] = process
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", process)
        return url

    def stop(self) -> None:
        for name in [n for n in self.processes if n not in ("metrics", "training")]:
            stop_process(self.processes.pop(name, None))
        for name in ("metrics", "training"):
            stop_process(self.processes.pop(name, None))

    @property
    def gateway_pid(self) -> int:
        return self.processes["gateway"].pid

    # ---- a run driven by the emitter ----------------------------------------------------------

    def start_run(self, models: list[str], epochs: int = 3) -> tuple[str, Path]:
        """StartRun over gRPC (as the gateway's start route does); (run id, run folder)."""
        import grpc

        from services.api import training_pb2, training_pb2_grpc

        with grpc.insecure_channel(self.training_addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            reply = stub.StartRun(
                training_pb2.StartRunRequest(
                    dataset_id="sample", base_models=models, epochs=epochs
                ),
                timeout=60,
            )
            run = stub.GetRun(training_pb2.GetRunRequest(run_id=reply.run_id), timeout=10)
        return reply.run_id, Path(run.run_dir)

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as reply:
            return json.loads(reply.read())
