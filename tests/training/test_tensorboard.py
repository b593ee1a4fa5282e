"""TensorBoard event files of a run, read back with TensorBoard's own reader: a real short run
of tiny models against its events and training_results.json; an epoch trained again after a
crash (resume) or a restart shows once; a log that cannot be written never fails a run."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.api import training_pb2
from services.api.codec import event_to_dict
from services.api.run_config import config_from_body
from services.core.layout import RESULTS_FILE, TENSORBOARD_DIR
from services.core.verify import verify_run_folder
from services.training.checkpoints import latest_checkpoint
from services.training.data import load_dataset
from services.training.events import EVENTS_FILE, EventLog
from services.training.models import resolve_models
from services.training.population import StepInfo, TrainingRun
from services.training.run_folder import RunFolder
from services.training.tensorboard_log import TensorBoardLog

REPO = Path(__file__).resolve().parents[2]
MODELS = ["tiny-llama", "tiny-gpt2"]
Series = dict[str, list[tuple[int, float]]]


def read_board(folder: Path) -> Series:
    """Every scalar series of one TensorBoard run folder, as TensorBoard reads it; nothing
    purged, so a step written twice would show twice."""
    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    reader.Reload()
    return {
        tag: [(event.step, event.value) for event in reader.Scalars(tag)]
        for tag in reader.Tags()["scalars"]
    }


def runs_of(root: Path) -> list[str]:
    """The TensorBoard runs under `root`: the folders holding event files."""
    return sorted(
        str(path.parent.relative_to(root)) for path in root.rglob("events.out.tfevents.*")
    )


def close_to(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Steps equal, values equal up to float32 (TensorBoard keeps scalars as float32)."""
    return [s for s, _ in actual] == [s for s, _ in expected] and all(
        v == pytest.approx(w, rel=1e-6, abs=1e-7)
        for (_, v), (_, w) in zip(actual, expected, strict=True)
    )


# ---- a real short run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    run_dir: Path
    events: list[dict[str, Any]]
    results: dict[str, Any]


class Killed(BaseException):
    """The worker dying mid-step (no handler in the run catches it)."""


def trainer(
    models: Path,
    folder: RunFolder,
    events: list[dict[str, Any]],
    *,
    on_step: Any = None,
    resume_from: Path | None = None,
) -> TrainingRun:
    """Two epochs of two tiny models, their events into `events` and the run's events.jsonl."""
    config = config_from_body(
        {
            "datasetId": "sample",
            "baseModels": MODELS,
            "epochs": 2,
            "learningRate": 2e-3,
            "batchSize": 16,
            "maxSeqLength": 48,
            "refreshInterval": 0.001,  # a progress event at (nearly) every step
        }
    )
    return TrainingRun(
        config,
        run_id=folder.run_id,
        models=resolve_models(MODELS, models),
        dataset=load_dataset("sample", REPO / "datasets"),
        folder=folder,
        events=EventLog(
            folder.run_id,
            path=folder.path / EVENTS_FILE,
            sinks=(lambda e: events.append(event_to_dict(e)),),
            start_seq=len(events),
        ),
        stop=threading.Event(),
        on_step=on_step,
        resume_from=resume_from,
    )


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tensorboard")
    models = root / "models"
    models.mkdir()
    for name in MODELS:
        (models / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(root / "var"))
        patch.delenv("LEDGER_URL", raising=False)
        patch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
        patch.delenv("ONESEEK_MODEL_SIGNING_KEY_PATH", raising=False)
        yield models


@pytest.fixture(scope="module")
def trained(models_root: Path) -> Trained:
    folder = RunFolder.create(models_root, "run-20260401-000001")
    events: list[dict[str, Any]] = []
    summary = trainer(models_root, folder, events).run()
    assert summary.error is None, summary.error
    results = json.loads((folder.path / RESULTS_FILE).read_text())
    return Trained(folder.path, events, results)


@pytest.mark.slow
def test_every_model_and_the_population_is_a_tensorboard_run(trained: Trained) -> None:
    root = trained.run_dir / TENSORBOARD_DIR
    assert runs_of(root) == ["models/tiny-gpt2", "models/tiny-llama", "population"]


