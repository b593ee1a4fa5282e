"""The MLflow mirror's cost to the suite: the metrics service's event throughput (outside runs'
epoch reports persisted per second, through ReportMetricsBatch) with the mirror on, writing to a
real `mlflow server` on loopback, vs off; interleaved rounds, each service a fresh process with a
fresh database; the median of the per-round ratios is `mlflow_mirror_throughput_ratio`.

    python bench/mlflow_mirror.py [--rounds 6] [--seconds 10] [--quick] [--unpaced]

Also measured, the same way: the mirror on while MLflow is down (`down`: nothing listens at the
tracking URI), and with --unpaced the mirror with its pace lifted (busy share 1: MLflow called
back to back), the design before the pace. Each round's figures are printed as they come.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suite import BENCH, ONESEEK, PYTHON, free_port, spawn, stop_process, wait_grpc, wait_http

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
SENDERS = 8
RUNS_PER_SENDER = 16
SETTLE_SECONDS = 3.0
"""Between SERVING and the load: the mirror imports mlflow (about a second of CPU) at start."""


class MlflowServer:
    """`mlflow server` on a free loopback port, a SQLite backend under `root`."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = str(Path(sys.executable).parent / "mlflow")
        args = [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--workers",
            "1",
        ]
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        with open(root / "mlflow.log", "ab") as log:
            self.process = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_http(f"{self.uri}/health", self.process, timeout=120)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    addr: str
    db: Path


def metrics_service(root: Path, name: str, mlflow: str | None, paced: bool = True) -> Service:
    """A fresh metrics service (its own database; following nothing) with the mirror on when
    `mlflow` is a tracking URI."""
    addr = f"127.0.0.1:{free_port()}"
    db = root / f"{name}.db"
    env = {
        "ONESEEK_STATE_DIR": str(root / "var"),
        "ONESEEK_ADMIN_TOKEN": "",
        "ONESEEK_REPORT_TOKEN": "",
        "MLFLOW_TRACKING_URI": mlflow or "",
        "MLFLOW_EXPERIMENT_NAME": name,
    }
    args = ["--addr", addr, "--training-addr", "127.0.0.1:1", "--db-url", f"sqlite:///{db}"]
    if paced:
        command = [ONESEEK, "metrics-service", *args]
    else:
        command = [PYTHON, str(BENCH / "mlflow_mirror.py"), "--serve-unpaced", *args]
    process = spawn(command, env, root / f"{name}.log")
    wait_grpc(addr, process)
    return Service(process, addr, db)


def reports(run_ids: list[str], epoch: int) -> Any:
    from services.api import metrics_pb2

    out = []
    for index, run_id in enumerate(run_ids):
        loss = {m: 2.0 + i / 10 + 1 / epoch + index / 1000 for i, m in enumerate(MODELS)}
        out.append(
            metrics_pb2.ReportMetricsRequest(
                run_id=run_id,
                epoch=epoch,
                val_losses=loss,
                train_losses={m: v + 0.1 for m, v in loss.items()},
                weights={m: 1.0 for m in MODELS},
                lr_multipliers={m: 1e-4 for m in MODELS},
            )
        )
    return metrics_pb2.ReportMetricsBatchRequest(reports=out)


async def report_load(addr: str, seconds: float) -> dict[str, Any]:
    """SENDERS concurrent callers, each reporting epoch after epoch of its RUNS_PER_SENDER
    outside runs in one ReportMetricsBatch per epoch, for `seconds`."""
    from grpc import aio

    from services.api import metrics_pb2_grpc

    loop = asyncio.get_running_loop()
    acked = refused = 0
    async with aio.insecure_channel(addr) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        began = loop.time()
        until = began + seconds

        async def sender(index: int) -> None:
            nonlocal acked, refused
            first = index * RUNS_PER_SENDER + 1
            run_ids = [f"run-20260301-000000-{first + j}" for j in range(RUNS_PER_SENDER)]
            epoch = 0
            while loop.time() < until:
                epoch += 1
                reply = await stub.ReportMetricsBatch(reports(run_ids, epoch), timeout=60)
                for result in reply.results:
                    if result.code == 0:
                        acked += 1
                    else:
                        refused += 1

        await asyncio.gather(*(sender(i) for i in range(SENDERS)))
        elapsed = loop.time() - began
    return {"acked": acked, "refused": refused, "elapsed": elapsed}


