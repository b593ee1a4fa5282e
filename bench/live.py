"""The benches of the live suite, all against one set of the three real processes (suite.py):
event latency, websocket fan-out, leaderboard req/s and report ingest, each next to its bare
baseline measured in the same run, interleaved.

    python bench/live.py [--quick]      # prints its figures; bench/run.py runs it with the rest
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from epoch_emitter import EmitterControl
from suite import (
    BENCH,
    PYTHON,
    Suite,
    demo_assets,
    free_port,
    raise_fd_limit,
    rss_mb,
    stop_process,
    wait_http,
)

MODELS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def read_stamps(path: Path, run_id: str) -> dict[int, float]:
    """The gateway's receipt log: the first time each event of `run_id` reached it."""
    stamps: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            run, seq, at = line.split()
            if run == run_id:
                stamps.setdefault(int(seq), float(at))
    return stamps


def read_stages(path: Path, run_id: str) -> dict[str, dict[int, float]]:
    """launch_metrics.py's log: when each event of `run_id` entered the store, and left."""
    stages: dict[str, dict[int, float]] = {"in": {}, "out": {}}
    if path.exists():
        for line in path.read_text().splitlines():
            stage, run, seq, at = line.split()
            if run == run_id:
                stages[stage].setdefault(int(seq), float(at))
    return stages


