"""`oneseek up`: the whole suite on one machine, for local use (what `make run` calls).

Creates the demo assets when MODELS_DIR has no base model, creates the admin token when none
is set (kept in $ONESEEK_STATE_DIR/admin_token, mode 0600), starts the training service, the
metrics service and the gateway as child processes, waits until all three are healthy,
prints the page's URL, and stops all three cleanly on Ctrl-C or SIGTERM (or when one dies).

With ONESEEK_TLS_CERT/ONESEEK_TLS_KEY set both services serve TLS, and the metrics service,
the gateway and the health checks here trust ONESEEK_TLS_CA (default: the certificate itself,
which is right for a self-signed one).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api.runtime import (
    TLS_CA_ENV,
    TLS_CERT_ENV,
    blocking_channel,
    client_tls_ca,
    metrics_addr,
    server_tls,
    training_addr,
)
from services.core.errors import InvalidInput
from services.core.layout import datasets_dir, models_dir, state_dir

STOP_GRACE = 45.0  # the training service stops active runs cleanly within 30 s by default


def admin_token_file() -> Path:
    return state_dir() / "admin_token"


def ensure_admin_token() -> str:
    """ONESEEK_ADMIN_TOKEN, else the stored token, else a new one stored with mode 0600."""
    token = os.environ.get("ONESEEK_ADMIN_TOKEN")
    if token:
        return token
    path = admin_token_file()
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # a copied or restored file: the token is for this user only
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


def _wait_grpc(
    addr: str, process: subprocess.Popen[bytes], deadline: float, ca: bytes | None = None
) -> None:
    with blocking_channel(addr, ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the process for {addr} exited with code {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"{addr} did not become healthy in time")


def _wait_http(url: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in time")


def run(args: argparse.Namespace) -> int:
    from services.training.demo_assets import create_demo_assets
    from services.training.models import discover_models

    models_root, datasets_root = models_dir(args.models_dir), datasets_dir(args.datasets_dir)
    if not discover_models(models_root):
        print(f"No base model in {models_root}: creating the demo models...", flush=True)
        create_demo_assets(models_root, datasets_root)
    token = ensure_admin_token()
    tls_env: dict[str, str] = {}
    try:
        if server_tls() is not None and not os.environ.get(TLS_CA_ENV):
            tls_env[TLS_CA_ENV] = os.environ[TLS_CERT_ENV]  # self-signed: its own CA
        ca = client_tls_ca(tls_env.get(TLS_CA_ENV))
    except InvalidInput as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    host = args.host or os.environ.get("ONESEEK_GATEWAY_HOST") or "127.0.0.1"
    port = args.port or int(os.environ.get("ONESEEK_GATEWAY_PORT") or 3001)
    train_at, metrics_at = training_addr(), metrics_addr()
    env = {
        **os.environ,
        "MODELS_DIR": str(models_root),
        "DATASETS_DIR": str(datasets_root),
        "ONESEEK_ADMIN_TOKEN": token,
        "ONESEEK_TRAINING_ADDR": train_at,
        "ONESEEK_METRICS_ADDR": metrics_at,
        **tls_env,
    }
    cli = [sys.executable, "-m", "services.cli"]
    commands = {
        "training service": [*cli, "training-service", "--addr", train_at],
        "metrics service": [*cli, "metrics-service", "--addr", metrics_at],
        "gateway": [*cli, "gateway", "--host", host, "--port", str(port)],
    }
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, command in commands.items():
            children[name] = subprocess.Popen(command, env=env)
            deadline = time.monotonic() + 120
            if name == "gateway":
                _wait_http(f"http://{host}:{port}/healthz", children[name], deadline)
            else:
                _wait_grpc(command[-1], children[name], deadline, ca)
        url = f"http://{host}:{port}/#token={token}"
        print(f"\nOneSeek is up: {url}\n(Ctrl-C stops the suite)\n", flush=True)
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    print(f"The {name} exited (code {child.returncode}); stopping.", flush=True)
                    stopping = True
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        # SIGINT from the terminal reached every child already; SIGTERM each one that remains,
        # the gateway first so browsers see a clean close, the training service last
        for child in reversed(list(children.values())):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in reversed(list(children.values())):
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
