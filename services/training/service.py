"""The training service's runs: start, resume and stop them in worker processes, take in what
the workers write, and answer for runs found on disk after a restart.

Per run, events come from its events.jsonl (written by the worker), so a restart replays them; a
run whose worker is gone without a terminal event is reported `interrupted`, never `running`
forever. Events reach subscribers through the EventHub (hub.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from services.api import training_pb2
from services.api.codec import parse_timestamp, run_status_name
from services.api.generate_request import GenerateSpec
from services.api.run_config import RunConfig, build_config, config_from_dict, config_to_dict
from services.core.errors import Conflict, InvalidInput, NotFound, OneSeekError
from services.core.layout import ARTIFACTS, EVENTS_FILE, MANIFEST_FILE, certified_root
from services.core.training_config import (
    TRAINING_CONFIG,
    generate_run_id,
    validate_model_name,
    validate_run_id,
)
from services.training.checkpoints import latest_checkpoint
from services.training.data import Record, load_dataset
from services.training.events import read_events
from services.training.executors import ExecutorSettings
from services.training.generation import Generator
from services.training.hub import Event, EventHub, RunRecord
from services.training.memory_plan import placements_of, planned_models
from services.training.models import BaseModelInfo, resolve_models
from services.training.run_folder import RunFolder
from services.training.worker import WorkerHandle

log = logging.getLogger("oneseek.training.service")

RUNNING = training_pb2.RUN_STATUS_RUNNING
FAILED = training_pb2.RUN_STATUS_FAILED
INTERRUPTED = training_pb2.RUN_STATUS_INTERRUPTED
CERTIFIED = (
    training_pb2.RUN_STATUS_COMPLETED,
    training_pb2.RUN_STATUS_AUTO_STOPPED,
    training_pb2.RUN_STATUS_STOPPED,
)
FOREIGN_POLL = 1.0  # seconds between looks at a run another process still holds
JOURNAL = Path("training") / "journal.jsonl"


class TrainingService:
    def __init__(
        self,
        *,
        models_root: Path,
        datasets_root: Path,
        state_dir: Path,
        max_active_runs: int | None = None,
        stop_timeout: float = 60.0,
        executor: ExecutorSettings | None = None,
        generate_cache_bytes: int | None = None,
    ) -> None:
        self.models_root = Path(models_root)
        self.state_dir = Path(state_dir)
        self.datasets_root = Path(datasets_root)
        self.max_active_runs = max_active_runs or int(
            TRAINING_CONFIG["defaults"]["max_active_runs"]
        )
        self.stop_timeout = stop_timeout
        self.executor = executor or ExecutorSettings()
        self.hub = EventHub(Path(state_dir) / JOURNAL)
        self.runs = self.hub.runs
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.generator = Generator(self.models_root, cache_bytes=generate_cache_bytes)

    # ---- start-up: what is on disk --------------------------------------------------------

    def load(self) -> None:
        """Reads every run folder, reconciles the journal, marks orphaned runs interrupted."""
        self.hub.loop = asyncio.get_running_loop()
        for record in read_runs(self.models_root):
            self.runs[record.run_id] = record
        self.hub.journal_missing()
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
        self.hub.end(
            record,
            INTERRUPTED,
            "The training service stopped while this run was active; "
            f"it completed {record.state.current_epoch} epoch(s) and can be resumed.",
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
                    self.hub.take_in(record, await asyncio.to_thread(self.hub.logged, record))
                    if record.status == RUNNING and record.worker is None:
                        self._interrupted(record)

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
            models = await asyncio.to_thread(self._resolve, config)
            folder = await asyncio.to_thread(self._create_folder, config, models)
            record = RunRecord(
                folder=folder,
                config=config,
                models=models,
                created_at=parse_timestamp(folder.created_at),
            )
            self.runs[record.run_id] = record
            await asyncio.to_thread(self._spawn, record)
        log.info("run started models=%s", ",".join(config.base_models), extra=_run(record))
        return record

    def _resolve(self, config: RunConfig) -> list[dict[str, Any]]:
        """The run's base models, as found now, each placed by the memory plan; its dataset
        must load (bad records refused), and the run must fit this machine."""
        models = resolve_models(list(config.base_models), self.models_root)
        dataset = load_dataset(config.dataset_id, self.datasets_root)
        return self._plan(config, models, dataset.records)

    def _plan(
        self, config: RunConfig, models: Sequence[BaseModelInfo], records: Sequence[Record]
    ) -> list[dict[str, Any]]:
        """The memory plan: on this machine (local), or in the Ray cluster, which must host
        every member at once (a 400 naming the shortfall, never a run waiting forever)."""
        if self.executor.kind != "ray":
            return planned_models(config, models, records)
        from services.training.ray_executor import cluster_check, cluster_resources

        resources = cluster_resources(self.executor.ray_address)
        gpus = int(resources.get("GPU", 0))
        planned = planned_models(config, models, records, cluster_gpus=gpus)
        cluster_check(resources, placements_of(planned) or [])
        return planned

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
            "models": record.models,
            "executor": self.executor.to_dict(),
            "datasets_root": str(self.datasets_root),
            "start_seq": start_seq,
            "resume_from": str(resume_from) if resume_from is not None else None,
        }
        handles: list[WorkerHandle] = []
        worker = WorkerHandle(
            record.run_id,
            spec,
            on_event=lambda data: self.hub.deliver(record, Event.FromString(data)),
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
            await asyncio.to_thread(record.check_resumable)
            self._check_capacity(then=f"resume {run_id}")
            epoch, checkpoint = await asyncio.to_thread(self._resume_point, record)
            record.state.resume(epoch + 1)
            try:
                await asyncio.to_thread(self._spawn, record, record.last_seq, checkpoint)
            except Exception:
                record.state = record.fold()  # what its events say: resumable as before
                raise
        log.info("run resumed after epoch %s", epoch, extra=_run(record))
        return record

    def _resume_point(self, record: RunRecord) -> tuple[int, Path | None]:
        """(last completed epoch, its checkpoint folder); the run's models and dataset must
        still be there, unchanged."""
        models = resolve_models(list(record.config.base_models), self.models_root)
        dataset = load_dataset(record.config.dataset_id, self.datasets_root)
        # planned afresh: the machine's free memory, even its GPUs, may have changed
        record.models = self._plan(record.config, models, dataset.records)
        record.state.models = record.model_infos()
        record.folder.write_manifest(record.config, record.models)
        checkpoint = latest_checkpoint(record.folder.path)
        if checkpoint is None:
            if record.state.current_epoch:
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
                f"Run {run_id} has no {name} yet (status {record.state.status}).", field="name"
            ) from exc
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()

    async def stop(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record.status != RUNNING or record.worker is None:
            raise Conflict(
                f"Run {run_id} is not running (status {record.state.status}); "
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

    def watch(self, run_id: str, after_seq: int) -> AsyncIterator[Event]:
        return self.hub.watch(self.get(run_id), after_seq)

    # ---- when a worker is gone -------------------------------------------------------------

    # ---- using what a run trained -------------------------------------------------------------

    def finished(self, run_id: str, field: str = "runId") -> RunRecord:
        """A run that ended certified; Conflict for one that is running or ended without."""
        record = self.get(run_id)
        if record.status not in CERTIFIED:
            status = run_status_name(record.status)
            why = (
                "it is still training; try it once it has ended"
                if record.status == RUNNING
                else "it ended with nothing certified; resume it first"
            )
            raise Conflict(f"Run {run_id} is {status}: {why}.", field=field)
        return record

    def _model_of(self, record: RunRecord, name: str, field: str = "models") -> str:
        names = [str(m.get("name")) for m in record.models]
        if name not in names:
            raise NotFound(
                f"Model {name!r} is not one of run {record.run_id}'s models ({', '.join(names)}).",
                field=field,
            )
        return name

    async def generate(
        self, run_id: str, spec: GenerateSpec
    ) -> AsyncIterator[training_pb2.GenerateEvent]:
        """The answers of a finished run's models (`spec.models`, or its best) as they come."""
        record = self.finished(run_id)
        best = record.state.best_model
        names = list(spec.models) or ([best] if best else [])
        if not names:
            raise Conflict(f"Run {run_id} has no best model; name the models.", field="models")
        models = [self._model_of(record, name) for name in names]
        async for event in self.generator.stream(record.folder.path, models, spec):
            yield event

    async def export(
        self, run_id: str, model: str, merge: bool
    ) -> AsyncIterator[training_pb2.ExportChunk]:
        """One model of a finished run exported (services.training.export), streamed as a tar
        archive; the folder is made in the service's state folder and removed afterwards."""
        from services.training.export import archive_chunks, export_model

        record = self.finished(run_id)
        self._model_of(record, validate_model_name(model, "model"), "model")
        kind = "merged" if merge else "adapter"
        name = f"{run_id}-{model}-{kind}"
        staging = self.state_dir / "exports" / f"{name}-{uuid.uuid4().hex[:8]}"
        out = staging / name
        try:
            await asyncio.to_thread(staging.mkdir, parents=True)
            await asyncio.to_thread(
                export_model,
                record.folder.path,
                model,
                out,
                merge=merge,
                models_root=self.models_root,
            )
            chunks = archive_chunks(out)
            first = True
            while True:
                data = await asyncio.to_thread(next, chunks, None)
                if data is None:
                    break
                yield training_pb2.ExportChunk(filename=f"{name}.tar" if first else "", data=data)
                first = False
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    def _worker_exited(self, record: RunRecord, worker: WorkerHandle, code: int | None) -> None:
        """Reader thread, after the worker's pipe closed and the process was joined: reads what
        the worker wrote here, off the loop, and hands it to the loop."""
        assert self.hub.loop is not None
        on_disk = self.hub.logged(record)
        self.hub.loop.call_soon_threadsafe(self._after_exit, record, worker, code, on_disk)

    def _after_exit(
        self, record: RunRecord, worker: WorkerHandle, code: int | None, logged: list[Event] | None
    ) -> None:
        if record.worker is not worker:
            return  # an older worker of a run that has been resumed since
        record.worker = None
        self.hub.take_in(record, logged)
        if record.status != RUNNING:
            log.info("worker exited code=%s", code, extra=_run(record))
            return
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else f"exited with code {code}"
        )
        log.error("worker died without finishing: %s", how, extra=_run(record))
        self.hub.end(
            record,
            FAILED,
            f"The training worker {how} during epoch {record.state.current_epoch + 1}; "
            "see the service log. Resume the run or start a new one.",
        )

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
        await asyncio.to_thread(self.generator.shutdown)
        self.hub.journal.close()


def _run(record: RunRecord) -> dict[str, str]:
    return {"run_id": record.run_id}


def read_runs(models_root: Path) -> list[RunRecord]:
    """Every run folder under MODELS_DIR, with its events; unreadable ones are skipped."""
    root = certified_root(models_root)
    records = []
    for path in sorted(root.glob("run-*")) if root.exists() else []:
        if not (path / MANIFEST_FILE).exists():
            continue
        try:
            folder = RunFolder(path)
            manifest = folder.read_manifest()
            record = RunRecord(
                folder=folder,
                config=config_from_dict(manifest["config"]),
                models=list(manifest.get("models", [])),
                created_at=parse_timestamp(manifest["created_at"]),
                events=list(read_events(path / EVENTS_FILE)),
            )
        except (OSError, ValueError, KeyError, OneSeekError) as exc:
            log.warning("skipping unreadable run folder %s: %s", path, exc)
            continue
        records.append(record)
    return records