def cpu_seconds(group: int) -> float:
    """User + system CPU time of every live process in process group `group`."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # pgrp; utime and stime are fields 14 and 15 of stat
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def mirrored(db: Path) -> tuple[int, int]:
    """(events stored, events MLflow has taken) in a metrics database."""
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        taken = conn.execute("SELECT COALESCE(SUM(seq), 0) FROM mirror_positions").fetchone()[0]
    return int(stored), int(taken)


def measure(
    root: Path, name: str, uri: str | None, seconds: float, server: MlflowServer | None = None
) -> dict[str, Any]:
    """One round of one variant: a fresh service, the load, its figures. `server`: the MLflow
    server whose CPU time to count."""
    service = metrics_service(root, name, uri, paced=not name.startswith("unpaced"))
    try:
        time.sleep(SETTLE_SECONDS)
        # the service is our child: its own CPU time, from /proc/PID/stat
        own = process_cpu_seconds(service.process.pid)
        theirs = cpu_seconds(server.process.pid) if server else 0.0
        load = asyncio.run(report_load(service.addr, seconds))
        own = process_cpu_seconds(service.process.pid) - own
        theirs = (cpu_seconds(server.process.pid) if server else 0.0) - theirs
        stored, taken = mirrored(service.db) if uri else (load["acked"], 0)
    finally:
        stop_process(service.process)
    rate = load["acked"] / load["elapsed"]
    result = {
        "rate": rate,
        "refused": load["refused"],
        "stored": stored,
        "taken": taken,
        "cpu_us_per_report": own / load["acked"] * 1e6,
        "mlflow_cpu_share": theirs / load["elapsed"],
    }
    print(
        f"  {name}: {rate:,.0f} reports/s, mirrored {taken}/{stored}, "
        f"{result['cpu_us_per_report']:.0f} us CPU per report, "
        f"MLflow server {result['mlflow_cpu_share']:.1%} of a core",
        flush=True,
    )
    return result


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    work: Path, rounds: int = 6, seconds: float = 10.0, extras: tuple[str, ...] = ("down",)
) -> dict[str, Any]:
    """Rounds of the mirror on, off, and the `extras`: "down" (MLFLOW_TRACKING_URI names a port
    where nothing listens) and "unpaced" (on, with the pace lifted). Odd rounds run the variants
    in reverse order, so over each pair of rounds a drift of the machine's load hits all alike."""
    work.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(work / "mlflow")
    dead = f"http://127.0.0.1:{free_port()}"
    variants = ["on", "off", *extras]
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        for r in range(rounds):
            for who in variants if r % 2 == 0 else variants[::-1]:
                uri = {"off": None, "down": dead}.get(who, server.uri)
                watched = server if uri == server.uri else None
                samples[who].append(measure(work, f"{who}-{r}", uri, seconds, watched))
    finally:
        server.stop()
    off = samples["off"]

    def ratio(who: str) -> float:
        return statistics.median(
            a["rate"] / b["rate"] for a, b in zip(samples[who], off, strict=True)
        )

    def median(who: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[who])

    on = samples["on"]
    results: dict[str, Any] = {
        "mlflow_mirror_throughput_ratio": ratio("on"),
        "mlflow_mirror_on_reports_per_second": median("on", "rate"),
        "mlflow_mirror_off_reports_per_second": median("off", "rate"),
        "mlflow_mirror_mirrored_share_at_end": statistics.median(
            s["taken"] / s["stored"] for s in on
        ),
        "mlflow_mirror_refused_reports": sum(s["refused"] for v in samples.values() for s in v),
        "mlflow_mirror_on_cpu_us_per_report": median("on", "cpu_us_per_report"),
        "mlflow_mirror_off_cpu_us_per_report": median("off", "cpu_us_per_report"),
        "mlflow_server_cpu_share_of_a_core": median("on", "mlflow_cpu_share"),
    }
    if "down" in samples:
        results["mlflow_mirror_down_throughput_ratio"] = ratio("down")
        results["mlflow_mirror_down_cpu_us_per_report"] = median("down", "cpu_us_per_report")
    if "unpaced" in samples:
        lifted = samples["unpaced"]
        results["mlflow_mirror_unpaced_throughput_ratio"] = ratio("unpaced")
        results["mlflow_mirror_unpaced_mirrored_share_at_end"] = statistics.median(
            s["taken"] / s["stored"] for s in lifted
        )
        results["mlflow_server_unpaced_cpu_share_of_a_core"] = median("unpaced", "mlflow_cpu_share")
    return results


def serve_unpaced(argv: list[str]) -> int:
    """`oneseek metrics-service` with the mirror's pace lifted (the bench's "before")."""
    from dataclasses import replace

    from services.cli import main as oneseek
    from services.metrics import server

    configured = server.mirror_config

    def unpaced(*args: Any) -> Any:
        config = configured(*args)
        return None if config is None else replace(config, busy_share=1.0)

    server.mirror_config = unpaced  # type: ignore[assignment]
    return oneseek(["metrics-service", *argv])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-unpaced":
        return serve_unpaced(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 s")
    parser.add_argument("--unpaced", action="store_true", help="also the mirror without its pace")
    args = parser.parse_args()
    rounds, seconds = (2, 4.0) if args.quick else (args.rounds, args.seconds)
    with tempfile.TemporaryDirectory(prefix="oneseek-bench-mlflow-") as tmp:
        extras = ("down", "unpaced") if args.unpaced else ("down",)
        results = run(Path(tmp), rounds, seconds, extras)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
