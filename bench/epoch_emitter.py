"""The bench's stand-in for a run's trainer: the worker body the training service spawns when it
is started by launch_training.py. It emits epoch_end events through the real EventLog and the
real pipe to the service, when and as many as the bench asks, and stamps each one (the machine's
monotonic clock, shared by every process) the moment it is created.

Control: the bench writes lines to the FIFO `<run folder>/bench-trigger`:
`emit N INTERVAL` emits N epoch_ends INTERVAL seconds apart; `done` writes the stamps (created,
and handed to the pipe) to `<run folder>/bench-created.json`, emits training_complete and ends
the worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

TRIGGER = "bench-trigger"
CREATED = "bench-created.json"


def emit_main(spec: dict[str, Any], conn: Connection) -> None:
    """Worker entry point (same signature as services.training.worker.worker_main)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from services.api import training_pb2
    from services.training.events import EVENTS_FILE, EventLog

    folder = Path(spec["run_dir"])
    models = list(spec["config"]["base_models"])
    send_lock = threading.Lock()

    def send(event: Any) -> None:  # as the real worker sends: serialized, over the pipe
        sent[event.seq] = time.monotonic()  # after EventLog wrote (and fsynced) it
        with send_lock:
            conn.send_bytes(event.SerializeToString())

    def listen() -> None:  # the service closing the pipe ends us, as it ends a real worker
        while True:
            try:
                conn.recv_bytes()
            except (EOFError, OSError):
                os._exit(3)

    threading.Thread(target=listen, daemon=True).start()
    events = EventLog(
        folder.name,
        path=folder / EVENTS_FILE,
        sinks=(send,),
        start_seq=int(spec.get("start_seq", 0)),
    )
    created: dict[int, float] = {}
    sent: dict[int, float] = {}
    epoch = 0
    trigger = folder / TRIGGER
    os.mkfifo(trigger)
    with open(trigger, encoding="utf-8") as commands:
        for line in commands:
            words = line.split()
            if not words:
                continue
            if words[0] == "done":
                break
            count, interval = int(words[1]), float(words[2])
            for _ in range(count):
                epoch += 1
                started = time.monotonic()
                stamp = started
                end = training_pb2.EpochEnd(
                    epoch=epoch, current_epoch=epoch, total_epochs=10_000, total_loss=2.5
                )
                for index, name in enumerate(models):
                    end.val_losses[name] = 2.0 + index / 10 + 1 / epoch
                    end.train_losses[name] = 2.1 + index / 10 + 1 / epoch
                    end.weights[name] = 1.0
                    end.lr_multipliers[name] = 1e-4
                end.auto_stop_info.threshold = 0.001
                end.auto_stop_info.patience = 3
                end.auto_stop_info.remaining = 3
                end.progress_percent = 50.0
                created[events.emit("epoch_end", end).seq] = stamp
                rest = interval - (time.monotonic() - started)
                if rest > 0:
                    time.sleep(rest)
    partial = folder / (CREATED + ".tmp")
    partial.write_text(json.dumps({"created": created, "sent": sent}))
    os.replace(partial, folder / CREATED)  # the bench reads it as soon as it exists
    done = training_pb2.TrainingComplete(
        status=training_pb2.RUN_STATUS_COMPLETED, epochs_run=epoch, best_model=models[0]
    )
    events.emit("training_complete", done)
    events.close()
    conn.close()


class EmitterControl:
    """The bench's side of one emitter: open its FIFO once it exists, send commands."""

    def __init__(self, run_dir: Path, timeout: float = 60.0) -> None:
        path = run_dir / TRIGGER
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the emitter did not create {path}")
            time.sleep(0.02)
        self.run_dir = run_dir
        self.sent: dict[int, float] = {}
        self._fifo = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115

    def emit(self, count: int, interval: float = 0.0) -> None:
        self._fifo.write(f"emit {count} {interval}\n")

    def done(self, timeout: float = 30.0) -> dict[int, float]:
        """Ends the run; the creation stamp of each epoch_end, by seq (`self.sent`: when
        each was handed to the pipe, after the event log's write)."""
        self._fifo.write("done\n")
        self._fifo.close()
        path = self.run_dir / CREATED
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the emitter did not write {path}")
            time.sleep(0.02)
        stamps = json.loads(path.read_text())
        self.sent = {int(k): v for k, v in stamps["sent"].items()}
        return {int(k): v for k, v in stamps["created"].items()}
