"""The training service's runs as its events describe them, and the one path by which events
reach subscribers: journaled in one global order, folded into their run, offered to WatchRun and
StreamEvents streams.

Workers' reader threads hand events in under the journal's lock, which also assigns the global
cursor, so every subscriber sees events in cursor order and a restarted service resumes the same
numbering. The asyncio loop owns everything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.api import training_pb2
from services.api.codec import dict_to_message, format_timestamp, now_timestamp
from services.api.run_config import RunConfig
from services.api.run_state import RunState
from services.api.run_state import fold as fold_events
from services.core.errors import Conflict, InvalidInput, TooSlow
from services.core.layout import EVENTS_FILE
from services.training.events import append_events, read_events
from services.training.run_folder import RunFolder
from services.training.worker import WorkerHandle

log = logging.getLogger("oneseek.training.hub")

Event = training_pb2.TrainingEvent
TERMINAL = ("training_complete", "training_error")
SUBSCRIBER_QUEUE = 4096


@dataclass
class RunRecord:
    """One run the service knows: its folder, settings, events, and their fold."""

    folder: RunFolder
    config: RunConfig
    models: list[dict[str, Any]]
    created_at: Timestamp
    events: list[Event] = field(default_factory=list)
    worker: WorkerHandle | None = None
    state: RunState = field(init=False)

    def __post_init__(self) -> None:
        self.state = self.fold()

    @property
    def run_id(self) -> str:
        return self.folder.run_id

    @property
    def status(self) -> int:
        return self.state.status_value

    @property
    def last_seq(self) -> int:
        return len(self.events)

    def add(self, event: Event) -> None:
        self.events.append(event)
        self.state.apply(event)

    def fold(self) -> RunState:
        """The run's state from its events alone."""
        created = format_timestamp(self.created_at)
        state = RunState(
            self.run_id, config=self.config, models=self.model_infos(), created_at=created
        )
        return fold_events(state, self.events)

    def model_infos(self) -> list[training_pb2.ModelInfo]:
        infos = []
        for model in self.models:
            info = dict_to_message(model, training_pb2.ModelInfo())
            assert isinstance(info, training_pb2.ModelInfo)
            infos.append(info)
        return infos

    def check_resumable(self) -> None:
        """Refuses (Conflict) a run that is running, ended cleanly, or failed for a reason
        that resuming would only repeat (a divergence, bad input)."""
        name, run_id, status = self.state.status, self.run_id, self.status
        if status == training_pb2.RUN_STATUS_RUNNING:
            raise Conflict(
                f"Run {run_id} is running; only an interrupted or failed run can be resumed.",
                field="runId",
            )
        if status not in (training_pb2.RUN_STATUS_FAILED, training_pb2.RUN_STATUS_INTERRUPTED):
            raise Conflict(
                f"Run {run_id} is {name}: it ended with a certified run folder, so there is "
                "nothing to resume; start a new run to train further.",
                field="runId",
            )
        failed = status == training_pb2.RUN_STATUS_FAILED and self.events
        if failed and self.folder.failure_verdict(self.events[-1].seq) is False:
            raise Conflict(
                f"Run {run_id} failed for a reason that resuming would repeat: "
                f"{self.state.error or 'see its training_error event'} "
                "Start a new run with other settings or data instead.",
                field="runId",
            )
        if self.worker is not None:
            raise Conflict(
                f"Run {run_id} is {name} and its worker is still shutting down; "
                "try again in a few seconds.",
                field="runId",
            )

    def to_proto(self) -> training_pb2.Run:
        state = self.state
        return training_pb2.Run(
            run_id=self.run_id,
            status=state.status_value,
            config=self.config,
            created_at=self.created_at,
            current_epoch=state.current_epoch,
            total_epochs=self.config.epochs,
            progress_percent=state.progress_percent,
            run_dir=str(self.folder.path),
            last_seq=self.last_seq,
            models=state.models,
            finished_at=state.finished_at,  # None, like the three after it, leaves it unset
            best_model=state.best_model,
            dna=state.dna,
            error=state.error,
        )


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

    async def live(
        self, last: int, position: Callable[[Event], int], resume: str
    ) -> AsyncIterator[Event]:
        """What is offered after `last` (by `position`, seq or cursor); TooSlow, naming where
        to resume, once the subscriber was dropped."""
        while (item := await self.queue.get()) is not None:
            if position(item) > last:
                last = position(item)
                yield item
        raise TooSlow(f"Client too slow; reconnect with {resume}={last}.", field=resume)


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


