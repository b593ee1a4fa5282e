"""The ray executor against local, on this machine: a 2-member population's epoch throughput,
and the per-epoch barrier (gather the losses, apply the rules, set the learning rates).

Both populations are built once (two demo models, the sample data, the same seed); then their
epochs alternate, local then ray, so machine noise falls on both. This machine has 2 cores, so
ray (each actor one core, both at once) cannot beat local (one member at a time, both cores):
the ratio measures the executor's overhead. The expected speed-up with one GPU per member is
worked out in bench/README.md from these figures.

    .venv/bin/python bench/ray_executor.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the repo root is not put on sys.path: its datasets/ folder would shadow the `datasets` library
# (bench/mid_model.py); `services` comes from the editable install

from services.api.run_config import adaptive_weights, config_from_body
from services.core.adaptive_weights import adjust_weights, lr_multipliers
from services.training.checkpoints import TrainingProgress
from services.training.data import load_dataset, split_dataset
from services.training.demo_assets import create_demo_assets
from services.training.events import EventLog
from services.training.executors import Executor, LocalExecutor
from services.training.memory_plan import plan_members
from services.training.models import resolve_models
from services.training.population import Population

REPO = Path(__file__).resolve().parents[1]
MODELS = ["tiny-llama", "tiny-qwen2"]
REQUEST = {
    "datasetId": "sample",
    "baseModels": MODELS,
    "epochs": 100,
    "maxSeqLength": 96,
    "batchSize": 4,
    "refreshInterval": 1.0,
}


def population(models: Path, executor: Executor) -> Population:
    config = config_from_body(REQUEST)
    dataset = load_dataset("sample", REPO / "datasets")
    infos = resolve_models(MODELS, models)
    placements = {p.model: p for p in plan_members(config, infos, dataset.records)}
    train, validation = split_dataset(dataset.records, config.validation_split, config.seed)
    progress = TrainingProgress.start("run-20260101-000000", config, dataset.sha256, MODELS)
    events = EventLog("run-20260101-000000")
    crowd = Population(config, progress, events, threading.Event(), executor=executor)
    crowd.members = executor.build(config, infos, train, validation, placements)
    return crowd


def epoch(crowd: Population, number: int) -> tuple[float, float, int]:
    """(seconds training, seconds at the barrier, steps) of one epoch."""
    steps = 0

    def count(step: Any) -> None:
        nonlocal steps
        steps += 1

    crowd.on_step = count
    started = time.perf_counter()
    losses = crowd.train(number)
    trained = time.perf_counter()
    assert losses is not None
    validation = crowd.executor.validate(crowd.members)
    validated = time.perf_counter()
    # the barrier: the rules on the gathered losses, and each member's new learning rate
    rules = adaptive_weights(crowd.config)
    adjustment = adjust_weights(crowd.progress.weights, validation, rules)
    rates = lr_multipliers(adjustment.weights, crowd.config.learning_rate)
    for member in crowd.members:
        member.set_learning_rate(rates[member.name])
    return trained - started, time.perf_counter() - validated, steps


def run(work: Path, epochs: int = 4) -> dict[str, float]:
    from services.training.ray_executor import RAY_ENV, RayExecutor, connect

    models = work / "models"
    create_demo_assets(models, work / "datasets", log=lambda _: None)
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    connect("local")
    started = time.perf_counter()
    local, remote = population(models, LocalExecutor()), population(models, RayExecutor("auto"))
    print(f"\nray executor vs local, {MODELS}, built in {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {"local": [], "ray": []}
    barriers: list[float] = []
    steps: dict[str, int] = {}
    for number in range(1, epochs + 2):  # the first epoch of each warms up
        for name, crowd in (("local", local), ("ray", remote)):
            seconds, barrier, count = epoch(crowd, number)
            if number > 1:
                times[name].append(seconds)
                if name == "ray":
                    barriers.append(barrier)
            steps[name] = count
            print(f"  epoch {number} {name:<5} {seconds:6.2f} s  {count} steps")
    remote.executor.close()
    local_s, ray_s = statistics.median(times["local"]), statistics.median(times["ray"])
    barrier_ms = statistics.median(barriers) * 1000
    ratio = local_s / ray_s
    print(
        f"  median epoch: local {local_s:.2f} s, ray {ray_s:.2f} s; ray / local throughput "
        f"{ratio:.3f}; barrier (rules + learning rates on the actors) {barrier_ms:.1f} ms"
    )
    return {
        "ray_ratio_vs_local": ratio,
        "ray_barrier_ms": barrier_ms,
        "ray_epoch_seconds": ray_s,
        "local_epoch_seconds": local_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oneseek-ray-") as tmp:
        run(Path(tmp), args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
