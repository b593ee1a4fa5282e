"""A run's event log: stamps each event with its seq and time, keeps it, and hands it on.

Events are the generated `TrainingEvent` messages, so a service only moves them. The log
appends every event to `events.jsonl` in the run folder (documented JSON shape, one per line)
so a restarted service can replay a run; `epoch_end` and terminal events are fsynced (right
after they are handed on: a written line already survives the death of this process).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from services.api import training_pb2
from services.api.codec import event_from_dict, event_to_dict, now_timestamp
from services.core.layout import EVENTS_FILE as EVENTS_FILE

EventSink = Callable[[training_pb2.TrainingEvent], None]
# Losing one of these in a crash would lose a decision; a lost progress event costs nothing.
_DURABLE = frozenset({"epoch_end", "weight_adjustment", "training_complete", "training_error"})


class EventLog:
    """Assigns `seq` 1, 2, 3... per run, appends to events.jsonl, and calls every sink."""

    def __init__(
        self,
        run_id: str,
        *,
        path: Path | None = None,
        sinks: tuple[EventSink, ...] = (),
        start_seq: int = 0,
    ) -> None:
        self.run_id = run_id
        self.path = path
        self.seq = start_seq
        self._sinks = list(sinks)
        self._file: IO[str] | None = None

    def add_sink(self, sink: EventSink) -> None:
        """`sink` is called with every event emitted from now on, after the others."""
        self._sinks.append(sink)

    def emit(self, kind: str, payload: Any) -> training_pb2.TrainingEvent:
        """Wraps `payload` (a message of the oneof field `kind`) in a stamped event.

        The seq is taken only once the event is in the file: an event that could not be
        written (disk full) raises and leaves no gap for the next one to jump."""
        event = training_pb2.TrainingEvent(
            run_id=self.run_id, seq=self.seq + 1, timestamp=now_timestamp()
        )
        getattr(event, kind).CopyFrom(payload)
        self._append(event)
        self.seq = event.seq
        for sink in self._sinks:
            sink(event)
        # once written the line is in the kernel's cache, which outlives this process: the
        # disk flush of a decision can follow the hand-on instead of delaying every watcher
        if kind in _DURABLE:
            self._sync()
        return event

    def _append(self, event: training_pb2.TrainingEvent) -> None:
        if self.path is None:
            return
        line = json.dumps(event_to_dict(event), allow_nan=False) + "\n"
        if self._file is None:
            repair_tail(self.path)  # an earlier writer may have died mid-line
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open
        try:
            self._file.write(line)
            self._file.flush()
        except OSError:
            self._drop_handle()
            raise

    def _sync(self) -> None:
        if self._file is None:
            return
        try:
            os.fsync(self._file.fileno())
        except OSError:
            self._drop_handle()
            raise

    def _drop_handle(self) -> None:
        # the buffer may hold part of a line: drop the handle (and what it held) so the next
        # writer starts from a clean line end
        assert self.path is not None
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        with contextlib.suppress(OSError):
            repair_tail(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def repair_tail(path: Path) -> None:
    """Cuts a torn last line (a writer killed mid-write) so the next append starts clean."""
    try:
        handle = open(path, "rb+")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 4096)
            handle.seek(start)
            block = handle.read(end - start)
            cut = block.rfind(b"\n")
            if cut != -1:
                end = start + cut + 1
                break
            end = start
        if end != size:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())


def append_events(path: Path, events: Iterable[training_pb2.TrainingEvent]) -> None:
    """Appends `events` to an events.jsonl (after cutting a torn last line), fsynced."""
    lines = "".join(json.dumps(event_to_dict(e), allow_nan=False) + "\n" for e in events)
    repair_tail(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


def read_events(path: Path) -> Iterator[training_pb2.TrainingEvent]:
    """Replays an events.jsonl; a torn last line (the writer died mid-write) is ignored."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                return
            yield event_from_dict(json.loads(line))
