"""Per-epoch checkpoints: save/load round trip, atomic writes, pruning, and a run that is cut
off mid-epoch and resumed in a fresh trainer ending exactly where an uncut run ends."""

from __future__ import annotations

import errno
import json
import random
import resource
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from services.api import training_pb2
from services.api.codec import event_to_dict
from services.api.run_config import ADDED_LATER, config_from_body
from services.core.layout import certified_root
from services.core.verify import verify_run_folder
from services.training import checkpoints
from services.training.checkpoints import (
    CheckpointError,
    CheckpointMismatch,
    checkpoint_epochs,
    checkpoint_path,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from services.training.data import load_dataset
from services.training.events import EVENTS_FILE, EventLog, read_events
from services.training.member import capture_state, restore_state
from services.training.models import resolve_models
from services.training.population import (
    StepInfo,
    TrainingDiverged,
    TrainingRun,
    resumable_failure,
)
from services.training.run_folder import RunFolder, RunSummary

REPO = Path(__file__).resolve().parents[2]


# ---- the checkpoint files on their own (a tiny torch model, no transformers) ------------------


def tiny_model(seed: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model.get_submodule("0").bias.requires_grad_(False)  # frozen: not in the checkpoint
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_and_state(tmp_path: Path) -> None:
    model, optimizer = tiny_model(1)
    path = save_checkpoint(
        tmp_path, 2, {"weights": {"a": 1.25}}, {"a": capture_state(model, optimizer)}
    )
    assert path == checkpoint_path(tmp_path, 2) and checkpoint_epochs(tmp_path) == [2]

    other, other_optimizer = tiny_model(2)
    before = dict(model.named_parameters())
    assert not torch.equal(dict(other.named_parameters())["1.weight"], before["1.weight"])
    frozen = dict(other.named_parameters())["0.bias"].detach().clone()
    loaded = read_checkpoint(path)
    restore_state(other, other_optimizer, loaded.member_state("a"), str(path))
    for name, tensor in capture_state(model, optimizer).weights.items():
        assert torch.equal(dict(other.named_parameters())[name], tensor)
    # frozen parameters are left alone
    assert torch.equal(dict(other.named_parameters())["0.bias"], frozen)
    assert set(capture_state(other, other_optimizer).weights) == {"0.weight", "1.weight", "1.bias"}
    saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(restored["state"][key][name], value)
    assert loaded.epoch == 2 and loaded.state["weights"] == {"a": 1.25}


def test_a_checkpoint_for_another_model_is_refused(tmp_path: Path) -> None:
    model, optimizer = tiny_model(1)
    path = save_checkpoint(tmp_path, 1, {}, {"a": capture_state(model, optimizer)})
    saved = read_checkpoint(path).member_state("a")
    wider = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    wider.get_submodule("0").bias.requires_grad_(False)
    with pytest.raises(CheckpointMismatch, match="shape"):
        restore_state(wider, torch.optim.AdamW(wider.parameters()), saved, str(path))
    renamed = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointMismatch, match="does not fit"):
        restore_state(renamed, torch.optim.AdamW(renamed.parameters()), saved, str(path))


def test_a_failed_write_leaves_no_checkpoint_and_names_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = tiny_model(1)
    save_checkpoint(tmp_path, 1, {}, {"a": capture_state(model, optimizer)})

    real_write = checkpoints._write_file

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpoints, "_write_file", full_disk)
    with pytest.raises(CheckpointError) as failed:
        save_checkpoint(tmp_path, 2, {}, {"a": capture_state(model, optimizer)})
    message = failed.value.message
    assert "No space left on device" in message and "epoch 2" in message
    assert str(checkpoint_path(tmp_path, 2)) in message
    assert checkpoint_epochs(tmp_path) == [1]  # the older one is whole, the new one absent
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]


