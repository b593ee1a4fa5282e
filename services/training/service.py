"""The training service's state: runs, their event logs, the global journal, and subscribers.

One asyncio loop owns all of it. Workers' reader threads hand events over under one lock that
also assigns the global cursor and appends the journal, so every subscriber sees events in
cursor order and a restarted service resumes the same numbering. Per run, events come from
its events.jsonl (written by the worker), so a restart replays them; a run whose worker is gone
without a terminal event is reported `interrupted`, never `running` forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.api import training_pb2
from services.api.codec import now_timestamp, parse_timestamp
from services.api.run_config import RunConfig, build_config, config_from_dict, config_to_dict
from services.core.errors import Conflict, InvalidInput, NotFound, OneSeekError, TooSlow
from services.core.layout import ARTIFACTS
from services.core.training_config import TRAINING_CONFIG, generate_run_id, validate_run_id
from services.training.checkpoints import latest_checkpoint
from services.training.data import load_dataset
from services.training.events import EVENTS_FILE, append_events, read_events
from services.training.models import resolve_models
from services.training.run_folder import MANIFEST_FILE, RunFolder, certified_root
from services.training.worker import WorkerHandle

log = logging.getLogger("oneseek.training.service")

Event = training_pb2.TrainingEvent
RUNNING = training_pb2.RUN_STATUS_RUNNING
FAILED = training_pb2.RUN_STATUS_FAILED
INTERRUPTED = training_pb2.RUN_STATUS_INTERRUPTED
FOREIGN_POLL = 1.0  # seconds between looks at a run another process still holds
TERMINAL = ("training_complete", "training_error")
SUBSCRIBER_QUEUE = 4096


class Subscription:
    """One stream's bounded queue. Overflow drops the subscriber, never the producer."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id  # None: every run (StreamEvents)
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.overflowed = False

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


@dataclass
class RunRecord:
    run_id: str
    folder: RunFolder
    config: RunConfig
    models: list[dict[str, Any]]
    created_at: Timestamp
    events: list[Event] = field(default_factory=list)
    status: int = RUNNING
    finished_at: Timestamp | None = None
    current_epoch: int = 0
    progress_percent: float = 0.0
    best_model: str | None = None
    dna: str | None = None
    error: str | None = None
    worker: WorkerHandle | None = None

    @property
    def last_seq(self) -> int:
        return len(self.events)

    def apply(self, event: Event) -> None:
        """Folds one event into the run's summary (status, epoch, progress, outcome)."""
        kind = event.WhichOneof("payload")
        if kind == "epoch_start" and self.status != RUNNING:
            # only a resumed run starts an epoch after its terminal event: it runs again
            self.status = RUNNING
            self.error = None
            self.finished_at = None
            start = event.epoch_start
            self.progress_percent = 100.0 * (start.epoch - 1) / max(1, start.total_epochs)
        if kind == "epoch_end":
            self.current_epoch = event.epoch_end.epoch
            self.progress_percent = event.epoch_end.progress_percent
        elif kind == "progress":
            self.progress_percent = event.progress.progress_percent
        elif kind == "training_complete":
            done = event.training_complete
            self.status = done.status
            self.progress_percent = 100.0
            self.dna = done.dna or None
            self.best_model = done.best_model if done.HasField("best_model") else None
            self.finished_at = event.timestamp
        elif kind == "training_error":
            self.status = event.training_error.status
            self.error = event.training_error.message
            self.progress_percent = 100.0
            self.finished_at = event.timestamp

    def to_proto(self) -> training_pb2.Run:
        run = training_pb2.Run(
            run_id=self.run_id,
            status=self.status,  # type: ignore[arg-type]
            config=self.config,
            created_at=self.created_at,
            current_epoch=self.current_epoch,
            total_epochs=self.config.epochs,
            progress_percent=self.progress_percent,
            run_dir=str(self.folder.path),
            last_seq=self.last_seq,
        )
        if self.finished_at is not None:
            run.finished_at.CopyFrom(self.finished_at)
        if self.best_model is not None:
            run.best_model = self.best_model
        if self.dna is not None:
            run.dna = self.dna
        if self.error is not None:
            run.error = self.error
        for model in self.models:
            run.models.add(**model)
        return run