class Clients:
    """ws_clients.py processes, each with its share of every target's connections."""

    def __init__(self, work: Path, processes: int, targets: list[tuple[str, int, str, int]]):
        self.outs = [work / f"clients-{i}.json" for i in range(processes)]
        self.procs: list[subprocess.Popen[str]] = []
        for i, out in enumerate(self.outs):
            args = [PYTHON, str(BENCH / "ws_clients.py"), "--out", str(out)]
            for name, port, path, count in targets:
                share = count // processes + (1 if i < count % processes else 0)
                args += ["--name", name, "--port", str(port), "--path", path]
                args += ["--clients", str(share)]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))

    def ready(self) -> int:
        total = 0
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"a client process failed: {line!r}")
            total += int(line.split()[1])
        return total

    def results(self, timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for proc, out in zip(self.procs, self.outs, strict=True):
            proc.wait(timeout)
            for name, part in json.loads(out.read_text()).items():
                into = merged.setdefault(
                    name, {"connected": 0, "closed_early": 0, "codes": {}, "seqs": {}}
                )
                into["connected"] += part["connected"]
                into["closed_early"] += part["closed_early"]
                for code, n in part["close_codes"].items():
                    into["codes"][code] = into["codes"].get(code, 0) + n
                for seq, (count, first, last) in part["seqs"].items():
                    entry = into["seqs"].setdefault(int(seq), [0, first, last])
                    entry[0] += count
                    entry[1] = min(entry[1], first)
                    entry[2] = max(entry[2], last)
        return merged


# ---- 2. event latency ----------------------------------------------------------------------------


def event_latency(suite: Suite, work: Path, events: int, interval: float) -> dict[str, Any]:
    """epoch_end created in the worker -> received by a websocket client of the gateway,
    interleaved event by event with the same through a chain of three bare processes."""
    run_id, run_dir = suite.start_run(MODELS)
    emitter = EmitterControl(run_dir)
    chain = BareChain(work)
    try:
        clients = Clients(
            work,
            1,
            [
                ("gateway", suite.gateway_port, feed_path(run_id), 1),
                ("bare", chain.ws_port, "/ws", 1),
            ],
        )
        clients.ready()
        for _ in range(events):
            emitter.emit(1)
            time.sleep(interval / 2)
            chain.emit()
            time.sleep(interval / 2)
        created = emitter.done()
        bare_created = chain.done()
        got = clients.results()
    finally:
        chain.stop()
    ours, bare = got["gateway"]["seqs"], got["bare"]["seqs"]
    stamps = read_stamps(suite.gateway_stamps or Path("-"), run_id)
    stages = read_stages(suite.metrics_stamps or Path("-"), run_id)
    total = [(ours[s][2] - created[s]) * 1000 for s in created if s in ours]
    hops = {
        "worker_event_log": (created, emitter.sent),
        "pipe_to_metrics": (emitter.sent, stages["in"]),
        "metrics_store": (stages["in"], stages["out"]),
        "metrics_to_gateway": (stages["out"], stamps),
        "gateway_to_client": (stamps, {s: v[2] for s, v in ours.items()}),
    }
    split = {
        f"{hop}_p50_ms": statistics.median([(b[s] - a[s]) * 1000 for s in a if s in b] or [0])
        for hop, (a, b) in hops.items()
    }
    upstream = [(stamps[s] - created[s]) * 1000 for s in created if s in stamps]
    baseline = [(bare[s][2] - bare_created[s]) * 1000 for s in bare_created if s in bare]
    return {
        "run_id": run_id,
        "events": len(created),
        "event_latency_lost": len(created) - len(total),
        "event_latency_p50_ms": statistics.median(total),
        "event_latency_p99_ms": percentile(total, 99),
        "event_latency_max_ms": max(total),
        "worker_to_gateway_p50_ms": statistics.median(upstream) if upstream else None,
        "worker_to_gateway_p99_ms": percentile(upstream, 99) if upstream else None,
        **split,
        "bare_chain_latency_p50_ms": statistics.median(baseline),
        "bare_chain_latency_p99_ms": percentile(baseline, 99),
        "event_latency_p50_ratio_vs_bare": statistics.median(total) / statistics.median(baseline),
    }


class BareChain:
    """bare_chain.py's three processes: source -> relay -> websocket server."""

    def __init__(self, work: Path) -> None:
        ports = [free_port() for _ in range(3)]
        self.ws_port = ports[2]
        self.out = work / "bare-chain-created.json"
        script = str(BENCH / "bare_chain.py")
        self.procs: list[subprocess.Popen[str]] = []
        roles = [
            ["source", "--out", str(self.out)],
            ["relay", "--upstream", f"127.0.0.1:{ports[0]}"],
            ["ws", "--upstream", f"127.0.0.1:{ports[1]}"],
        ]
        for port, role in zip(ports, roles, strict=True):
            proc = subprocess.Popen(
                [PYTHON, script, role[0], "--port", str(port), *role[1:]],
                stdin=subprocess.PIPE if role[0] == "source" else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # gRPC's notes on streams cancelled at the end
                text=True,
            )
            self.procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bare_chain.py {role[0]} did not start")
        time.sleep(0.5)  # the relay and the websocket server subscribe upstream

    def emit(self) -> None:
        stdin = self.procs[0].stdin
        assert stdin is not None
        stdin.write("emit 1\n")
        stdin.flush()

    def done(self) -> dict[int, float]:
        stdin = self.procs[0].stdin
        assert stdin is not None
        stdin.write("done\n")
        stdin.flush()
        self.procs[0].wait(30)
        return {int(k): v for k, v in json.loads(self.out.read_text()).items()}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)


def feed_path(run_id: str) -> str:
    return f"/ws/training?runId={run_id}"


# ---- 3. fan-out ----------------------------------------------------------------------------------


