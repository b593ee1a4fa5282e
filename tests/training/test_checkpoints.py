"""Per-epoch checkpoints: save/load round trip, atomic writes, pruning, and a run that is cut
off mid-epoch and resumed in a fresh trainer ending exactly where an uncut run ends."""

from __future__ import annotations

import errno
import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from services.api import training_pb2
from services.api.codec import event_to_dict
from services.api.run_config import config_from_body
from services.core.verify import verify_run_folder
from services.training import checkpoints
from services.training.checkpoints import (
    CheckpointError,
    checkpoint_epochs,
    checkpoint_path,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    restore_optimizer,
    restore_trainable,
    save_checkpoint,
    trainable_state,
)
from services.training.data import load_dataset
from services.training.events import EVENTS_FILE, EventLog, read_events
from services.training.models import resolve_models
from services.training.population import (
    PopulationTrainer,
    RunOutcome,
    StepInfo,
    TrainingDiverged,
    resumable_failure,
)
from services.training.run_folder import RunFolder

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
    path = save_checkpoint(tmp_path, 2, {"weights": {"a": 1.25}}, {"a": (model, optimizer)})
    assert path == checkpoint_path(tmp_path, 2) and checkpoint_epochs(tmp_path) == [2]

    other, other_optimizer = tiny_model(2)
    before = dict(model.named_parameters())
    assert not torch.equal(dict(other.named_parameters())["1.weight"], before["1.weight"])
    frozen = dict(other.named_parameters())["0.bias"].detach().clone()
    loaded = read_checkpoint(path)
    restore_trainable(other, loaded.weights_file("a"))
    restore_optimizer(other_optimizer, loaded.optimizer_file("a"))
    for name, tensor in trainable_state(model).items():
        assert torch.equal(dict(other.named_parameters())[name], tensor)
    # frozen parameters are left alone
    assert torch.equal(dict(other.named_parameters())["0.bias"], frozen)
    assert set(trainable_state(other)) == {"0.weight", "1.weight", "1.bias"}
    saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(restored["state"][key][name], value)
    assert loaded.epoch == 2 and loaded.state["weights"] == {"a": 1.25}


def test_a_checkpoint_for_another_model_is_refused(tmp_path: Path) -> None:
    model, optimizer = tiny_model(1)
    path = save_checkpoint(tmp_path, 1, {}, {"a": (model, optimizer)})
    wider = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    wider.get_submodule("0").bias.requires_grad_(False)
    with pytest.raises(CheckpointError, match="shape"):
        restore_trainable(wider, read_checkpoint(path).weights_file("a"))
    renamed = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="does not fit"):
        restore_trainable(renamed, read_checkpoint(path).weights_file("a"))


def test_a_failed_write_leaves_no_checkpoint_and_names_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = tiny_model(1)
    save_checkpoint(tmp_path, 1, {}, {"a": (model, optimizer)})

    real_write = checkpoints._write_file

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpoints, "_write_file", full_disk)
    with pytest.raises(CheckpointError) as failed:
        save_checkpoint(tmp_path, 2, {}, {"a": (model, optimizer)})
    message = failed.value.message
    assert "No space left on device" in message and "epoch 2" in message
    assert str(checkpoint_path(tmp_path, 2)) in message
    assert checkpoint_epochs(tmp_path) == [1]  # the older one is whole, the new one absent
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]


def test_a_torn_or_altered_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    model, optimizer = tiny_model(1)
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, {"n": epoch}, {"a": (model, optimizer)})
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
    lines = (REPO / "datasets" / "sample.jsonl").read_text().splitlines()[:24]
    (datasets / "small.jsonl").write_text("\n".join(lines) + "\n")
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
) -> PopulationTrainer:
    models, datasets = workspace
    config = config_from_body({**REQUEST, "baseModels": names})
    if folder is None:
        folder = RunFolder.create(models, run_id)
        folder.write_manifest(config, [])
    events = EventLog(
        run_id,
        path=folder.path / EVENTS_FILE,
        sinks=(lambda e: sink.append(event_to_dict(e)),),
        start_seq=start_seq,
    )
    return PopulationTrainer(
        config,
        run_id=run_id,
        models=resolve_models(names, models),
        dataset=load_dataset("small", datasets),
        folder=folder,
        events=events,
        stop=threading.Event(),
        on_step=on_step,
        resume_from=resume_from,
    )


@pytest.fixture(scope="module")
def uncut(workspace: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        patch.delenv("LEDGER_URL", raising=False)
        return trainer_for(workspace, "run-20260201-000001", sink=[]).run()


@pytest.mark.slow
def test_a_run_cut_off_mid_epoch_resumes_to_the_same_end(
    workspace: tuple[Path, Path], uncut: RunOutcome, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
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
    on_disk = list(read_events(run_dir / EVENTS_FILE))
    resumed = trainer_for(
        workspace,
        run_id,
        sink=seen,
        start_seq=on_disk[-1].seq,
        resume_from=checkpoint.path,
        folder=RunFolder(run_dir),
    ).run()

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
