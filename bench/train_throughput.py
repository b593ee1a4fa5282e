"""Trainer throughput: our population trainer vs a bare PyTorch loop vs the transformers Trainer.

Same tiny model, same data, same padded batches, same optimizer and learning rate. Each
contender is warmed up once (first-time kernel set-up per shape), then the timed epochs are
interleaved round by round so machine noise hits all of them alike. Prints tokens/s and the
ratios, and merges them into bench/results.json.

    .venv/bin/python bench/train_throughput.py [--rounds 5] [--model tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from services.core.training_config import RunConfig  # noqa: E402
from services.training.data import Batch, load_dataset, make_batches  # noqa: E402
from services.training.demo_assets import create_demo_assets  # noqa: E402
from services.training.events import EventLog  # noqa: E402
from services.training.models import discover_models, load_model  # noqa: E402
from services.training.population import PopulationTrainer, derive_seed  # noqa: E402
from services.training.run_folder import RunFolder  # noqa: E402

RESULTS = REPO / "bench" / "results.json"
LR = 1e-4
Epoch = Callable[[], int]  # trains one epoch, returns the tokens it processed


def lora_wrap(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, task_type="CAUSAL_LM")
    return get_peft_model(model, config)  # type: ignore[no-any-return]


def ours(trainer: PopulationTrainer) -> Epoch:
    slot = trainer.slots[0]
    state = {"epoch": 0}

    def epoch() -> int:
        state["epoch"] += 1
        trainer.train_epoch(slot, state["epoch"])
        return sum(b.tokens for b in batches_of(trainer, state["epoch"]))

    return epoch


def batches_of(trainer: PopulationTrainer, epoch: int) -> list[Batch]:
    slot = trainer.slots[0]
    return make_batches(
        slot.train_examples,
        trainer.config.batch_size,
        slot.tokenizer.pad_token_id,
        shuffle_seed=derive_seed(trainer.config.seed, "shuffle", epoch),
    )


def bare(model: torch.nn.Module, trainer: PopulationTrainer) -> Epoch:
    """The loop every PyTorch tutorial writes: nothing but forward, backward, step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    state = {"epoch": 0}

    def epoch() -> int:
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
        return sum(b.tokens for b in batches)

    return epoch


def hf_trainer(model: torch.nn.Module, trainer: PopulationTrainer, out: Path) -> Epoch:
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

    def epoch() -> int:
        hf.train()
        return tokens

    return epoch


def measure(contenders: dict[str, Epoch], rounds: int) -> dict[str, float]:
    """Median tokens/s per contender; one warm-up epoch each, then interleaved rounds."""
    for run in contenders.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            started = time.perf_counter()
            tokens = contenders[name]()
            samples[name].append(tokens / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in samples.items()}


def setup(work: Path, model_name: str, method: str) -> tuple[PopulationTrainer, Any]:
    models_dir, datasets_dir = work / "models", REPO / "datasets"
    if not discover_models(models_dir):
        create_demo_assets(models_dir, work / "datasets", log=lambda _: None)
    info = next(m for m in discover_models(models_dir) if m.name == model_name)
    config = RunConfig.from_request(
        {
            "datasetId": "sample",
            "baseModels": [model_name],
            "method": method,
            "learningRate": LR,
            "epochs": 100,
            "refreshInterval": 5,
        }
    )
    run_id = f"run-20260101-00000{1 if method == 'full' else 2}"
    trainer = PopulationTrainer(
        config,
        run_id=run_id,
        models=[info],
        dataset=load_dataset("sample", datasets_dir),
        folder=RunFolder.create(models_dir, run_id),
        events=EventLog(run_id),
    )
    trainer.prepare()
    return trainer, info


def bench(work: Path, model_name: str, method: str, rounds: int) -> dict[str, float]:
    trainer, info = setup(work, model_name, method)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        model = load_model(info, torch.device("cpu"))
        return lora_wrap(model, trainer.config.lora_rank) if method == "lora" else model

    contenders = {
        "oneseek": ours(trainer),
        "bare loop": bare(fresh(), trainer),
        "hf Trainer": hf_trainer(fresh(), trainer, work / f"hf-{method}"),
    }
    return measure(contenders, rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="tiny-llama")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("full", "lora"):
            speeds = bench(Path(tmp), args.model, method, args.rounds)
            base = speeds["bare loop"]
            print(f"\n{method} fine-tuning of {args.model}, {args.rounds} interleaved rounds")
            print(f"  {'contender':<12} {'tokens/s':>12} {'vs bare':>9}")
            for name, speed in speeds.items():
                print(f"  {name:<12} {speed:>12,.0f} {speed / base:>9.3f}")
            if method == "full":
                results["train_ratio_vs_bare"] = speeds["oneseek"] / base
                results["train_ratio_vs_hf_trainer"] = speeds["oneseek"] / speeds["hf Trainer"]
                results["train_tokens_per_second"] = speeds["oneseek"]
            else:
                results["lora_train_ratio_vs_bare"] = speeds["oneseek"] / base
                results["lora_train_ratio_vs_hf_trainer"] = speeds["oneseek"] / speeds["hf Trainer"]
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(results)
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}: {json.dumps(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