def fanout(
    suite: Suite, work: Path, bare_port: int, clients: int, events: int, processes: int, gap: float
) -> dict[str, Any]:
    """One event to `clients` websockets of the gateway, interleaved with the same broadcast by a
    bare aiohttp server to as many websockets of its own, from the same client processes."""
    run_id, run_dir = suite.start_run(MODELS)
    emitter = EmitterControl(run_dir)
    pool = Clients(
        work,
        processes,
        [
            ("gateway", suite.gateway_port, feed_path(run_id), clients),
            ("bare", bare_port, "/ws", clients),
        ],
    )
    ready = pool.ready()
    rss = [rss_mb(suite.gateway_pid)]
    bare_started: dict[int, float] = {}
    for seq in range(1, events + 1):
        emitter.emit(1)
        time.sleep(gap)
        rss.append(rss_mb(suite.gateway_pid))
        bare_started[seq] = post_json(f"http://127.0.0.1:{bare_port}/broadcast?seq={seq}")[
            "started"
        ]
        time.sleep(gap)
    created = emitter.done()
    post_json(f"http://127.0.0.1:{bare_port}/broadcast?seq=0&type=training_complete")
    got = pool.results()
    stamps = read_stamps(suite.gateway_stamps or Path("-"), run_id)
    ours, theirs = got["gateway"], got["bare"]
    spread = [(ours["seqs"][s][2] - stamps[s]) * 1000 for s in created if s in ours["seqs"]]
    from_worker = [(ours["seqs"][s][2] - created[s]) * 1000 for s in created if s in ours["seqs"]]
    bare = [(theirs["seqs"][s][2] - bare_started[s]) * 1000 for s in bare_started]
    delivered = sum(ours["seqs"].get(s, [0])[0] for s in created)
    bare_delivered = sum(theirs["seqs"].get(s, [0])[0] for s in bare_started)
    return {
        "fanout_clients": ours["connected"],
        "clients_ready": ready,
        "fanout_events": len(created),
        "fanout_p50_ms": statistics.median(spread),
        "fanout_p99_ms": percentile(spread, 99),
        "fanout_from_worker_p99_ms": percentile(from_worker, 99),
        "fanout_lost_events": clients * len(created) - delivered,
        "fanout_closed_early": ours["closed_early"],
        "bare_fanout_p50_ms": statistics.median(bare),
        "bare_fanout_p99_ms": percentile(bare, 99),
        "bare_fanout_lost_events": clients * len(bare_started) - bare_delivered,
        "fanout_p99_ratio_vs_bare": percentile(spread, 99) / percentile(bare, 99),
        "gateway_rss_mb_at_fanout": max(rss),
    }


def post_json(url: str) -> Any:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


# ---- 4. leaderboard ------------------------------------------------------------------------------


