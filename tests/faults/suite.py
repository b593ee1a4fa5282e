"""The whole suite as real processes for the fault tests: training service, metrics service and
gateway on free loopback ports, with tokens, over a workspace of demo models and 60 records;
plus a snapshot of the files around MODELS_DIR, to show that bad input wrote nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.processes import GatewayProcess, ServiceProcess, workspace_env

ADMIN = "fault-admin-token-6f1d2c"
REPORTER = "fault-report-token-93ab07"


@dataclass
class Suite:
    root: Path
    env: dict[str, str]
    training: ServiceProcess
    metrics: ServiceProcess
    gateway: GatewayProcess
    logs: Path

    @property
    def models_dir(self) -> Path:
        return Path(self.env["MODELS_DIR"])

    def outputs(self) -> str:
        return "\n".join(part.output() for part in (self.training, self.metrics, self.gateway))


@contextmanager
def running_suite(root: Path, demo_models: Path, **overrides: str) -> Iterator[Suite]:
    """Starts the three processes (tokens set unless overridden) and stops them after; each
    must exit 0."""
    env = workspace_env(root / "work", demo_models)
    env.update({"ONESEEK_ADMIN_TOKEN": ADMIN, "ONESEEK_REPORT_TOKEN": REPORTER, **overrides})
    logs = root / "logs"
    logs.mkdir()
    training = ServiceProcess("training-service", env=env, log=logs / "training.log").start()
    metrics: ServiceProcess | None = None
    gateway: GatewayProcess | None = None
    try:
        metrics = ServiceProcess(
            "metrics-service", "--training-addr", training.addr, env=env, log=logs / "metrics.log"
        ).start()
        gateway_env = {
            **env,
            "ONESEEK_TRAINING_ADDR": training.addr,
            "ONESEEK_METRICS_ADDR": metrics.addr,
        }
        gateway = GatewayProcess(gateway_env, logs / "gateway.log", env["ONESEEK_ADMIN_TOKEN"])
        gateway.start()
        yield Suite(root, env, training, metrics, gateway, logs)
    finally:
        codes = {}
        for name, part in (("gateway", gateway), ("metrics", metrics), ("training", training)):
            if part is not None and part.process is not None:
                codes[name] = part.stop()
        assert all(code == 0 for code in codes.values()), codes


def tree(root: Path, *, skip: Path | None = None) -> set[str]:
    """Every path under `root` (relative), not following links, leaving out `skip`'s subtree."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if skip is not None and (here == skip or skip in here.parents):
            dirs.clear()
            continue
        for name in [*dirs, *files]:
            found.add(str((here / name).relative_to(root)))
    return found
