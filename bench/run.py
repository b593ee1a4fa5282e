"""Every bench of bench/README.md in one go: prints a table of the figures against their
targets and writes bench/results.json (`make bench`).

    .venv/bin/python bench/run.py [--quick] [--only train|live|mid|ray|generate|mlflow|callback]

--quick: small settings (a few minutes), for development; the figures are then only a hint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import generate  # after the environment above
import live
import mid_model
import mlflow_mirror
import ray_executor
import train_throughput
import trainer_callback

RESULTS = Path(__file__).resolve().parent / "results.json"

Check = Callable[[float], bool]
# key, what it is, target (text), the check, the baseline key shown next to it
ROWS: list[tuple[str, str, str, Check | None, str | None]] = [
    ("train_ratio_vs_bare", "trainer / bare loop (full)", ">= 0.97", lambda v: v >= 0.97, None),
    (
        "train_ratio_vs_hf_trainer",
        "trainer / HF Trainer (full)",
        ">= 1.0",
        lambda v: v >= 1.0,
        None,
    ),
    ("lora_train_ratio_vs_bare", "trainer / bare loop (LoRA)", "", None, None),
    ("lora_train_ratio_vs_hf_trainer", "trainer / HF Trainer (LoRA)", "", None, None),
    ("population_ratio_vs_alone", "3 models in one run / alone", "", None, None),
    ("population_overhead_per_added_model", "  overhead per added model", "", None, None),
    (
        "event_latency_p50_ms",
        "worker -> ws client p50 ms",
        "< 5",
        lambda v: v < 5,
        "bare_chain_latency_p50_ms",
    ),
    (
        "event_latency_p99_ms",
        "worker -> ws client p99 ms",
        "< 25",
        lambda v: v < 25,
        "bare_chain_latency_p99_ms",
    ),
    ("fanout_clients", "websocket clients", ">= 2000", lambda v: v >= 2000, None),
    ("fanout_p50_ms", "fan-out to last client p50 ms", "", None, "bare_fanout_p50_ms"),
    (
        "fanout_p99_ms",
        "fan-out to last client p99 ms",
        "< 250",
        lambda v: v < 250,
        "bare_fanout_p99_ms",
    ),
    ("fanout_lost_events", "events lost", "0", lambda v: v == 0, "bare_fanout_lost_events"),
    ("gateway_rss_mb_at_fanout", "gateway RSS MB", "", None, None),
    ("leaderboard_rps", "GET leaderboard req/s", "", None, "bare_json_rps"),
    ("leaderboard_ratio_vs_bare", "leaderboard / bare handler", ">= 0.5", lambda v: v >= 0.5, None),
    ("leaderboard_over_grpc_ratio_vs_bare", "  before: gRPC call per GET", "", None, None),
    (
        "report_rps",
        "POST metrics persisted req/s",
        ">= 1000",
        lambda v: v >= 1000,
        "bare_report_rps",
    ),
    ("report_ratio_vs_bare", "  ingest / bare POST handler", "", None, None),
    ("reports_missing_from_store", "acknowledged, not stored", "0", lambda v: v == 0, None),
    (
        "mid_train_ratio_vs_bare",
        "mid model: trainer / bare (full)",
        ">= 0.97",
        lambda v: v >= 0.97,
        "mid_bare_tokens_per_second",
    ),
    (
        "mid_lora_train_ratio_vs_bare",
        "mid model: trainer / bare (LoRA)",
        ">= 0.97",
        lambda v: v >= 0.97,
        "mid_lora_bare_tokens_per_second",
    ),
    ("mid_lora_bf16_train_ratio_vs_bare", "  the same in bf16", "", None, None),
    ("bf16_tokens_per_second_ratio_vs_fp32", "mid LoRA tokens/s, bf16 / fp32", "", None, None),
    ("bf16_peak_memory_ratio_vs_fp32", "mid LoRA peak memory, bf16 / fp32", "", None, None),
    (
        "ray_ratio_vs_local",
        "ray executor / local (2 members)",
        ">= 0.9",
        lambda v: v >= 0.9,
        "local_epoch_seconds",
    ),
    ("ray_barrier_ms", "  barrier: rules + learning rates ms", "", None, None),
    (
        "generate_ratio_vs_inprocess",
        "generation tokens/s, suite / in-process",
        ">= 0.9",
        lambda v: v >= 0.9,
        "generate_tokens_per_second_inprocess",
    ),
    ("generate_grpc_ratio_vs_inprocess", "  through gRPC", "", None, None),
    ("generate_sse_ratio_vs_inprocess", "  through the gateway (SSE)", "", None, None),
    ("generate_ttft_ms_inprocess", "  time to first token ms, in-process", "", None, None),
    ("generate_ttft_ms_grpc", "  time to first token ms, gRPC", "", None, None),
    ("generate_ttft_ms_sse", "  time to first token ms, gateway", "", None, None),
    ("generate_tiny_ratio_vs_inprocess", "  the same on tiny-llama", "", None, None),
    (
        "mlflow_mirror_throughput_ratio",
        "MLflow mirror on / off, reports/s",
        ">= 0.95",
        lambda v: v >= 0.95,
        "mlflow_mirror_off_reports_per_second",
    ),
    ("mlflow_mirror_mirrored_share_at_end", "  share in MLflow at the round's end", "", None, None),
    (
        "mlflow_mirror_down_throughput_ratio",
        "  the same with MLflow down",
        ">= 0.95",
        lambda v: v >= 0.95,
        None,
    ),
    (
        "callback_overhead_ratio",
        "HF Trainer epoch, callback on / off - 1",
        "< 0.01",
        lambda v: v < 0.01,
        "callback_epoch_seconds_without",
    ),
    (
        "callback_cost_bound_ratio",
        "  hooks + sending CPU / epoch",
        "< 0.01",
        lambda v: v < 0.01,
        None,
    ),
    ("callback_noise_ratio", "  two Trainers without it (noise)", "", None, None),
    ("callback_reports_missing", "  epochs reported, not stored", "0", lambda v: v == 0, None),
    (
        "memory_estimate_error",
        "memory estimate, worst |error|",
        "<= 0.25",
        lambda v: abs(v) <= 0.25,
        None,
    ),
]


def table(results: dict[str, Any]) -> str:
    lines = [f"{'figure':<34} {'value':>10} {'target':>8} {'baseline':>10}  ok", "-" * 70]
    for key, label, target, check, base in ROWS:
        value = results.get(key)
        if value is None:
            continue
        small = isinstance(value, float) and abs(value) < 100
        shown = f"{value:,.3f}" if small else f"{value:,.0f}"
        baseline = results.get(base) if base else None
        base_text = f"{baseline:,.1f}" if isinstance(baseline, (int, float)) else ""
        ok = "" if check is None else ("yes" if check(value) else "NO")
        lines.append(f"{label:<34} {shown:>10} {target:>8} {base_text:>10}  {ok}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small settings, for development")
    parser.add_argument(
        "--only", choices=("train", "live", "mid", "ray", "generate", "mlflow", "callback")
    )
    args = parser.parse_args()
    started = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="oneseek-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "live"):
            results.update(live.run(work / "live", args.quick, demo=work / "demo"))
        if args.only in (None, "train"):
            rounds = 1 if args.quick else 5
            results.update(train_throughput.run(work / "demo", rounds=rounds))
        if args.only in (None, "mid"):
            results.update(mid_model.run(work / "mid", quick=args.quick))
        if args.only in (None, "ray"):
            results.update(ray_executor.run(work / "ray", epochs=2 if args.quick else 4))
        if args.only in (None, "generate"):
            results.update(generate.run(work / "generate", rounds=2 if args.quick else 5))
        if args.only in (None, "mlflow"):
            rounds, seconds = (2, 4.0) if args.quick else (6, 10.0)
            results.update(mlflow_mirror.run(work / "mlflow", rounds, seconds))
        if args.only in (None, "callback"):
            rounds = 5 if args.quick else 15
            results.update(trainer_callback.run(work / "callback", rounds=rounds))
    results["load_average_after"] = os.getloadavg()[0]
    results["seconds"] = round(time.monotonic() - started, 1)
    # every other key is a number; what the figures were measured on is under "about"
    results["about"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
    }
    if args.only is not None and RESULTS.exists():  # a partial run keeps the other figures
        results = {**json.loads(RESULTS.read_text()), **results}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table(results))
    print(f"\nwrote {RESULTS} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