def wrk(url: str, seconds: int, connections: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if found is None or errors is not None:
        raise RuntimeError(f"wrk against {url} failed:\n{out}")
    return float(found.group(1))


def leaderboard(
    suite: Suite, run_id: str, bare_port: int, rounds: int, seconds: int
) -> dict[str, Any]:
    """GET …/leaderboard vs a bare aiohttp handler answering the same document, and vs the
    same gateway with the leaderboard fetched over gRPC per GET (before the fix)."""
    route = f"/api/training/{run_id}/leaderboard"
    before = suite.extra_gateway("gateway-before", "--leaderboard-over-grpc")
    urls = {
        "ours": suite.url + route,
        "bare": f"http://127.0.0.1:{bare_port}/json",
        "before": before + route,
    }
    for url in urls.values():
        wrk(url, 1, 16)  # warm-up: the first GET loads the run's state
    samples: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            samples[name].append(wrk(urls[name], seconds, 64))
    stop_process(suite.processes.pop("gateway-before"))
    ratios = [o / b for o, b in zip(samples["ours"], samples["bare"], strict=True)]
    before_ratios = [o / b for o, b in zip(samples["before"], samples["bare"], strict=True)]
    return {
        "leaderboard_rps": statistics.median(samples["ours"]),
        "bare_json_rps": statistics.median(samples["bare"]),
        "leaderboard_ratio_vs_bare": statistics.median(ratios),
        "leaderboard_over_grpc_rps": statistics.median(samples["before"]),
        "leaderboard_over_grpc_ratio_vs_bare": statistics.median(before_ratios),
    }


# ---- 5. ingest -----------------------------------------------------------------------------------


def report_load(url: str, clients: int, seconds: float, prefix: str, work: Path) -> dict[str, Any]:
    out = work / f"load-{prefix}.json"
    subprocess.run(
        [
            PYTHON,
            str(BENCH / "report_load.py"),
            "--url",
            url,
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--prefix",
            prefix,
            "--out",
            str(out),
        ],
        check=True,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def ingest(
    suite: Suite,
    work: Path,
    bare_port: int,
    rounds: int,
    seconds: float,
    clients: int,
    day: int = 2,
) -> dict[str, Any]:
    ours, bare, acked, refused = [], [], {}, 0
    for r in range(rounds):
        prefix = f"run-202601{day:02d}-0000{r:02d}"  # new outside runs every round
        order = ["ours", "bare"] if r % 2 == 0 else ["bare", "ours"]
        for who in order:
            if who == "ours":
                url = suite.url + "/api/training/{run}/metrics"
                result = report_load(url, clients, seconds, prefix, work)
                ours.append(sum(result["acked"].values()) / result["elapsed"])
                acked.update(result["acked"])
                refused += sum(result["refused"].values())
            else:
                url = f"http://127.0.0.1:{bare_port}/report"
                result = report_load(url, clients, seconds, prefix + "-bare", work)
                bare.append(sum(result["acked"].values()) / result["elapsed"])
    with sqlite3.connect(f"file:{suite.db}?mode=ro", uri=True) as db:
        stored = dict(
            db.execute(
                "SELECT run_id, COUNT(*) FROM events WHERE type = 'epoch_end' "
                "AND run_id LIKE ? GROUP BY run_id",
                (f"run-202601{day:02d}-%",),
            ).fetchall()
        )
    missing = sum(max(0, n - stored.get(run_id, 0)) for run_id, n in acked.items())
    return {
        "report_rps": statistics.median(ours),
        "bare_report_rps": statistics.median(bare),
        "report_ratio_vs_bare": statistics.median(ours) / statistics.median(bare),
        "reports_acknowledged": sum(acked.values()),
        "reports_missing_from_store": missing,
        "reports_refused": refused,
    }


# ---- all of them ---------------------------------------------------------------------------------


def run(work: Path, quick: bool, demo: Path | None = None) -> dict[str, Any]:
    """Every live bench; `demo`: where the demo assets are (made there if missing)."""
    if shutil.which("wrk") is None:
        raise SystemExit(
            "the leaderboard bench needs wrk: install it (Debian: apt-get install -y wrk)"
        )
    raise_fd_limit()
    models, datasets = demo_assets(demo or work / "demo")
    suite = Suite(
        work / "suite",
        models,
        datasets,
        gateway_stamps=work / "gateway-stamps.txt",
        metrics_stamps=work / "metrics-stamps.txt",
    )
    suite.start()
    bare_port = free_port()
    results: dict[str, Any] = {}
    bare_proc = None
    try:
        latency = event_latency(suite, work, events=100 if quick else 600, interval=0.01)
        results.update({k: v for k, v in latency.items() if k != "run_id"})
        document = suite.get_json(f"/api/training/{latency['run_id']}/leaderboard")
        doc_file = work / "leaderboard.json"
        doc_file.write_text(json.dumps(document))
        bare_proc = subprocess.Popen(
            [
                PYTHON,
                str(BENCH / "bare_servers.py"),
                "--port",
                str(bare_port),
                "--json",
                str(doc_file),
            ]
        )
        wait_http(f"http://127.0.0.1:{bare_port}/json", bare_proc)
        results.update(
            leaderboard(suite, latency["run_id"], bare_port, 2 if quick else 4, 2 if quick else 4)
        )
        results.update(ingest(suite, work, bare_port, 2 if quick else 3, 2.0 if quick else 4.0, 64))
        results.update(
            fanout(
                suite,
                work,
                bare_port,
                clients=200 if quick else 2000,
                events=10 if quick else 60,
                processes=2 if quick else 4,
                gap=0.3 if quick else 0.4,
            )
        )
    finally:
        if bare_proc is not None:
            bare_proc.terminate()
            bare_proc.wait()
        suite.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small settings, for development")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oneseek-bench-") as tmp:
        results = run(Path(tmp), args.quick)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
