"""The real suite for the client tests: training service, metrics service and gateway as child
processes on free ports (once for the package, with an admin and a report token, the demo
models and 60 sample records as dataset `small`), and clients pointed at them."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.client import Conflict, OneSeekClient
from tests.processes import GatewayProcess, ServiceProcess, workspace_env

ADMIN = "client-admin-token"
REPORTER = "client-report-token"


@dataclass
class Suite:
    training: ServiceProcess
    metrics: ServiceProcess
    gateway: GatewayProcess
    env: dict[str, str]
    root: Path
    work: Path
    """What `make run` makes of the project's folder: models/ and datasets/ (with `small` and
    `sample`, both the first 60 records of the sample dataset)."""

    def client(self, **settings: Any) -> OneSeekClient:
        values: dict[str, Any] = {"admin_token": ADMIN, "report_token": "", "tls_ca": None}
        values.update(settings)
        return OneSeekClient(self.training.addr, self.metrics.addr, **values)

    def rest(self, path: str) -> Any:
        """GET `path` on the gateway (read routes are open on loopback); the parsed JSON."""
        with urllib.request.urlopen(self.gateway.url + path, timeout=10) as reply:
            assert reply.status == 200
            return json.loads(reply.read())


@pytest.fixture(scope="package")
def suite(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Suite]:
    root = tmp_path_factory.mktemp("client-suite")
    work = root / "work"
    env = workspace_env(
        work, demo_models_dir, ONESEEK_ADMIN_TOKEN=ADMIN, ONESEEK_REPORT_TOKEN=REPORTER
    )
    datasets = Path(env["DATASETS_DIR"])
    (datasets / "sample.jsonl").write_text((datasets / "small.jsonl").read_text())
    training = ServiceProcess("training-service", env=env, log=root / "training.log").start()
    metrics = ServiceProcess(
        "metrics-service", "--training-addr", training.addr, env=env, log=root / "metrics.log"
    ).start()
    addrs = {"ONESEEK_TRAINING_ADDR": training.addr, "ONESEEK_METRICS_ADDR": metrics.addr}
    gateway = GatewayProcess({**env, **addrs}, root / "gateway.log", ADMIN).start()
    yield Suite(training, metrics, gateway, env, root, work)
    codes = [process.stop() for process in (gateway, metrics, training)]
    assert codes == [0, 0, 0], [p.output()[-3000:] for p in (gateway, metrics, training)]


def start_when_idle(client: OneSeekClient, epochs: int = 1, **options: Any) -> str:
    """A short run of tiny-llama on `small`, asked again while an earlier run still occupies
    the service (it trains one run at a time)."""
    options = {"refresh_interval": 0.05, "auto_stop_threshold": 0.0, **options}
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.start_run("small", ["tiny-llama"], epochs=epochs, **options).run_id
        except Conflict:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