@pytest.mark.slow
def test_the_train_loss_is_every_logged_step_at_its_global_step(trained: Trained) -> None:
    for model in MODELS:
        progress = [e for e in trained.events if e["type"] == "progress" and e["model"] == model]
        assert len(progress) > 2
        expected = [
            ((e["epoch"] - 1) * e["total_steps"] + e["step"], e["train_loss"]) for e in progress
        ]
        steps = [step for step, _ in expected]
        assert steps == sorted(set(steps))  # one point per step, rising across both epochs
        board = read_board(trained.run_dir / TENSORBOARD_DIR / "models" / model)
        assert close_to(board["train/loss"], expected)


@pytest.mark.slow
def test_the_epoch_series_are_training_results_history(trained: Trained) -> None:
    history = trained.results["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    fields = {
        "epoch/train_loss": "train_losses",
        "epoch/val_loss": "val_losses",
        "epoch/weight": "weights",
        "epoch/learning_rate": "lr_multipliers",
    }
    for model in MODELS:
        board = read_board(trained.run_dir / TENSORBOARD_DIR / "models" / model)
        assert set(board) == {"train/loss", *fields}
        for tag, field in fields.items():
            expected = [(h["epoch"], h[field][model]) for h in history]
            assert close_to(board[tag], expected), tag
    # the final weights and learning rates are the last epoch's
    last = read_board(trained.run_dir / TENSORBOARD_DIR / "models" / "tiny-llama")
    assert last["epoch/weight"][-1][1] == pytest.approx(
        trained.results["final_weights"]["tiny-llama"], rel=1e-6
    )
    population = read_board(trained.run_dir / TENSORBOARD_DIR / "population")
    assert close_to(
        population["epoch/population_loss"], [(h["epoch"], h["total_loss"]) for h in history]
    )


@pytest.mark.slow
def test_the_tensorboard_files_are_a_log_outside_the_certificate(trained: Trained) -> None:
    report = verify_run_folder(trained.run_dir)
    assert report.ok, report.problems
    assert not any(TENSORBOARD_DIR in note or "events.jsonl" in note for note in report.notes)
    dna = json.loads((trained.run_dir / "oneseek_dna.json").read_text())
    assert TENSORBOARD_DIR not in json.dumps(dna)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_shows_each_step_once(models_root: Path) -> None:
    folder = RunFolder.create(models_root, "run-20260401-000006")
    events: list[dict[str, Any]] = []

    def kill(info: StepInfo) -> None:
        if info.epoch == 2 and info.step == 3:
            raise Killed

    with pytest.raises(Killed):
        trainer(models_root, folder, events, on_step=kill).run()
    abandoned = [e for e in events if e["type"] == "progress" and e["epoch"] == 2]
    assert abandoned  # epoch 2's first steps were logged, and will be trained again
    checkpoint = latest_checkpoint(folder.path)
    assert checkpoint is not None and checkpoint.epoch == 1
    resumed = trainer(models_root, RunFolder(folder.path), events, resume_from=checkpoint.path)
    assert resumed.run().error is None

    results = json.loads((folder.path / RESULTS_FILE).read_text())
    restart = max(i for i, e in enumerate(events) if e["type"] == "epoch_start")
    for model in MODELS:
        final = [
            e
            for i, e in enumerate(events)
            if e["type"] == "progress" and e["model"] == model and (e["epoch"] == 1 or i > restart)
        ]
        expected = [
            ((e["epoch"] - 1) * e["total_steps"] + e["step"], e["train_loss"]) for e in final
        ]
        board = read_board(folder.path / TENSORBOARD_DIR / "models" / model)
        assert close_to(board["train/loss"], expected)
        steps = [step for step, _ in board["train/loss"]]
        assert steps == sorted(set(steps))
        assert close_to(
            board["epoch/val_loss"],
            [(h["epoch"], h["val_losses"][model]) for h in results["history"]],
        )


# ---- resumes and restarts, from events ----------------------------------------------------


def _end(epoch: int, losses: dict[str, float]) -> training_pb2.EpochEnd:
    end = training_pb2.EpochEnd(epoch=epoch, current_epoch=epoch, total_epochs=3, total_loss=1.5)
    end.val_losses.update(losses)
    end.train_losses.update({m: v + 0.5 for m, v in losses.items()})
    end.weights.update({m: 1.0 for m in losses})
    end.lr_multipliers.update({m: 1e-3 for m in losses})
    return end


def _steps(log: EventLog, epoch: int, steps: list[int], loss: float) -> None:
    for step in steps:
        progress = training_pb2.Progress(
            epoch=epoch, model="a", step=step, total_steps=4, train_loss=loss + step / 100
        )
        log.emit("progress", progress)


