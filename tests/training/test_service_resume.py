"""The training service's side of interrupted runs, without training: a torn events.jsonl
is cut back before the service appends, and a run another process still holds at start-up
is taken in (with what that process wrote meanwhile) and marked interrupted once it lets go."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from services.api import training_pb2
from services.api.run_config import config_from_body
from services.training.events import EVENTS_FILE, EventLog, read_events
from services.training.run_folder import RunFolder
from services.training.service import TrainingService

CONFIG = config_from_body({"datasetId": "small", "baseModels": ["tiny-gpt2"], "epochs": 3})


def run_with_one_epoch(models: Path, run_id: str) -> RunFolder:
    """A run folder as a worker killed in epoch 2 leaves it: epoch 1 done, epoch 2 begun."""
    folder = RunFolder.create(models, run_id)
    folder.write_manifest(CONFIG, [])
    log = EventLog(run_id, path=folder.path / EVENTS_FILE)
    for epoch in (1, 2):
        log.emit("epoch_start", training_pb2.EpochStart(epoch=epoch, total_epochs=3))
        if epoch == 1:
            log.emit("epoch_end", training_pb2.EpochEnd(epoch=1, current_epoch=1, total_epochs=3))
    log.close()
    return folder


def tear(path: Path) -> None:
    """The half line a writer killed mid-write leaves."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"type": "progress", "run_id": "run-2026')


def service(tmp_path: Path) -> TrainingService:
    return TrainingService(
        models_root=tmp_path / "models",
        datasets_root=tmp_path / "datasets",
        state_dir=tmp_path / "state",
    )


async def test_a_torn_event_log_is_cut_back_before_the_interrupted_ending(tmp_path: Path) -> None:
    folder = run_with_one_epoch(tmp_path / "models", "run-20260301-000001")
    tear(folder.path / EVENTS_FILE)
    svc = service(tmp_path)
    svc.load()
    try:
        record = svc.get(folder.run_id)
        assert record.status == training_pb2.RUN_STATUS_INTERRUPTED
        events = list(read_events(folder.path / EVENTS_FILE))
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert events[-1].training_error.status == training_pb2.RUN_STATUS_INTERRUPTED
        assert "1 epoch(s)" in events[-1].training_error.message
        lines = (folder.path / EVENTS_FILE).read_text().splitlines()
        assert all(json.loads(line) for line in lines)
    finally:
        await svc.shutdown(grace=1)


async def test_a_run_held_by_another_process_is_taken_in_when_it_lets_go(tmp_path: Path) -> None:
    folder = run_with_one_epoch(tmp_path / "models", "run-20260301-000002")
    held, release, released = threading.Event(), threading.Event(), threading.Event()

    def other_process() -> None:  # the lock is per open file, so a thread stands in for it
        with folder.worker_lock():
            held.set()
            release.wait(30)
            log = EventLog(folder.run_id, path=folder.path / EVENTS_FILE, start_seq=3)
            log.emit("progress", training_pb2.Progress(epoch=2, model="tiny-gpt2", step=1))
            log.close()
        released.set()

    thread = threading.Thread(target=other_process)
    thread.start()
    assert held.wait(30)
    svc = service(tmp_path)
    svc.load()
    try:
        record = svc.get(folder.run_id)
        assert record.status == training_pb2.RUN_STATUS_RUNNING and record.worker is None
        release.set()
        assert released.wait(30)
        for _ in range(100):
            if record.status != training_pb2.RUN_STATUS_RUNNING:
                break
            await asyncio.sleep(0.1)
        assert record.status == training_pb2.RUN_STATUS_INTERRUPTED
        assert [e.seq for e in record.events] == [1, 2, 3, 4, 5]
        assert record.events[3].WhichOneof("payload") == "progress"  # what it wrote meanwhile
        on_disk = [e.seq for e in read_events(folder.path / EVENTS_FILE)]
        assert on_disk == [1, 2, 3, 4, 5]
        assert [seq for run, seq in svc.hub.journal.entries if run == folder.run_id] == on_disk
    finally:
        thread.join(30)
        await svc.shutdown(grace=1)