def test_a_torn_or_altered_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    model, optimizer = tiny_model(1)
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, {"n": epoch}, {"a": capture_state(model, optimizer)})
    # a crash before the rename leaves only a staging folder: never taken for a checkpoint
    staging = tmp_path / "checkpoints" / ".epoch-0004.staging"
    staging.mkdir()
    (staging / "state.json").write_text("{")
    weights = checkpoint_path(tmp_path, 3) / "models" / "a" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.epoch == 2 and latest.state["n"] == 2
    (checkpoint_path(tmp_path, 2) / "state.json").write_text("not json")
    fallback = latest_checkpoint(tmp_path)
    assert fallback is not None and fallback.epoch == 1
    assert latest_checkpoint(tmp_path / "nothing-here") is None


@settings(max_examples=40, deadline=None)
@given(
    epochs=st.sets(st.integers(1, 30), min_size=1, max_size=8),
    keep=st.sets(st.integers(1, 30), max_size=3),
)
def test_pruning_keeps_exactly_what_is_asked(epochs: set[int], keep: set[int]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "checkpoints"
        for epoch in epochs:
            (checkpoint_path(Path(folder), epoch)).mkdir(parents=True)
        (root / ".epoch-0099.staging").mkdir()
        removed = prune_checkpoints(Path(folder), keep)
        assert checkpoint_epochs(Path(folder)) == sorted(epochs & keep)
        assert removed == sorted(epochs - keep)
        assert not (root / ".epoch-0099.staging").exists()


def test_rng_state_round_trips() -> None:
    import numpy as np

    state = checkpoints.capture_rng()
    json.dumps(state)  # it lives in state.json
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoints.restore_rng(json.loads(json.dumps(state)))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize(
    ("error", "resumable"),
    [
        (TrainingDiverged("Model 'x' diverged"), False),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (CheckpointError("cannot write"), True),
        (MemoryError(), True),
        (RuntimeError("a bug"), False),
    ],
)
def test_which_failures_resuming_can_get_past(error: BaseException, resumable: bool) -> None:
    assert resumable_failure(error) is resumable


# ---- a real run, cut off and resumed ------------------------------------------------------------

MODELS = ["tiny-llama", "tiny-gpt2"]
REQUEST = {
    "datasetId": "small",
    "baseModels": MODELS,
    "epochs": 3,
    "learningRate": 2e-3,
    "autoStopThreshold": 0.0,
    "maxSeqLength": 32,
    "batchSize": 4,
    "refreshInterval": 0.01,
}


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so the trainer records nothing."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    models = root / "models"
    models.mkdir()
    for name in MODELS:
        (models / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    datasets = root / "datasets"
    datasets.mkdir()
    lines = (REPO / "datasets" / "sample.jsonl").read_text().splitlines()
    (datasets / "small.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (datasets / "long.jsonl").write_text("\n".join(lines[:170]) + "\n")
    return models, datasets


def trainer_for(
    workspace: tuple[Path, Path],
    run_id: str,
    *,
    sink: list[dict[str, Any]],
    start_seq: int = 0,
    resume_from: Path | None = None,
    on_step: Any = None,
    folder: RunFolder | None = None,
    names: list[str] = MODELS,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    **request: Any,
) -> TrainingRun:
    models, datasets = workspace
    config = config_from_body({**REQUEST, "baseModels": names, **request})
    if folder is None:
        folder = RunFolder.create(models, run_id)
        folder.write_manifest(config, [])

    def record(event: training_pb2.TrainingEvent) -> None:
        sink.append(event_to_dict(event))
        if on_event is not None:
            on_event(sink[-1])

    events = EventLog(run_id, path=folder.path / EVENTS_FILE, sinks=(record,), start_seq=start_seq)
    return TrainingRun(
        config,
        run_id=run_id,
        models=resolve_models(names, models),
        dataset=load_dataset(config.dataset_id, datasets),
        folder=folder,
        events=events,
        stop=threading.Event(),
        on_step=on_step,
        resume_from=resume_from,
    )


def resume_latest(
    workspace: tuple[Path, Path], run_id: str, sink: list[dict[str, Any]], **options: Any
) -> RunSummary:
    """The run resumed from its newest checkpoint, its events going on after those on disk."""
    run_dir = certified_root(workspace[0]) / run_id
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    start_seq = len(list(read_events(run_dir / EVENTS_FILE)))
    folder, path = RunFolder(run_dir), checkpoint.path
    return trainer_for(
        workspace,
        run_id,
        sink=sink,
        start_seq=start_seq,
        resume_from=path,
        folder=folder,
        **options,
    ).run()


@pytest.fixture(scope="module")
def uncut(workspace: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> RunSummary:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        patch.delenv("LEDGER_URL", raising=False)
        return trainer_for(workspace, "run-20260201-000001", sink=[]).run()


@pytest.mark.slow
def test_a_run_cut_off_mid_epoch_resumes_to_the_same_end(
    workspace: tuple[Path, Path], uncut: RunSummary, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("LEDGER_URL", raising=False)
    run_id = "run-20260201-000002"
    seen: list[dict[str, Any]] = []

    def cut(info: StepInfo) -> None:
        if info.epoch == 3 and info.step == 2:
            raise Killed

    with pytest.raises(Killed):
        trainer_for(workspace, run_id, sink=seen, on_step=cut).run()
    run_dir = workspace[0] / "oneseek-certified" / run_id
    kept = checkpoint_epochs(run_dir)
    assert kept[-1] == 2 and set(kept) <= {1, 2}  # the last, and the best if it is older
    assert seen[-1]["type"] == "progress" and seen[-1]["epoch"] == 3

    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.epoch == 2
    resumed = resume_latest(workspace, run_id, seen)

    assert resumed.status == training_pb2.RUN_STATUS_COMPLETED
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    logged = [event_to_dict(e) for e in read_events(run_dir / EVENTS_FILE)]
    assert logged == seen
    # the resumed run ends where the uncut one did: same losses, weights, best epochs
    results = json.loads((run_dir / "training_results.json").read_text())
    reference = json.loads((uncut.run_dir / "training_results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    for mine, theirs in zip(results["history"], reference["history"], strict=True):
        for name in MODELS:
            assert mine["val_losses"][name] == pytest.approx(theirs["val_losses"][name], rel=1e-5)
            assert mine["weights"][name] == pytest.approx(theirs["weights"][name], rel=1e-9)
    assert results["best_epochs"].keys() == reference["best_epochs"].keys()
    for name in MODELS:
        assert results["best_epochs"][name]["epoch"] == reference["best_epochs"][name]["epoch"]
    assert results["started_at"] == json.loads((run_dir / "run.json").read_text())["created_at"]
    assert verify_run_folder(run_dir).ok
    assert not (run_dir / "checkpoints").exists()  # a certified run has nothing to resume


@pytest.mark.slow
def test_a_full_disk_fails_the_run_saying_so(
    workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path))
    run_id = "run-20260201-000003"
    seen: list[dict[str, Any]] = []

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints, "_write_file", full_disk)
    outcome = trainer_for(workspace, run_id, sink=seen, names=["tiny-gpt2"]).run()
    assert outcome.status == training_pb2.RUN_STATUS_FAILED and outcome.resumable
    error = seen[-1]
    assert error["type"] == "training_error" and error["epoch"] == 1
    assert "No space left on device" in error["message"]
    assert f"{run_id}/checkpoints/epoch-0001" in error["message"]
    results = json.loads((outcome.run_dir / "training_results.json").read_text())
    assert results["resumable"] is True and results["error_seq"] == error["seq"]
    assert RunFolder(outcome.run_dir).failure_verdict(error["seq"]) is True


@pytest.mark.slow
def test_an_unwritable_event_log_still_ends_the_run(
    workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The event log is on the same full disk: the ending still reaches the service (the
    sinks), with no seq skipped, and the file keeps only whole lines."""
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path))
    seen: list[dict[str, Any]] = []
    real_append = EventLog._append
    full: list[bool] = []

    def append(self: EventLog, event: training_pb2.TrainingEvent) -> None:
        if self.path is not None and (event.HasField("epoch_end") or full):  # it stays full
            full.append(True)
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_append(self, event)

    monkeypatch.setattr(EventLog, "_append", append)
    outcome = trainer_for(workspace, "run-20260201-000004", sink=seen, names=["tiny-gpt2"]).run()
    assert outcome.status == training_pb2.RUN_STATUS_FAILED and outcome.resumable
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["type"] == "training_error"
    assert "No space left on device" in seen[-1]["message"]
    logged = list(read_events(outcome.run_dir / EVENTS_FILE))
    assert [e.seq for e in logged] == list(range(1, len(logged) + 1))
    assert len(logged) == len(seen) - 1  # all but the ending, which only the sinks got


# ---- an epoch is durable before it is announced ---------------------------------------------

STATE_KEYS = {
    *("run_id", "config", "dataset_sha256", "models", "weights", "auto_stop", "best"),
    *("history", "adjustments", "last_val_losses", "last_total", "steps_done"),
    *("step_seconds", "elapsed_seconds", "rng", "format", "epoch", "files"),
}
"""state.json's keys before announcements were checkpointed."""


def assert_each_epoch_once_in_order(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
    """The replay of events.jsonl: whole, every epoch started, ended and adjusted once and in
    the documented order, and training_results.json's history is the log's epoch_ends."""
    logged = [event_to_dict(e) for e in read_events(run_dir / EVENTS_FILE)]
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
    kinds = [(e["type"], e.get("epoch")) for e in logged if e["type"] != "progress"]
    per_epoch = ("epoch_start", "epoch_end", "weight_adjustment")
    expected = [(kind, n) for n in range(1, epochs + 1) for kind in per_epoch]
    assert kinds == [*expected, ("training_complete", None)]
    results = json.loads((run_dir / "training_results.json").read_text())
    assert results["status"] == "completed" and results["epochs_run"] == epochs
    assert results["history"] == [e for e in logged if e["type"] == "epoch_end"]
    report = verify_run_folder(run_dir)
    assert report.ok, report.problems
    return logged


@pytest.mark.slow
def test_an_epoch_checkpointed_but_never_announced_is_announced_once_on_resume(
    workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The disk fills up between epoch 1's checkpoint and its announcement (RLIMIT_FSIZE stands
    in for it, as in tests/faults): events.jsonl holds nothing of the announcement, but the
    epoch is durable. Resuming announces it with fresh seqs instead of training it again."""
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("LEDGER_URL", raising=False)
    run_id = "run-20260201-000005"
    run_dir = workspace[0] / "oneseek-certified" / run_id
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill_the_disk(event: dict[str, Any]) -> None:
        # after the epoch's last step the log may not grow, while the checkpoint's files (each
        # smaller than the log by then: one step is one progress event) may be written
        last_step = event["type"] == "progress" and event["step"] == event["total_steps"]
        if last_step and event["epoch"] == 1:
            size = (run_dir / EVENTS_FILE).stat().st_size
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    seen: list[dict[str, Any]] = []
    # one step per record, each with a progress event: the log outgrows every checkpoint file
    request = {"datasetId": "long", "epochs": 2, "batchSize": 1, "refreshInterval": 1e-9}
    first = trainer_for(
        workspace, run_id, sink=seen, names=["tiny-gpt2"], on_event=fill_the_disk, **request
    )
    try:
        failed = first.run()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.status == training_pb2.RUN_STATUS_FAILED and failed.resumable, failed.error
    assert "File too large" in str(failed.error)
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.epoch == 1
    assert set(checkpoint.state) == STATE_KEYS | {"announcement"}
    assert [e["type"] for e in checkpoint.state["announcement"]] == [
        "epoch_end",
        "weight_adjustment",
    ]
    on_disk = list(read_events(run_dir / EVENTS_FILE))
    assert {e.WhichOneof("payload") for e in on_disk} == {"epoch_start", "progress"}

    resumed = resume_latest(workspace, run_id, seen, names=["tiny-gpt2"], **request)

    assert resumed.status == training_pb2.RUN_STATUS_COMPLETED, resumed.error
    logged = assert_each_epoch_once_in_order(run_dir, epochs=2)
    # the announcement came first after the resume, with the seqs that follow the log's
    announced = logged[len(on_disk) : len(on_disk) + 2]
    assert [(e["type"], e["seq"]) for e in announced] == [
        ("epoch_end", len(on_disk) + 1),
        ("weight_adjustment", len(on_disk) + 2),
    ]
    stamped = checkpoint.state["announcement"][0]
    assert announced[0]["val_losses"] == stamped["val_losses"]
    assert announced[0]["weights"] == stamped["weights"]
    assert announced[0]["timestamp"] >= stamped["timestamp"]


@pytest.mark.slow
def test_a_death_right_after_an_epoch_end_does_not_train_the_epoch_again(
    workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The process dies the moment epoch 1's epoch_end is in the log (its watcher raising what
    the trainer does not catch, as SIGKILL would): the epoch was checkpointed before, so the
    resumed run goes on with epoch 2 and first sends the weight_adjustment the log lacks."""
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("LEDGER_URL", raising=False)
    run_id = "run-20260201-000006"
    run_dir = workspace[0] / "oneseek-certified" / run_id
    seen: list[dict[str, Any]] = []

    def die_at_epoch_end(event: dict[str, Any]) -> None:
        if event["type"] == "epoch_end":
            raise Killed

    with pytest.raises(Killed):
        trainer_for(workspace, run_id, sink=seen, on_event=die_at_epoch_end).run()
    on_disk = list(read_events(run_dir / EVENTS_FILE))
    assert on_disk[-1].WhichOneof("payload") == "epoch_end" and on_disk[-1].epoch_end.epoch == 1
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.epoch == 1
    assert not (run_dir / "adapters" / MODELS[0]).exists()  # it died before saving them

    resumed = resume_latest(workspace, run_id, seen)

    assert resumed.status == training_pb2.RUN_STATUS_COMPLETED, resumed.error
    logged = assert_each_epoch_once_in_order(run_dir, epochs=3)
    assert logged == seen  # what the watchers saw is what the log holds
    first_end = next(e for e in logged if e["type"] == "epoch_end")
    assert first_end == event_to_dict(on_disk[-1])  # the logged one stands, not a second
    live = json.loads((run_dir / "live_metrics.json").read_text())
    assert live["status"] == "completed" and live["current_epoch"] == 3


@pytest.mark.slow
def test_a_checkpoint_older_than_the_memory_options_resumes(
    workspace: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run checkpointed before precision, gradientCheckpointing and quantization existed
    (its run.json and state.json lack them) resumes as the fp32 run it was."""
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("LEDGER_URL", raising=False)
    run_id, seen = "run-20260201-000009", []

    def cut(info: StepInfo) -> None:
        if info.epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        trainer_for(workspace, run_id, sink=seen, on_step=cut, names=["tiny-gpt2"]).run()
    run_dir = certified_root(workspace[0]) / run_id
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.epoch == 1
    for path, at in ((checkpoint.path / "state.json", "config"), (run_dir / "run.json", "config")):
        data = json.loads(path.read_text())
        for key in ADDED_LATER:
            del data[at][key]
        path.write_text(json.dumps(data))
    resumed = resume_latest(workspace, run_id, seen, names=["tiny-gpt2"], precision="fp32")
    assert resumed.status == training_pb2.RUN_STATUS_COMPLETED, resumed.error
    assert resumed.config.precision == training_pb2.PRECISION_FP32