class Journal:
    """The global order of every event the service has seen: `cursor -> (run_id, seq)`.

    Appended under `lock` by whichever thread delivers an event; read on the loop.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if not line.endswith("\n"):
                        break  # torn by a crash: that event is re-journaled on reconcile
                    entry = json.loads(line)
                    self.entries.append((entry["run_id"], int(entry["seq"])))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for appends
        self._file.seek(0, os.SEEK_END)

    def append(self, run_id: str, seq: int) -> int:
        """Caller holds `lock`. Returns the new event's cursor."""
        self.entries.append((run_id, seq))
        cursor = len(self.entries)
        self._file.write(json.dumps({"cursor": cursor, "run_id": run_id, "seq": seq}) + "\n")
        self._file.flush()
        return cursor

    def close(self) -> None:
        self._file.close()


class TrainingService:
    def __init__(
        self,
        *,
        models_root: Path,
        datasets_root: Path,
        state_dir: Path,
        max_active_runs: int | None = None,
        stop_timeout: float = 60.0,
    ) -> None:
        self.models_root = Path(models_root)
        self.datasets_root = Path(datasets_root)
        self.state_dir = Path(state_dir)
        self.max_active_runs = max_active_runs or int(
            TRAINING_CONFIG["defaults"]["max_active_runs"]
        )
        self.stop_timeout = stop_timeout
        self.runs: dict[str, RunRecord] = {}
        self.subscribers: set[Subscription] = set()
        self.journal = Journal(self.state_dir / "training" / "journal.jsonl")
        self._start_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- start-up: what is on disk --------------------------------------------------------

    def load(self) -> None:
        """Reads every run folder, reconciles the journal, marks orphaned runs interrupted."""
        self._loop = asyncio.get_running_loop()
        root = certified_root(self.models_root)
        for path in sorted(root.glob("run-*")) if root.exists() else []:
            if not (path / MANIFEST_FILE).exists():
                continue
            try:
                record = self._record_from_disk(path)
            except (OSError, ValueError, KeyError, OneSeekError) as exc:
                log.warning("skipping unreadable run folder %s: %s", path, exc)
                continue
            self.runs[record.run_id] = record
        with self.journal.lock:
            seen: dict[str, int] = {}
            for run_id, seq in self.journal.entries:
                seen[run_id] = max(seen.get(run_id, 0), seq)
            for record in sorted(self.runs.values(), key=lambda r: r.run_id):
                for event in record.events[seen.get(record.run_id, 0) :]:
                    self.journal.append(record.run_id, event.seq)
        foreign: list[RunRecord] = []
        for record in self.runs.values():
            if record.status != RUNNING:
                continue
            if record.folder.is_being_trained():
                foreign.append(record)  # an exiting orphan worker, or `oneseek train`
            else:
                self._interrupted(record)
        if foreign:
            self._own(self._await_foreign(foreign))

    def _interrupted(self, record: RunRecord) -> None:
        self._append_terminal(
            record,
            INTERRUPTED,
            "The training service stopped while this run was active; "
            f"it completed {record.current_epoch} epoch(s) and can be resumed.",
        )

    async def _await_foreign(self, records: list[RunRecord]) -> None:
        """Runs another process held at start-up: once it lets go, take in what it wrote and
        mark the run interrupted if it left no ending, so no run says `running` forever."""
        waiting = list(records)
        while waiting:
            await asyncio.sleep(FOREIGN_POLL)
            for record in list(waiting):
                if record.worker is not None or record.status != RUNNING:
                    waiting.remove(record)
                elif not await asyncio.to_thread(record.folder.is_being_trained):
                    waiting.remove(record)
                    self._reconcile(record)
                    if record.status == RUNNING and record.worker is None:
                        self._interrupted(record)

    def _record_from_disk(self, path: Path) -> RunRecord:
        folder = RunFolder(path)
        manifest = folder.read_manifest()
        record = RunRecord(
            run_id=folder.run_id,
            folder=folder,
            config=config_from_dict(manifest["config"]),
            models=list(manifest.get("models", [])),
            created_at=parse_timestamp(manifest["created_at"]),
        )
        for event in read_events(path / EVENTS_FILE):
            record.events.append(event)
            record.apply(event)
        return record

    # ---- runs ------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord:
        run_id = validate_run_id(run_id)
        record = self.runs.get(run_id)
        if record is None:
            raise NotFound(
                f"Run '{run_id}' not found; ListRuns shows the runs this service knows.",
                field="runId",
            )
        return record

    def runs_newest_first(self, status: int = 0, limit: int = 0) -> list[RunRecord]:
        if limit < 0:
            raise InvalidInput(f"limit must be 0 (all) or more, got {limit}.", field="limit")
        records = sorted(self.runs.values(), key=lambda r: r.run_id, reverse=True)
        if status:
            records = [r for r in records if r.status == status]
        return records[:limit] if limit else records

    def active(self) -> list[RunRecord]:
        return [r for r in self.runs.values() if r.status == RUNNING and r.worker is not None]

    async def start(self, values: dict[str, Any]) -> RunRecord:
        """Validates everything, creates the run folder and starts the worker. `values`: the
        start options given (run_config.read_request)."""
        config = build_config(values)
        async with self._start_lock:
            self._check_capacity()
            models, dataset = await asyncio.to_thread(self._resolve, config)
            folder = await asyncio.to_thread(self._create_folder, config, models)
            record = RunRecord(
                run_id=folder.run_id,
                folder=folder,
                config=config,
                models=models,
                created_at=parse_timestamp(folder.created_at),
            )
            self.runs[record.run_id] = record
            await asyncio.to_thread(self._spawn, record)
        log.info("run started models=%s", ",".join(config.base_models), extra=_run(record))
        del dataset
        return record

    def _resolve(self, config: RunConfig) -> tuple[list[dict[str, Any]], Any]:
        models = resolve_models(list(config.base_models), self.models_root)
        dataset = load_dataset(config.dataset_id, self.datasets_root)
        return [m.to_dict() for m in models], dataset

    def _create_folder(self, config: RunConfig, models: list[dict[str, Any]]) -> RunFolder:
        root = certified_root(self.models_root)
        run_id = generate_run_id(exists=lambda rid: rid in self.runs or (root / rid).exists())
        folder = RunFolder.create(self.models_root, run_id)
        folder.write_manifest(config, models)
        return folder

    def _spawn(
        self, record: RunRecord, start_seq: int = 0, resume_from: Path | None = None
    ) -> None:
        spec = {
            "config": config_to_dict(record.config),
            "run_dir": str(record.folder.path),
            "models_root": str(self.models_root),
            "datasets_root": str(self.datasets_root),
            "start_seq": start_seq,
            "resumed": start_seq > 0,
            "resume_from": str(resume_from) if resume_from is not None else None,
        }
        handles: list[WorkerHandle] = []
        worker = WorkerHandle(
            record.run_id,
            spec,
            on_event=lambda data: self._deliver_bytes(record, data),
            on_exit=lambda code: self._worker_exited(record, handles[0], code),
        )
        handles.append(worker)
        record.worker = worker
        try:
            worker.start()
        except Exception:
            record.worker = None
            raise

    def _check_capacity(self, then: str = "") -> None:
        """Conflict naming the active runs when the service trains as many as it may."""
        active = self.active()
        if len(active) >= self.max_active_runs:
            names = ", ".join(r.run_id for r in active)
            after = f", then {then}" if then else ""
            raise Conflict(
                f"Run {names} is already active and the limit is {self.max_active_runs} "
                f"active run(s); stop it or wait for it to finish{after}.",
                field="runId",
            )

    async def resume(self, run_id: str) -> RunRecord:
        """Continues an interrupted run, or one that failed for an outside reason, from its
        last checkpoint, under the same run id, with seq numbers going on after its last."""
        record = self.get(run_id)
        async with self._start_lock:
            await asyncio.to_thread(self._check_resumable, record)
            self._check_capacity(then=f"resume {run_id}")
            checkpoint = await asyncio.to_thread(self._resume_point, record)
            before = (record.status, record.error, record.finished_at, record.progress_percent)
            record.status, record.error, record.finished_at = RUNNING, None, None
            record.progress_percent = 100.0 * checkpoint[0] / max(1, record.config.epochs)
            try:
                await asyncio.to_thread(self._spawn, record, record.last_seq, checkpoint[1])
            except Exception:
                record.status, record.error, record.finished_at, record.progress_percent = before
                raise
        log.info("run resumed after epoch %s", checkpoint[0], extra=_run(record))
        return record

    def _check_resumable(self, record: RunRecord) -> None:
        """Refuses (Conflict) a run that is running, ended cleanly, or failed for a reason
        that resuming would only repeat (a divergence, bad input)."""
        name, run_id = _status(record.status), record.run_id
        if record.status == RUNNING:
            raise Conflict(
                f"Run {run_id} is running; only an interrupted or failed run can be resumed.",
                field="runId",
            )
        if record.status not in (FAILED, INTERRUPTED):
            raise Conflict(
                f"Run {run_id} is {name}: it ended with a certified run folder, so there is "
                "nothing to resume; start a new run to train further.",
                field="runId",
            )
        if record.status == FAILED and record.events:
            last = record.events[-1]
            if record.folder.failure_verdict(last.seq) is False:
                raise Conflict(
                    f"Run {run_id} failed for a reason that resuming would repeat: "
                    f"{record.error or 'see its training_error event'} "
                    "Start a new run with other settings or data instead.",
                    field="runId",
                )
        if record.worker is not None:
            raise Conflict(
                f"Run {run_id} is {name} and its worker is still shutting down; "
                "try again in a few seconds.",
                field="runId",
            )

    def _resume_point(self, record: RunRecord) -> tuple[int, Path | None]:
        """(last completed epoch, its checkpoint folder); the run's models and dataset must
        still be there, unchanged."""
        models = resolve_models(list(record.config.base_models), self.models_root)
        del models
        dataset = load_dataset(record.config.dataset_id, self.datasets_root)
        checkpoint = latest_checkpoint(record.folder.path)
        if checkpoint is None:
            if record.current_epoch:
                log.warning("no usable checkpoint: resuming from the start", extra=_run(record))
            return 0, None
        if checkpoint.state.get("dataset_sha256") != dataset.sha256:
            raise Conflict(
                f"Dataset '{dataset.id}' changed since run {record.run_id} started (its sha256 "
                "differs); resuming would train on other data. Start a new run.",
                field="datasetId",
            )
        return checkpoint.epoch, checkpoint.path

    async def artifact(self, run_id: str, name: str) -> tuple[str, str]:
        """(text, sha256) of one of the run folder's JSON artifacts."""
        record = self.get(run_id)
        if name not in ARTIFACTS:
            raise InvalidInput(
                f"Artifact {name!r} is not available; ask for one of {', '.join(ARTIFACTS)}.",
                field="name",
            )
        path = record.folder.path / name
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as exc:
            raise NotFound(
                f"Run {run_id} has no {name} yet (status {_status(record.status)}).",
                field="name",
            ) from exc
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()

    async def stop(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record.status != RUNNING or record.worker is None:
            raise Conflict(
                f"Run {run_id} is not running (status {_status(record.status)}); "
                "only a running run can be stopped.",
                field="runId",
            )
        record.worker.request_stop()
        self._own(self._kill_if_stuck(record))
        log.info("stop requested", extra=_run(record))
        return record

    async def _kill_if_stuck(self, record: RunRecord) -> None:
        await asyncio.sleep(self.stop_timeout)
        if record.worker is not None and record.worker.alive:
            log.warning("worker did not stop within %ss; killing it", self.stop_timeout)
            record.worker.kill()

    # ---- events ----------------------------------------------------------------------------

    def _deliver_bytes(self, record: RunRecord, data: bytes) -> None:
        """Reader thread: an event from the worker (already in events.jsonl)."""
        event = Event.FromString(data)
        self._deliver(record, event)

    def _deliver(self, record: RunRecord, event: Event) -> None:
        """Any thread: journal the event and hand it to the loop, in cursor order."""
        assert self._loop is not None
        with self.journal.lock:
            cursor = self.journal.append(record.run_id, event.seq)
            self._loop.call_soon_threadsafe(self._publish, record, event, cursor)

    def _publish(self, record: RunRecord, event: Event, cursor: int) -> None:
        """Loop: fold the event into the run and offer it to every subscriber."""
        if event.seq != record.last_seq + 1:
            log.error(
                "event out of order: seq %s after %s",
                event.seq,
                record.last_seq,
                extra=_run(record),
            )
        record.events.append(event)
        record.apply(event)
        streamed = Event()
        streamed.CopyFrom(event)
        streamed.cursor = cursor
        for sub in list(self.subscribers):
            if sub.run_id is None:
                sub.offer(streamed)
            elif sub.run_id == record.run_id:
                sub.offer(event)

    def _worker_exited(self, record: RunRecord, worker: WorkerHandle, code: int | None) -> None:
        """Reader thread, after the worker's pipe closed and the process was joined."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._after_exit, record, worker, code)

    def _after_exit(self, record: RunRecord, worker: WorkerHandle, exitcode: int | None) -> None:
        if record.worker is not worker:
            return  # an older worker of a run that has been resumed since
        record.worker = None
        self._reconcile(record)
        if record.status != RUNNING:
            log.info("worker exited code=%s", exitcode, extra=_run(record))
            return
        how = (
            f"was killed by signal {-exitcode}"
            if exitcode is not None and exitcode < 0
            else f"exited with code {exitcode}"
        )
        log.error("worker died without finishing: %s", how, extra=_run(record))
        self._append_terminal(
            record,
            training_pb2.RUN_STATUS_FAILED,
            f"The training worker {how} during epoch {record.current_epoch + 1}; "
            "see the service log. Resume the run or start a new one.",
        )

    def _reconcile(self, record: RunRecord) -> None:
        """Loop, once a run's writer is gone: makes the service's events and events.jsonl
        agree. Events the worker wrote but could not send (it died in between) are taken in;
        events it sent but could not write (disk trouble) are written now if the disk allows,
        so a restart replays exactly what subscribers saw."""
        path = record.folder.path / EVENTS_FILE
        try:
            on_disk = list(read_events(path))
        except (OSError, ValueError) as exc:
            log.error("cannot read %s: %s", path, exc, extra=_run(record))
            return
        for event in on_disk:
            if event.seq == record.last_seq + 1:
                self._deliver_here(record, event)
        written = on_disk[-1].seq if on_disk else 0
        missing = [e for e in record.events if e.seq > written]
        if missing:
            try:
                append_events(path, missing)
            except OSError as exc:
                log.error(
                    "events %s-%s are not in %s (%s); they are kept in memory and the journal",
                    missing[0].seq,
                    missing[-1].seq,
                    path,
                    exc.strerror or exc,
                    extra=_run(record),
                )

    def _deliver_here(self, record: RunRecord, event: Event) -> None:
        """Loop (or start-up): journal and publish at once, so the next seq is known."""
        if self._loop is not None and self._loop.is_running():
            with self.journal.lock:
                cursor = self.journal.append(record.run_id, event.seq)
            self._publish(record, event, cursor)
        else:
            record.events.append(event)
            record.apply(event)

    def _append_terminal(self, record: RunRecord, status: int, message: str) -> None:
        """The service writes a run's last event itself when its worker cannot. When even the
        run folder cannot take it (disk full, read-only), the event still ends the run here,
        in the journal and for every subscriber; the log says what could not be written."""
        event = Event(run_id=record.run_id, seq=record.last_seq + 1, timestamp=now_timestamp())
        event.training_error.message = message
        event.training_error.status = status  # type: ignore[assignment]
        if record.current_epoch:
            event.training_error.epoch = record.current_epoch
        path = record.folder.path / EVENTS_FILE
        try:
            append_events(path, [event])
        except OSError as exc:
            log.error(
                "cannot write the run's last event to %s: %s",
                path,
                exc.strerror or exc,
                extra=_run(record),
            )
        self._deliver_here(record, event)

    # ---- streams ---------------------------------------------------------------------------

    async def watch(self, run_id: str, after_seq: int) -> AsyncIterator[Event]:
        """The run's events with seq > after_seq, replayed then live; ends after the last one."""
        record = self.get(run_id)
        if after_seq < 0:
            raise InvalidInput(f"after_seq must be 0 or more, got {after_seq}.", field="after_seq")
        sub = Subscription(record.run_id)
        # no await between the snapshot and the registration: the seam has no gap
        backlog = list(record.events[after_seq:])
        self.subscribers.add(sub)
        try:
            last = after_seq
            for event in backlog:
                last = event.seq
                yield event
            if record.status != RUNNING and last >= record.last_seq:
                return
            while True:
                item = await sub.queue.get()
                if item is None:
                    raise TooSlow(
                        f"Client too slow; reconnect with after_seq={last}.", field="after_seq"
                    )
                if item.seq <= last:
                    continue
                last = item.seq
                yield item
                if item.WhichOneof("payload") in TERMINAL:
                    return
        finally:
            self.subscribers.discard(sub)

    async def stream(self, after_cursor: int) -> AsyncIterator[Event]:
        """Every run's events with cursor > after_cursor, replayed then live, forever."""
        if after_cursor < 0:
            raise InvalidInput(
                f"after_cursor must be 0 or more, got {after_cursor}.", field="after_cursor"
            )
        sub = Subscription(None)
        with self.journal.lock:
            entries = list(self.journal.entries[after_cursor:])
            self.subscribers.add(sub)
        try:
            last = after_cursor
            for offset, (run_id, seq) in enumerate(entries, start=after_cursor + 1):
                record = self.runs.get(run_id)
                if record is None or seq > record.last_seq:
                    # journaled but not yet folded on the loop: it is in the queue already
                    break
                event = Event()
                event.CopyFrom(record.events[seq - 1])
                event.cursor = offset
                last = offset
                yield event
            while True:
                item = await sub.queue.get()
                if item is None:
                    raise TooSlow(
                        f"Client too slow; reconnect with after_cursor={last}.",
                        field="after_cursor",
                    )
                if item.cursor <= last:
                    continue
                last = item.cursor
                yield item
        finally:
            self.subscribers.discard(sub)

    # ---- shutdown --------------------------------------------------------------------------

    def _own(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, grace: float = 30.0) -> None:
        """Policy: active runs are stopped cleanly (status `stopped`, folder written) within
        `grace` seconds; a worker still alive then is killed and its run ends `failed`."""
        workers = [r.worker for r in self.runs.values() if r.worker is not None]
        for worker in workers:
            worker.request_stop()
        deadline = asyncio.get_running_loop().time() + grace
        for worker in workers:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.to_thread(worker.join, remaining)
            if worker.alive:
                worker.kill()
                await asyncio.to_thread(worker.join, 5.0)
        await asyncio.sleep(0)  # let the exit callbacks run
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.journal.close()


def _status(status: int) -> str:
    from services.api.codec import run_status_name

    return run_status_name(status) or "unknown"


def _run(record: RunRecord) -> dict[str, str]:
    return {"run_id": record.run_id}
