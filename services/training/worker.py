"""A run's worker process, and the service-side handle that owns it.

Each run trains in its own process, started with `spawn` (never fork once gRPC threads
exist), so a crash, a hang or an out-of-memory kill in training never touches the service.
The worker writes the run's events.jsonl itself (EventLog) and sends every event, serialized,
over a pipe; the service only reads. If the service dies, the pipe closes and the worker exits
at once without a terminal event, so the run is honestly `interrupted` and resumable.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger("oneseek.training.worker")

STOP = b"stop"
EXIT_ORPHANED = 3


def worker_main(spec: dict[str, Any], conn: Connection) -> None:
    """Entry point in the child process: train the run described by `spec`."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the service's terminal

    from services.api.run_config import config_from_dict
    from services.training.data import load_dataset
    from services.training.events import EVENTS_FILE, EventLog
    from services.training.executors import ExecutorSettings
    from services.training.memory_plan import placements_of
    from services.training.models import resolve_models
    from services.training.population import TrainingRun
    from services.training.run_folder import RunFolder

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    send_lock = threading.Lock()

    def listen() -> None:
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                os._exit(EXIT_ORPHANED)  # the service is gone: nobody will record what follows
            if message == STOP:
                stop.set()

    threading.Thread(target=listen, name="oneseek-worker-listen", daemon=True).start()

    def send(event: Any) -> None:
        try:
            with send_lock:
                conn.send_bytes(event.SerializeToString())
        except (BrokenPipeError, OSError):
            os._exit(EXIT_ORPHANED)

    config = config_from_dict(spec["config"])
    executing = ExecutorSettings.from_dict(spec.get("executor"))
    folder = RunFolder(Path(spec["run_dir"]))
    resume_from = spec.get("resume_from")
    # a resumed run's previous worker may still be on its way out, or someone is reading the
    # lock to tell whether the run is being trained
    with folder.worker_lock(wait=10.0):
        events = EventLog(
            folder.run_id,
            path=folder.path / EVENTS_FILE,
            sinks=(send,),
            start_seq=int(spec.get("start_seq", 0)),
        )
        models_root = Path(spec["models_root"])
        run = TrainingRun(
            config,
            run_id=folder.run_id,
            models=resolve_models(list(config.base_models), models_root),
            dataset=load_dataset(config.dataset_id, Path(spec["datasets_root"])),
            folder=folder,
            events=events,
            stop=stop,
            placements=placements_of(spec.get("models", ())),
            resume_from=Path(resume_from) if resume_from else None,
            executor=executing.create(),
            max_member_restarts=executing.max_member_restarts,
        )
        run.run()  # a resumed run first sends what the log lacks of its last epoch
    conn.close()


class WorkerHandle:
    """The service's side of one worker: start it, read its events, stop or kill it.

    `on_event(bytes)` and `on_exit(exitcode)` are called from the reader thread; the owner
    hands them to its event loop.
    """

    def __init__(
        self,
        run_id: str,
        spec: dict[str, Any],
        on_event: Callable[[bytes], None],
        on_exit: Callable[[int | None], None],
    ) -> None:
        self.run_id = run_id
        self._on_event = on_event
        self._on_exit = on_exit
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=worker_main, args=(spec, child), name=f"oneseek-{run_id}", daemon=False
        )
        self._child = child
        self._reader = threading.Thread(target=self._read, name=f"oneseek-read-{run_id}")

    def start(self) -> None:
        self.process.start()
        self._child.close()  # only the child holds its end now: EOF means it is gone
        self._reader.start()
        log.info("worker started pid=%s", self.process.pid, extra={"run_id": self.run_id})

    def _read(self) -> None:
        while True:
            try:
                data = self._conn.recv_bytes()
            except (EOFError, OSError):
                break
            self._on_event(data)
        self.process.join()
        self._on_exit(self.process.exitcode)

    def request_stop(self) -> None:
        with contextlib.suppress(OSError):  # already gone: the reader reports its exit
            self._conn.send_bytes(STOP)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def join(self, timeout: float | None = None) -> None:
        self._reader.join(timeout)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()
