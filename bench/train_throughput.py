"""Trainer throughput: our population trainer vs a bare PyTorch loop vs the transformers Trainer,
full fine-tuning and LoRA; then the population's overhead: 3 models in one run vs the same 3
models trained alone.

Same tiny model, same data, same padded batches, same optimizer and learning rate. Each
contender is warmed up once (first-time kernel set-up per shape), then the timed epochs are
interleaved round by round so machine noise hits all of them alike. Prints tokens/s and the
ratios, and merges them into bench/results.json (bench/run.py runs it with the other benches).

    .venv/bin/python bench/train_throughput.py [--rounds 5] [--model tiny-llama] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The repo root is deliberately not put on sys.path: its datasets/ folder would shadow the
# `datasets` library that transformers probes for. `services` comes from the editable install.
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402 - after the environment above

from services.api.run_config import config_from_body  # noqa: E402
from services.training.data import Batch, load_dataset  # noqa: E402
from services.training.demo_assets import create_demo_assets  # noqa: E402
from services.training.events import EventLog  # noqa: E402
from services.training.member import wrap_model  # noqa: E402
from services.training.models import discover_models, load_model  # noqa: E402
from services.training.population import TrainingRun  # noqa: E402
from services.training.run_folder import RunFolder  # noqa: E402

RESULTS = REPO / "bench" / "results.json"
LR = 1e-4
Epoch = Callable[[], Callable[[], int]]
"""Trains one epoch; returns how to count the tokens it processed, called once the clock has
stopped (counting rebuilds the epoch's batches, which must not be timed)."""


def ours(trainer: TrainingRun) -> Epoch:
    return epochs_of([trainer])


def batches_of(trainer: TrainingRun, epoch: int) -> list[Batch]:
    return trainer.population.members[0].batches(epoch)


def bare(model: torch.nn.Module, trainer: TrainingRun) -> Epoch:
    """The loop every PyTorch tutorial writes: nothing but forward, backward, step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    state = {"epoch": 0}

    def epoch() -> Callable[[], int]:
        state["epoch"] += 1
        batches = batches_of(trainer, state["epoch"])
        model.train()
        for b in batches:
            loss = model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return lambda: sum(b.tokens for b in batches)

    return epoch


def hf_trainer(model: torch.nn.Module, trainer: TrainingRun, out: Path) -> Epoch:
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    batches = batches_of(trainer, 1)
    items = [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}
        for b in batches
    ]
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=1,  # each item is one of our padded batches
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
    )
    hf = Trainer(
        model=model,
        args=args,
        train_dataset=items,  # type: ignore[arg-type]
        data_collator=lambda rows: rows[0],
    )
    tokens = sum(b.tokens for b in batches)

    def epoch() -> Callable[[], int]:
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-train metrics line
            hf.train()
        return lambda: tokens

    return epoch


def measure(contenders: dict[str, Epoch], rounds: int) -> dict[str, float]:
    """Best tokens/s per contender (its least disturbed epoch: on a shared machine other work
    only ever slows an epoch down, by up to several times here); one warm-up epoch each, then
    interleaved rounds."""
    for run in contenders.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            started = time.perf_counter()
            count = contenders[name]()
            elapsed = time.perf_counter() - started
            samples[name].append(count() / elapsed)
    return {name: max(values) for name, values in samples.items()}


_runs = iter(range(1, 100))


def setup(work: Path, model_names: list[str], method: str) -> tuple[TrainingRun, list[Any]]:
    models_dir, datasets_dir = work / "models", REPO / "datasets"
    if not discover_models(models_dir):
        create_demo_assets(models_dir, work / "datasets", log=lambda _: None)
    infos = [next(m for m in discover_models(models_dir) if m.name == n) for n in model_names]
    config = config_from_body(
        {
            "datasetId": "sample",
            "baseModels": model_names,
            "method": method,
            "learningRate": LR,
            "epochs": 100,
            "refreshInterval": 5,
        }
    )
    run_id = f"run-20260101-{next(_runs):06d}"
    trainer = TrainingRun(
        config,
        run_id=run_id,
        models=infos,
        dataset=load_dataset("sample", datasets_dir),
        folder=RunFolder.create(models_dir, run_id),
        events=EventLog(run_id),
    )
    trainer.prepare()
    return trainer, infos


def bench(work: Path, model_name: str, method: str, rounds: int) -> dict[str, float]:
    trainer, (info,) = setup(work, [model_name], method)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        model = load_model(info, torch.device("cpu"))
        # the trainer's own wrapping: the same adapters, rank, alpha and dropout for everyone
        return wrap_model(trainer.config, model)

    contenders = {
        "oneseek": ours(trainer),
        "bare loop": bare(fresh(), trainer),
        "hf Trainer": hf_trainer(fresh(), trainer, work / f"hf-{method}"),
    }
    return measure(contenders, rounds)


def population(work: Path, names: list[str], method: str, rounds: int) -> dict[str, float]:
    """Tokens/s of one run training `names` side by side vs each trained alone in its own run:
    the same epochs of the same models, so the difference is the population's overhead."""
    together, _ = setup(work, names, method)
    alone = [setup(work, [name], method)[0] for name in names]
    return measure({"one run": epochs_of([together]), "alone": epochs_of(alone)}, rounds)


def epochs_of(trainers: list[TrainingRun]) -> Epoch:
    """Each run's population trains one epoch (its epoch_start and progress events included)."""
    state = {"epoch": 0}

    def epoch() -> Callable[[], int]:
        state["epoch"] += 1
        done = state["epoch"]
        for trainer in trainers:
            trainer.population.train(done)
        return lambda: sum(
            b.tokens
            for trainer in trainers
            for member in trainer.population.members
            for b in member.batches(done)
        )

    return epoch


POPULATION = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]


def run(work: Path, model: str = "tiny-llama", rounds: int = 5) -> dict[str, Any]:
    """Every training bench; the figures for bench/results.json."""
    results: dict[str, Any] = {}
    for method in ("full", "lora"):
        speeds = bench(work, model, method, rounds)
        base = speeds["bare loop"]
        print(f"\n{method} fine-tuning of {model}, {rounds} interleaved rounds")
        print(f"  {'contender':<12} {'tokens/s':>12} {'vs bare':>9}")
        for name, speed in speeds.items():
            print(f"  {name:<12} {speed:>12,.0f} {speed / base:>9.3f}")
        prefix = "" if method == "full" else "lora_"
        results[f"{prefix}train_ratio_vs_bare"] = speeds["oneseek"] / base
        results[f"{prefix}train_ratio_vs_hf_trainer"] = speeds["oneseek"] / speeds["hf Trainer"]
        results[f"{prefix}train_tokens_per_second"] = speeds["oneseek"]
        results[f"{prefix}bare_tokens_per_second"] = base
        results[f"{prefix}hf_trainer_tokens_per_second"] = speeds["hf Trainer"]
    speeds = population(work, POPULATION, "lora", max(1, rounds - 2))
    ratio = speeds["one run"] / speeds["alone"]
    print(f"\n{len(POPULATION)} models (lora) in one run vs each alone")
    for name, speed in speeds.items():
        print(f"  {name:<12} {speed:>12,.0f} {speed / speeds['alone']:>9.3f}")
    results["population_ratio_vs_alone"] = ratio
    # time per token grows by (1/ratio - 1) over the 2 added models
    results["population_overhead_per_added_model"] = (1 / ratio - 1) / (len(POPULATION) - 1)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--quick", action="store_true", help="one round, for development")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(Path(tmp), args.model, 1 if args.quick else args.rounds)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(results)
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}: {json.dumps(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