class EventHub:
    """Every run, its events in cursor order, and the streams that follow them."""

    def __init__(self, journal: Path) -> None:
        self.runs: dict[str, RunRecord] = {}
        self.journal = Journal(journal)
        self.subscribers: set[Subscription] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def journal_missing(self) -> None:
        """Start-up: journals the events of runs read from disk that the journal lacks (it is
        written after the run's own log, so a crash can leave it behind)."""
        with self.journal.lock:
            seen: dict[str, int] = {}
            for run_id, seq in self.journal.entries:
                seen[run_id] = max(seen.get(run_id, 0), seq)
            for record in sorted(self.runs.values(), key=lambda r: r.run_id):
                for event in record.events[seen.get(record.run_id, 0) :]:
                    self.journal.append(record.run_id, event.seq)

    def deliver(self, record: RunRecord, event: Event) -> None:
        """Any thread: journal the event and hand it to the loop, in cursor order."""
        assert self.loop is not None
        with self.journal.lock:
            cursor = self.journal.append(record.run_id, event.seq)
            self.loop.call_soon_threadsafe(self._publish, record, event, cursor)

    def deliver_here(self, record: RunRecord, event: Event) -> None:
        """The loop (or start-up): journal and publish at once, so the next seq is known."""
        if self.loop is not None and self.loop.is_running():
            with self.journal.lock:
                cursor = self.journal.append(record.run_id, event.seq)
            self._publish(record, event, cursor)
        else:
            record.add(event)

    def _publish(self, record: RunRecord, event: Event, cursor: int) -> None:
        """Loop: fold the event into its run and offer it to every subscriber."""
        if event.seq != record.last_seq + 1:
            log.error(
                "event out of order: seq %s after %s",
                event.seq,
                record.last_seq,
                extra={"run_id": record.run_id},
            )
        record.add(event)
        streamed = Event()
        streamed.CopyFrom(event)
        streamed.cursor = cursor
        for sub in list(self.subscribers):
            if sub.run_id is None:
                sub.offer(streamed)
            elif sub.run_id == record.run_id:
                sub.offer(event)

    def take_in(self, record: RunRecord, on_disk: list[Event] | None) -> None:
        """Loop, once a run's writer is gone: makes the run's events and its events.jsonl
        (`on_disk`, read off the loop by `logged`; None when it could not be read) agree.
        Events the worker wrote but could not send (it died in between) are taken in; events
        it sent but could not write (disk trouble) are written now if the disk allows, so a
        restart replays exactly what subscribers saw."""
        if on_disk is None:
            return
        path = record.folder.path / EVENTS_FILE
        for event in on_disk:
            if event.seq == record.last_seq + 1:
                self.deliver_here(record, event)
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
                    extra={"run_id": record.run_id},
                )

    @staticmethod
    def logged(record: RunRecord) -> list[Event] | None:
        """The run's events.jsonl (a file read: call it off the loop), or None, logged, when
        it cannot be read."""
        path = record.folder.path / EVENTS_FILE
        try:
            return list(read_events(path))
        except (OSError, ValueError) as exc:
            log.error("cannot read %s: %s", path, exc, extra={"run_id": record.run_id})
            return None

    def end(self, record: RunRecord, status: int, message: str) -> None:
        """The service writes a run's last event itself when its worker cannot. When even the
        run folder cannot take it (disk full, read-only), the event still ends the run here,
        in the journal and for every subscriber; the log says what could not be written."""
        event = Event(run_id=record.run_id, seq=record.last_seq + 1, timestamp=now_timestamp())
        event.training_error.message = message
        event.training_error.status = status  # type: ignore[assignment]
        if record.state.current_epoch:
            event.training_error.epoch = record.state.current_epoch
        path = record.folder.path / EVENTS_FILE
        try:
            append_events(path, [event])
        except OSError as exc:
            log.error(
                "cannot write the run's last event to %s: %s",
                path,
                exc.strerror or exc,
                extra={"run_id": record.run_id},
            )
        self.deliver_here(record, event)

    async def watch(self, record: RunRecord, after_seq: int) -> AsyncIterator[Event]:
        """The run's events with seq > after_seq, replayed then live; ends after the last one."""
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
            if record.state.finished and last >= record.last_seq:
                return
            async for item in sub.live(last, lambda event: event.seq, "after_seq"):
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
            async for item in sub.live(last, lambda event: event.cursor, "after_cursor"):
                yield item
        finally:
            self.subscribers.discard(sub)
