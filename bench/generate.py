"""Generation through the suite against `model.generate` in-process, on the same trained model:
tokens per second and time to first token, through gRPC (TrainingService.Generate) and through
the gateway (Server-Sent Events).

One run is trained for real (`oneseek train`, 1 epoch of each model), the training service and
the gateway start as processes, and each way answers once untimed first (the service's cache
loads the model, CUDA warms up): the rounds compare generating, not loading. Rounds alternate
in-process, gRPC, gateway, so machine noise falls on all three; figures are medians.

    .venv/bin/python bench/generate.py [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc
import torch

from services.api import training_pb2, training_pb2_grpc
from services.training.demo_assets import create_demo_assets
from services.training.trained import load_trained, locate

# The repo root is deliberately not put on sys.path: its datasets/ folder would shadow the
# `datasets` library that transformers probes for (bench/mid_model.py). `services` comes from the
# editable install; the tests' process helpers are loaded from their file.
REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "oneseek_bench_processes", REPO / "tests" / "processes.py"
)
assert _spec is not None and _spec.loader is not None
processes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(processes)
ONESEEK, GatewayProcess, ServiceProcess = (
    processes.ONESEEK,
    processes.GatewayProcess,
    processes.ServiceProcess,
)
MODELS = ("tiny-llama", "mid-llama")
PROMPT = "Explain how the adaptive weights engine ranks the models"
TOKEN = "bench-generate-token"


def _train(env: dict[str, str], cwd: Path) -> Path:
    done = subprocess.run(
        [ONESEEK, "train", "--models", ",".join(MODELS), "--dataset", "sample", "--epochs", "1",
         "--max-seq-length", "32"],
        env=env, cwd=cwd, capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    return Path(done.stdout.strip().splitlines()[-1].split()[-1])


class InProcess:
    """`model.generate` on the same merged weights the service loads, greedy, with a streamer
    that notes when the first new token arrives."""

    def __init__(self, run_dir: Path, model: str) -> None:
        self.trained = load_trained(locate(run_dir, model))
        tokenizer = self.trained.tokenizer
        self.ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(self.trained.device)

    def __call__(self, tokens: int) -> tuple[float, float, int]:
        first: list[float] = []

        class Mark:
            seen = False

            def put(self, value: torch.Tensor) -> None:
                if self.seen and not first:
                    first.append(time.perf_counter())
                self.seen = True

            def end(self) -> None:
                pass

        began = time.perf_counter()
        with torch.inference_mode():
            out = self.trained.model.generate(  # type: ignore[operator]
                input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                max_new_tokens=tokens, do_sample=False, streamer=Mark(),
            )  # fmt: skip
        seconds = time.perf_counter() - began
        count = out.shape[1] - self.ids.shape[1]
        return count / seconds, first[0] - began, count


def over_grpc(stub: Any, run_id: str, model: str, tokens: int) -> tuple[float, float, int]:
    request = training_pb2.GenerateRequest(
        run_id=run_id, models=[model], prompt=PROMPT, max_new_tokens=tokens, temperature=0.0
    )
    began, first, count = time.perf_counter(), 0.0, 0
    for event in stub.Generate(request, metadata=(("authorization", f"Bearer {TOKEN}"),)):
        if event.WhichOneof("payload") == "token" and not first:
            first = time.perf_counter()
        if event.WhichOneof("payload") == "done":
            count = event.done.completion_tokens
    return count / (time.perf_counter() - began), first - began, count


def over_sse(url: str, run_id: str, model: str, tokens: int) -> tuple[float, float, int]:
    body = {"models": [model], "prompt": PROMPT, "maxNewTokens": tokens, "temperature": 0}
    request = urllib.request.Request(
        f"{url}/api/training/{run_id}/generate",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    began, first, count, kind = time.perf_counter(), 0.0, 0, ""
    with urllib.request.urlopen(request, timeout=300) as reply:
        for raw in reply:
            line = raw.decode()
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                if kind == "token" and not first:
                    first = time.perf_counter()
                elif kind == "done":
                    count = json.loads(line[6:])["completion_tokens"]
    return count / (time.perf_counter() - began), first - began, count


def run(work: Path, rounds: int = 5, tokens: int = 128) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    models, datasets = work / "models", work / "datasets"
    create_demo_assets(models_root=models, datasets_root=datasets, size="all", log=lambda _: None)
    env = {
        **os.environ,
        "MODELS_DIR": str(models),
        "DATASETS_DIR": str(REPO / "datasets"),
        "ONESEEK_STATE_DIR": str(work / "var"),
        "ONESEEK_ADMIN_TOKEN": TOKEN,
        "LEDGER_URL": "",
    }
    run_dir = _train(env, work)
    service = ServiceProcess("training-service", env=env, log=work / "training.log").start()
    gateway_env = {
        **env,
        "ONESEEK_TRAINING_ADDR": service.addr,
        "ONESEEK_METRICS_ADDR": "127.0.0.1:9",
    }
    gateway = GatewayProcess(gateway_env, work / "gateway.log", token=TOKEN).start(
        ready="/api/config"
    )
    results: dict[str, float] = {}
    try:
        with grpc.insecure_channel(service.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            for model in MODELS:
                local = InProcess(run_dir, model)
                # untimed first answers: the service's cache loads the model, CUDA warms up
                local(tokens)
                over_grpc(stub, run_dir.name, model, tokens)
                over_sse(gateway.url, run_dir.name, model, tokens)
                samples: dict[str, list[tuple[float, float, int]]] = {
                    "in": [],
                    "grpc": [],
                    "sse": [],
                }
                for _ in range(rounds):
                    samples["in"].append(local(tokens))
                    samples["grpc"].append(over_grpc(stub, run_dir.name, model, tokens))
                    samples["sse"].append(over_sse(gateway.url, run_dir.name, model, tokens))
                    if os.environ.get("BENCH_VERBOSE"):
                        print(model, {k: v[-1] for k, v in samples.items()}, flush=True)
                rate = {k: statistics.median(s[0] for s in v) for k, v in samples.items()}
                ttft = {k: statistics.median(s[1] for s in v) * 1000 for k, v in samples.items()}
                counts = {k: {s[2] for s in v} for k, v in samples.items()}
                assert counts["in"] == counts["grpc"] == counts["sse"], counts  # the same answer
                prefix = "generate_" if model == "mid-llama" else "generate_tiny_"
                results.update(
                    {
                        f"{prefix}tokens_per_second_inprocess": rate["in"],
                        f"{prefix}grpc_ratio_vs_inprocess": rate["grpc"] / rate["in"],
                        f"{prefix}sse_ratio_vs_inprocess": rate["sse"] / rate["in"],
                        f"{prefix}ttft_ms_inprocess": ttft["in"],
                        f"{prefix}ttft_ms_grpc": ttft["grpc"],
                        f"{prefix}ttft_ms_sse": ttft["sse"],
                    }
                )
                results[f"{prefix}ratio_vs_inprocess"] = min(
                    results[f"{prefix}grpc_ratio_vs_inprocess"],
                    results[f"{prefix}sse_ratio_vs_inprocess"],
                )
                del local
    finally:
        gateway.stop()
        service.stop()
    for key, value in results.items():
        print(f"{key:<40} {value:10.3f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oneseek-generate-") as tmp:
        run(Path(tmp), args.rounds, args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
