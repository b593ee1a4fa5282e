"""The population trainer on real tiny models: events, rules, run folder, stop, failure."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from services.api import training_pb2
from services.api.codec import event_to_dict
from services.api.run_config import RunConfig, config_from_body
from services.core.verify import verify_run_folder
from services.training.data import load_dataset
from services.training.events import EVENTS_FILE, EventLog, read_events
from services.training.models import resolve_models
from services.training.population import StepInfo, TrainingRun
from services.training.run_folder import RunFolder, RunSummary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    outcome: RunSummary
    events: list[dict[str, Any]]
    config: RunConfig


def train(
    models_dir: Path,
    datasets_dir: Path,
    run_id: str,
    *,
    stop: threading.Event | None = None,
    on_step: Any = None,
    **request: Any,
) -> Run:
    config = config_from_body({"datasetId": "small", **request})
    folder = RunFolder.create(models_dir, run_id)
    events: list[dict[str, Any]] = []
    log = EventLog(
        run_id,
        path=folder.path / EVENTS_FILE,
        sinks=(lambda e: events.append(event_to_dict(e)),),
    )
    trainer = TrainingRun(
        config,
        run_id=run_id,
        models=resolve_models(list(config.base_models), models_dir),
        dataset=load_dataset(config.dataset_id, datasets_dir),
        folder=folder,
        events=log,
        stop=stop,
        on_step=on_step,
    )
    return Run(trainer.run(), events, config)


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path
) -> Iterator[tuple[Path, Path]]:
    """A models dir linking the demo models, and a 'small' dataset (80 sample records)."""
    root = tmp_path_factory.mktemp("population")
    models = root / "models"
    models.mkdir()
    for model in demo_models_dir.iterdir():
        if (model / "config.json").exists():
            (models / model.name).symlink_to(model, target_is_directory=True)
    datasets = root / "datasets"
    datasets.mkdir()
    lines = (REPO / "datasets" / "sample.jsonl").read_text().splitlines()[:80]
    (datasets / "small.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(root / "var"))
        patch.delenv("LEDGER_URL", raising=False)
        patch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
        yield models, datasets


@pytest.fixture(scope="module")
def four_epochs(workspace: tuple[Path, Path]) -> Run:
    models, datasets = workspace
    return train(
        models,
        datasets,
        "run-20260101-000001",
        baseModels=["tiny-llama", "tiny-qwen2", "tiny-gpt2"],
        epochs=4,
        learningRate=2e-3,
        autoStopThreshold=0.0,  # never fires: all four epochs run
        refreshInterval=0.05,
    )


# ---- an independent reading of docs/rules.md ----------------------------------------


def expected_weights(prev: dict[str, float], losses: dict[str, float]) -> dict[str, float]:
    lo, hi, boost, penalty = 0.5, 1.5, 0.3, 0.4
    ranked = sorted(losses, key=lambda m: (losses[m], m))
    raw = dict(prev)
    raw[ranked[0]] *= 1 + boost
    raw[ranked[-1]] *= 1 - penalty

    def total(c: float) -> float:
        return sum(min(hi, max(lo, c * r)) for r in raw.values())

    a, b = 0.0, 100.0
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if total(mid) < len(raw) else (a, mid)
    return {m: min(hi, max(lo, a * r)) for m, r in raw.items()}


def test_events_follow_the_documented_order(four_epochs: Run) -> None:
    events = four_epochs.events
    assert four_epochs.outcome.status == training_pb2.RUN_STATUS_COMPLETED
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    kinds = [e["type"] for e in events if e["type"] != "progress"]
    per_epoch = ["epoch_start", "epoch_end", "weight_adjustment"]
    assert kinds == per_epoch * 4 + ["training_complete"]
    progress = [e for e in events if e["type"] == "progress"]
    assert {p["model"] for p in progress} == {"tiny-llama", "tiny-qwen2", "tiny-gpt2"}
    for p in progress:
        assert 0 <= p["progress_percent"] <= 100
        assert p["tokens_per_second"] > 0 and math.isfinite(p["train_loss"])
    ends = [e for e in events if e["type"] == "epoch_end"]
    assert [e["progress_percent"] for e in ends] == pytest.approx([25, 50, 75, 100])
    # the events the sinks saw are exactly the ones in the run's log
    logged = [event_to_dict(e) for e in read_events(four_epochs.outcome.run_dir / EVENTS_FILE)]
    assert logged == events


def test_every_epoch_follows_the_rules(four_epochs: Run) -> None:
    lr = four_epochs.config.learning_rate
    weights = dict.fromkeys(four_epochs.config.base_models, 1.0)
    totals: list[float] = []
    streak = 0
    events = four_epochs.events
    ends = [e for e in events if e["type"] == "epoch_end"]
    adjustments = [e for e in events if e["type"] == "weight_adjustment"]
    starts = [e for e in events if e["type"] == "epoch_start"]
    for epoch, (start, end, adj) in enumerate(zip(starts, ends, adjustments, strict=True), start=1):
        assert start["weights"] == pytest.approx(weights, abs=1e-12)
        losses = end["val_losses"]
        n = len(losses)
        total = sum(weights[m] / n * losses[m] for m in losses)
        assert end["total_loss"] == pytest.approx(total, rel=1e-12)
        new = expected_weights(weights, losses)
        assert end["weights"] == pytest.approx(new, abs=1e-9)
        assert sum(end["weights"].values()) == pytest.approx(n, abs=1e-9)
        assert end["lr_multipliers"] == pytest.approx({m: lr * w for m, w in new.items()})
        assert adj["applied_lrs"] == pytest.approx(end["lr_multipliers"], rel=1e-12)
        assert adj["ranking"] == sorted(losses, key=lambda m: (losses[m], m))
        assert adj["previous_weights"] == pytest.approx(weights)
        change = abs(total - totals[-1]) if totals else None
        streak = streak + 1 if change is not None and change < 0.0 else 0
        info = end["auto_stop_info"]
        assert info["current_change"] == (None if change is None else pytest.approx(change))
        assert info["streak"] == streak and info["remaining"] == 3 - streak
        assert info["triggered"] is False
        assert end["epoch"] == epoch and end["total_epochs"] == 4
        totals.append(total)
        weights = new
    done = events[-1]
    assert done["weights"] == pytest.approx(weights)
    assert done["best_model"] == min(ends[-1]["val_losses"].items(), key=lambda x: x[1])[0]
    assert done["epochs_run"] == 4 and done["dna"].startswith("dna-v2:")


def test_models_learn(four_epochs: Run) -> None:
    ends = [e for e in four_epochs.events if e["type"] == "epoch_end"]
    for model in four_epochs.config.base_models:
        assert ends[-1]["val_losses"][model] < ends[0]["val_losses"][model]


def test_run_folder_is_complete_and_verifies(four_epochs: Run) -> None:
    run_dir = four_epochs.outcome.run_dir
    for name in ("live_metrics.json", "training_results.json", "oneseek_dna.json"):
        assert (run_dir / name).is_file()
    for model in four_epochs.config.base_models:
        assert (run_dir / "adapters" / model / "adapter_model.safetensors").is_file()
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*.staging"))
    results = json.loads((run_dir / "training_results.json").read_text())
    ends = [e for e in four_epochs.events if e["type"] == "epoch_end"]
    assert results["status"] == "completed" and results["history"] == ends
    assert results["final_weights"] == ends[-1]["weights"]
    for model, best in results["best_epochs"].items():
        losses = [e["val_losses"][model] for e in ends]
        assert best["val_loss"] == min(losses) and best["epoch"] == losses.index(min(losses)) + 1
    live = json.loads((run_dir / "live_metrics.json").read_text())
    assert live["status"] == "completed" and live["progress_percent"] == 100
    assert live["val_losses"] == ends[-1]["val_losses"]
    proof = json.loads((run_dir / "ledger_proof.json").read_text())
    assert proof["ledger"] is None and proof["algorithm"] == "ed25519"
    report = verify_run_folder(run_dir)
    assert report.ok, report.problems


def test_auto_stop_ends_the_run_at_epoch_two(workspace: tuple[Path, Path]) -> None:
    models, datasets = workspace
    run = train(
        models,
        datasets,
        "run-20260101-000002",
        baseModels=["tiny-llama", "tiny-gpt2"],
        epochs=10,
        autoStopThreshold=10,
        autoStopPatience=1,
        minEpochs=2,
    )
    assert run.outcome.status == training_pb2.RUN_STATUS_AUTO_STOPPED
    assert run.outcome.epochs_run == 2
    kinds = [e["type"] for e in run.events if e["type"] != "progress"]
    assert kinds[-3:] == ["weight_adjustment", "auto_stop_triggered", "training_complete"]
    fired = run.events[-2]
    assert fired["epoch"] == 2 and fired["auto_stop_info"]["triggered"] is True
    totals = [e["total_loss"] for e in run.events if e["type"] == "epoch_end"]
    assert fired["window"] == totals
    done = run.events[-1]
    assert done["status"] == "auto_stopped" and done["epochs_run"] == 2
    assert verify_run_folder(run.outcome.run_dir).ok


def test_same_seed_same_losses(workspace: tuple[Path, Path]) -> None:
    models, datasets = workspace
    losses = []
    for run_id in ("run-20260101-000003", "run-20260101-000004"):
        run = train(models, datasets, run_id, baseModels=["tiny-llama"], epochs=2, seed=7)
        losses.append([e["val_losses"] for e in run.events if e["type"] == "epoch_end"])
    assert losses[0] == losses[1]
    other = train(
        models, datasets, "run-20260101-000005", baseModels=["tiny-llama"], epochs=2, seed=8
    )
    assert [e["val_losses"] for e in other.events if e["type"] == "epoch_end"] != losses[0]


def test_single_model_keeps_weight_one(workspace: tuple[Path, Path]) -> None:
    models, datasets = workspace
    run = train(models, datasets, "run-20260101-000006", baseModels=["tiny-qwen2"], epochs=2)
    for end in (e for e in run.events if e["type"] == "epoch_end"):
        assert end["weights"] == {"tiny-qwen2": 1.0}


def test_cooperative_stop_writes_a_verified_folder(workspace: tuple[Path, Path]) -> None:
    models, datasets = workspace
    stop = threading.Event()
    seen: list[StepInfo] = []

    def on_step(info: StepInfo) -> None:
        seen.append(info)
        if info.epoch == 2 and info.step == 3:
            stop.set()

    run = train(
        models,
        datasets,
        "run-20260101-000007",
        stop=stop,
        on_step=on_step,
        baseModels=["tiny-llama", "tiny-gpt2"],
        epochs=5,
    )
    assert run.outcome.status == training_pb2.RUN_STATUS_STOPPED
    assert run.outcome.epochs_run == 1
    assert seen[-1].epoch == 2 and seen[-1].step == 3  # the step in flight finished, no more
    assert run.events[-1]["type"] == "training_complete"
    assert run.events[-1]["status"] == "stopped"
    results = json.loads((run.outcome.run_dir / "training_results.json").read_text())
    assert results["status"] == "stopped" and results["epochs_run"] == 1
    assert verify_run_folder(run.outcome.run_dir).ok


def test_full_fine_tuning_saves_full_weights(workspace: tuple[Path, Path]) -> None:
    models, datasets = workspace
    run = train(
        models, datasets, "run-20260101-000008", baseModels=["tiny-gpt2"], epochs=1, method="full"
    )
    assert run.outcome.status == training_pb2.RUN_STATUS_COMPLETED
    adapter = run.outcome.run_dir / "adapters" / "tiny-gpt2"
    assert (adapter / "model.safetensors").is_file() and (adapter / "config.json").is_file()
    assert verify_run_folder(run.outcome.run_dir).ok


def test_nan_loss_fails_naming_the_model(workspace: tuple[Path, Path], tmp_path: Path) -> None:
    models, datasets = workspace
    broken = models / "tiny-broken"
    broken.mkdir()
    source = models / "tiny-llama"
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(source / "model.safetensors")
    name = next(k for k in tensors if "norm" in k)
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    run = train(
        models, datasets, "run-20260101-000009", baseModels=["tiny-llama", "tiny-broken"], epochs=3
    )
    assert run.outcome.status == training_pb2.RUN_STATUS_FAILED
    error = run.events[-1]
    assert error["type"] == "training_error" and error["status"] == "failed"
    assert "tiny-broken" in error["message"] and error["epoch"] == 1
    assert "tiny-llama'" not in error["message"]
    results = json.loads((run.outcome.run_dir / "training_results.json").read_text())
    assert results["status"] == "failed" and "tiny-broken" in results["error"]