def test_a_resumed_run_rebuilds_its_files_without_the_abandoned_steps(tmp_path: Path) -> None:
    events, root = tmp_path / EVENTS_FILE, tmp_path / TENSORBOARD_DIR
    first = EventLog("run-20260401-000002", path=events)
    board = TensorBoardLog.follow(root, first)
    first.emit("epoch_start", training_pb2.EpochStart(epoch=1, total_epochs=3))
    _steps(first, 1, [2, 4], loss=3.0)
    first.emit("epoch_end", _end(1, {"a": 2.0}))
    first.emit("epoch_start", training_pb2.EpochStart(epoch=2, total_epochs=3))
    _steps(first, 2, [1, 3], loss=9.0)  # written, then the worker dies mid-epoch
    board.write(flush=True)
    board._close()
    first.close()
    assert [s for s, _ in read_board(root / "models" / "a")["train/loss"]] == [2, 4, 5, 7]

    second = EventLog("run-20260401-000002", path=events, start_seq=first.seq)
    board = TensorBoardLog.follow(root, second)  # resuming after epoch 1
    second.emit("epoch_start", training_pb2.EpochStart(epoch=2, total_epochs=3))
    _steps(second, 2, [2, 4], loss=2.0)
    second.emit("epoch_end", _end(2, {"a": 1.8}))
    second.close()
    board.close()

    series = read_board(root / "models" / "a")
    assert series["train/loss"] == [
        (2, pytest.approx(3.02)),
        (4, pytest.approx(3.04)),
        (6, pytest.approx(2.02)),
        (8, pytest.approx(2.04)),
    ]
    assert series["epoch/val_loss"] == [(1, 2.0), (2, pytest.approx(1.8))]
    assert read_board(root / "population")["epoch/population_loss"] == [(1, 1.5), (2, 1.5)]
    assert runs_of(root) == ["models/a", "population"]


def test_an_epoch_restarted_in_the_same_process_shows_once(tmp_path: Path) -> None:
    log = EventLog("run-20260401-000003")
    board = TensorBoardLog.follow(tmp_path / TENSORBOARD_DIR, log)
    log.emit("epoch_start", training_pb2.EpochStart(epoch=1, total_epochs=3))
    _steps(log, 1, [1, 2, 3], loss=5.0)  # a member is lost: the epoch starts again
    log.emit("epoch_start", training_pb2.EpochStart(epoch=1, total_epochs=3))
    _steps(log, 1, [2], loss=4.0)
    log.emit("epoch_end", _end(1, {"a": 3.0}))
    board.close()
    series = read_board(tmp_path / TENSORBOARD_DIR / "models" / "a")
    assert series["train/loss"] == [(2, pytest.approx(4.02))]


def test_a_stopped_run_keeps_the_steps_of_its_unfinished_epoch(tmp_path: Path) -> None:
    log = EventLog("run-20260401-000004")
    board = TensorBoardLog.follow(tmp_path / TENSORBOARD_DIR, log)
    log.emit("epoch_start", training_pb2.EpochStart(epoch=1, total_epochs=3))
    _steps(log, 1, [1, 2], loss=5.0)
    log.emit(
        "training_complete", training_pb2.TrainingComplete(status=training_pb2.RUN_STATUS_STOPPED)
    )
    # flushed at the run's end, before any close
    series = read_board(tmp_path / TENSORBOARD_DIR / "models" / "a")
    assert [step for step, _ in series["train/loss"]] == [1, 2]
    board.close()


def test_a_log_that_cannot_be_written_never_fails_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / TENSORBOARD_DIR
    root.write_text("a file where the folder should be")
    log = EventLog("run-20260401-000005", path=tmp_path / EVENTS_FILE)
    board = TensorBoardLog.follow(root, log)
    with caplog.at_level(logging.WARNING, logger="oneseek.training.tensorboard"):
        log.emit("epoch_start", training_pb2.EpochStart(epoch=1, total_epochs=3))
        _steps(log, 1, [1], loss=5.0)
        log.emit("epoch_end", _end(1, {"a": 3.0}))
    log.close()
    board.close()
    assert "not written for the rest of this run" in caplog.text
    assert log.seq == 3 and len((tmp_path / EVENTS_FILE).read_text().splitlines()) == 3
