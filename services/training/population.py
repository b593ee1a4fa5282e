"""The population trainer: several base models fine-tuned side by side, epoch by epoch.

The Population trains its members on the same batches in the same order, validates them, and
applies the rules between epochs (docs/rules.md), speaking through events. A TrainingRun
takes it from its config to a certified run folder or an honest failure, writing each epoch's
checkpoint before announcing the epoch, so no epoch a client saw end is ever trained again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from services.api import training_pb2
from services.api.codec import event_from_dict, event_to_dict, message_to_dict, now_timestamp
from services.api.run_config import (
    RunConfig,
    adaptive_weights,
    auto_stop,
    config_from_dict,
    config_to_dict,
)
from services.core.adaptive_weights import adjust_weights, lr_multipliers, population_loss
from services.core.auto_stop import auto_stop_step
from services.core.errors import ArtifactError, InvalidInput, NotFound, OneSeekError
from services.training.checkpoints import (
    CheckpointMismatch,
    TrainingProgress,
    capture_rng,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    remove_checkpoints,
    restore_rng,
    save_checkpoint,
)
from services.training.data import Dataset, split_dataset
from services.training.events import EventLog, read_events
from services.training.executors import (
    DEFAULT_MAX_MEMBER_RESTARTS,
    Executor,
    LocalExecutor,
    MemberLost,
)
from services.training.member import StepInfo as StepInfo
from services.training.memory_plan import plan_members
from services.training.models import BaseModelInfo
from services.training.run_folder import RunFolder, RunSummary
from services.training.tensorboard_log import TensorBoardLog

log = logging.getLogger("oneseek.training.population")

ANNOUNCED = ("epoch_end", "weight_adjustment", "auto_stop_triggered")
"""The events that announce an epoch's end."""
ADJUSTMENT_KEYS = ("epoch", "ranking", "previous_weights", "raw_weights", "weights", "applied_lrs")
"""What training_results.json keeps of each weight_adjustment event."""
Logged = Mapping[tuple[str, int], training_pb2.TrainingEvent]  # events.jsonl's, by (type, epoch)


class TrainingDiverged(OneSeekError):
    """A model's loss became NaN or infinite."""


def diverged(model: str, epoch: int, loss: float) -> TrainingDiverged:
    return TrainingDiverged(
        f"Model '{model}' diverged at epoch {epoch}: its loss is {loss}. "
        "Lower the learning rate or check the model's weights and the data."
    )


def resumable_failure(exc: BaseException) -> bool:
    """Whether resuming could get past `exc`: yes for trouble from outside the run (disk,
    memory); no for a divergence or bad input, which the same epoch would only repeat, and
    no for an unexpected error, which is most likely a bug that would repeat as well."""
    if isinstance(exc, (TrainingDiverged, InvalidInput, NotFound)):
        return False
    if isinstance(exc, (ArtifactError, OSError, MemoryError, MemberLost)):
        return True
    return isinstance(exc, torch.cuda.OutOfMemoryError)


class Population:
    """The epoch barrier over its members, the rules between epochs, and their events."""

    def __init__(
        self,
        config: RunConfig,
        progress: TrainingProgress,
        events: EventLog,
        stop: threading.Event,
        on_step: Callable[[StepInfo], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.events = events
        self.stop = stop
        self.on_step = on_step
        self.executor: Executor = executor or LocalExecutor()
        self.placements: list[training_pb2.Placement] = []
        """Each member's, as its executor placed it (TrainingRun.prepare sets them)."""
        self.members: list[Any] = []
        """PopulationMembers (local), or handles on members elsewhere (see executors.py)."""
        self.epoch = progress.epoch  # the one training, or the last one done
        self._last_progress = -math.inf

    @property
    def steps_planned(self) -> int:
        return int(sum(member.steps_per_epoch for member in self.members)) * self.config.epochs

    def progress_percent(self) -> float:
        if self.steps_planned == 0:
            return 0.0
        return min(100.0, 100.0 * self.progress.steps_done / self.steps_planned)

    def train(self, epoch: int) -> dict[str, float] | None:
        """Trains every member through the epoch: their train losses, or None on a stop."""
        self.epoch = epoch
        lrs = lr_multipliers(self.progress.weights, self.config.learning_rate)
        start = training_pb2.EpochStart(epoch=epoch, total_epochs=self.config.epochs)
        start.weights.update(self.progress.weights)
        start.lr_multipliers.update(lrs)
        start.placement.extend(p for p in self.placements if p.node)
        self.events.emit("epoch_start", start)
        return self.executor.train_epoch(self.members, epoch, self.stop.is_set, self._stepped)

    def _stepped(self, member: Any, step: StepInfo) -> None:
        progress = self.progress
        progress.steps_done += 1
        progress.step_seconds += step.seconds
        if self.on_step is not None:
            self.on_step(
                replace(step, steps_done=progress.steps_done, steps_planned=self.steps_planned)
            )
        if time.perf_counter() - self._last_progress < self.config.refresh_interval:
            return
        self._last_progress = time.perf_counter()  # at most one per refresh_interval
        train_loss = member.running_loss()
        if not math.isfinite(train_loss):
            raise diverged(member.name, step.epoch, train_loss)
        event = training_pb2.Progress(
            epoch=step.epoch,
            model=step.model,
            step=step.step,
            total_steps=step.total_steps,
            train_loss=train_loss,
            tokens_per_second=step.tokens / step.elapsed if step.elapsed > 0 else 0.0,
            progress_percent=self.progress_percent(),
        )
        per_step = progress.step_seconds / progress.steps_done
        event.eta_seconds = (self.steps_planned - progress.steps_done) * per_step
        self.events.emit("progress", event)

    def conclude(
        self, epoch: int, train_losses: dict[str, float]
    ) -> tuple[TrainingProgress, list[Any]]:
        """Validates every member, computes the new weights and sets each optimizer's rate.

        Returns the progress after the epoch, its announcement stamped but not sent (it goes
        out once the progress is durable: `announce`), and the members that improved."""
        cfg, before = self.config, self.progress
        val_losses = self.executor.validate(self.members)
        for name, value in (*train_losses.items(), *val_losses.items()):
            if not math.isfinite(value):
                raise diverged(name, epoch, value)
        best, improved = dict(before.best), []
        for m in self.members:
            if best[m.name]["val_loss"] is None or val_losses[m.name] < best[m.name]["val_loss"]:
                best[m.name] = {"epoch": epoch, "val_loss": val_losses[m.name]}
                improved.append(m)
        total = population_loss(val_losses, before.weights)
        adjustment = adjust_weights(before.weights, val_losses, adaptive_weights(cfg))
        lrs = lr_multipliers(adjustment.weights, cfg.learning_rate)
        applied = {m.name: m.set_learning_rate(lrs[m.name]) for m in self.members}
        stopping = auto_stop_step(before.auto_stop, total, auto_stop(cfg))

        info = training_pb2.AutoStopInfo(**stopping.info(auto_stop(cfg)))
        end = training_pb2.EpochEnd(
            epoch=epoch,
            current_epoch=epoch,
            total_epochs=cfg.epochs,
            total_loss=total,
            progress_percent=self.progress_percent(),
            auto_stop_info=info,
        )
        end.val_losses.update(val_losses)
        end.train_losses.update(train_losses)
        end.weights.update(adjustment.weights)
        end.lr_multipliers.update(lrs)
        change = training_pb2.WeightAdjustment(epoch=epoch, ranking=list(adjustment.ranking))
        change.previous_weights.update(adjustment.previous_weights)
        change.raw_weights.update(adjustment.raw_weights)
        change.weights.update(adjustment.weights)
        change.lr_multipliers.update(lrs)
        change.applied_lrs.update(applied)
        payloads: list[tuple[str, Any]] = [("epoch_end", end), ("weight_adjustment", change)]
        if stopping.triggered:
            window = stopping.window(auto_stop(cfg))
            fired = training_pb2.AutoStopTriggered(epoch=epoch, window=window, auto_stop_info=info)
            payloads.append(("auto_stop_triggered", fired))
        announcement = [self._stamped(n, *payload) for n, payload in enumerate(payloads, start=1)]
        after = replace(
            before,
            epoch=epoch,
            weights=dict(adjustment.weights),
            auto_stop=stopping,
            best=best,
            history=[*before.history, announcement[0]],
            adjustments=[*before.adjustments, {k: announcement[1][k] for k in ADJUSTMENT_KEYS}],
            last_val_losses=val_losses,
            last_total=total,
            announcement=announcement,
        )
        return after, improved

    def _stamped(self, after: int, kind: str, payload: Any) -> dict[str, Any]:
        """The event as it would go out `after` events from now (sending stamps it afresh)."""
        event = training_pb2.TrainingEvent(
            run_id=self.events.run_id, seq=self.events.seq + after, timestamp=now_timestamp()
        )
        getattr(event, kind).CopyFrom(payload)
        return event_to_dict(event)

    def announce(self, logged: Logged) -> None:
        """Sends the last epoch's announcement but what `logged` holds (a resumed run's log
        may have some or all of it); the history keeps its epoch_end as the log has it."""
        for data in self.progress.announcement:
            event = logged.get((data["type"], data["epoch"]))
            if event is None:
                kind = data["type"]
                event = self.events.emit(kind, getattr(event_from_dict(data), kind))
            if event.HasField("epoch_end"):
                self.progress.history[-1] = event_to_dict(event)


class TrainingRun:
    """One run: prepare → (resume) → epochs → a certified folder, or a recorded failure."""

    def __init__(
        self,
        config: RunConfig,
        *,
        run_id: str,
        models: Sequence[BaseModelInfo],
        dataset: Dataset,
        folder: RunFolder,
        events: EventLog,
        stop: threading.Event | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        placements: Sequence[training_pb2.Placement] | None = None,
        resume_from: Path | None = None,
        executor: Executor | None = None,
        max_member_restarts: int = DEFAULT_MAX_MEMBER_RESTARTS,
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.infos = list(models)
        self.dataset = dataset
        self.folder = folder
        self.events = events
        self.stop = stop or threading.Event()
        self.placements = list(placements) if placements is not None else None
        self.resume_from = resume_from
        names = [info.name for info in self.infos]
        progress = TrainingProgress.start(run_id, config, dataset.sha256, names)
        self.executor: Executor = executor or LocalExecutor()
        self.max_member_restarts = max_member_restarts
        self.restarts = 0
        self.population = Population(config, progress, events, self.stop, on_step, self.executor)
        self.split_counts = (0, 0)
        self._started = time.monotonic()

    def prepare(self) -> None:
        """Plans the members' memory (unless planned already), splits the data and loads every
        member (done first: bad input fails up front)."""
        cfg = self.config
        if self.placements is None:
            self.placements = plan_members(cfg, self.infos, self.dataset.records)
        train, validation = split_dataset(self.dataset.records, cfg.validation_split, cfg.seed)
        self.split_counts = (len(train), len(validation))
        where = {placement.model: placement for placement in self.placements}
        self.population.members = self.executor.build(cfg, self.infos, train, validation, where)
        for member in self.population.members:  # where the executor put it
            where[member.name].node = member.node
        self.population.placements = list(self.placements)

    def run(self) -> RunSummary:
        self._started = time.monotonic()
        self.folder.started()
        board = TensorBoardLog.follow(self.folder.tensorboard_dir, self.events)
        try:
            if not self.population.members:
                self.prepare()
            if self.resume_from is not None:
                self.resume(self.resume_from)
            return self._finish(self._train())
        except Exception as exc:
            return self._fail(exc)
        finally:
            self.executor.close()
            self.events.close()
            board.close()

    def _train(self) -> training_pb2.RunStatus.ValueType:
        population = self.population
        if population.progress.auto_stop.triggered:  # resumed after it fired, before the end
            return training_pb2.RUN_STATUS_AUTO_STOPPED
        while population.progress.epoch < self.config.epochs:
            epoch = population.progress.epoch + 1
            try:
                train_losses = population.train(epoch)
                if train_losses is None:
                    return training_pb2.RUN_STATUS_STOPPED
                concluded, improved = population.conclude(epoch, train_losses)
                self._checkpoint(concluded)
                self._announce({})
                # adapters follow the checkpoint, so adapters/ never holds an epoch that
                # resuming would train again (resuming re-saves them when the crash fell in
                # between)
                for member in improved:
                    self.folder.save_adapter(member.name, member.save)
            except MemberLost as lost:
                self._recover(lost)  # every member back at the last completed epoch
                continue
            if concluded.auto_stop.triggered:
                return training_pb2.RUN_STATUS_AUTO_STOPPED
            if self.stop.is_set():
                return training_pb2.RUN_STATUS_STOPPED
        return training_pb2.RUN_STATUS_COMPLETED

    def _recover(self, lost: MemberLost) -> None:
        """After a member's process died mid-epoch: every member rebuilt and put back at the
        last completed epoch's checkpoint (or at the start), at most `max_member_restarts`
        times; then the run fails, resumable."""
        self.restarts += 1
        if self.restarts > self.max_member_restarts:
            raise MemberLost(
                f"{lost} It happened {self.restarts} times, more than the "
                f"{self.max_member_restarts} restart(s) allowed; resume the run to try again."
            ) from lost
        log.warning("%s; restart %s of %s", lost, self.restarts, self.max_member_restarts)
        self.executor.close()
        self.prepare()
        checkpoint = latest_checkpoint(self.folder.path)
        population = self.population
        if checkpoint is None:
            names = [info.name for info in self.infos]
            population.progress = TrainingProgress.start(
                self.run_id, self.config, self.dataset.sha256, names
            )
        else:
            saved = TrainingProgress.from_dict(checkpoint.state)
            for member in population.members:
                member.load_state(checkpoint.member_state(member.name), str(checkpoint.path))
            restore_rng(saved.rng)
            population.progress = saved
            for member in population.members:  # lost before its adapter was saved?
                if saved.best[member.name]["epoch"] == saved.epoch:
                    self.folder.save_adapter(member.name, member.save)
        population.epoch = population.progress.epoch

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _checkpoint(self, progress: TrainingProgress) -> None:
        """Writes the concluded epoch's checkpoint: only then does the epoch count as done."""
        progress = replace(progress, elapsed_seconds=self._elapsed(), rng=capture_rng())
        members = {member.name: member.state() for member in self.population.members}
        save_checkpoint(self.folder.path, progress.epoch, progress.to_dict(), members)
        best = min(progress.history, key=lambda h: (h["total_loss"], h["epoch"]))["epoch"]
        prune_checkpoints(self.folder.path, keep={progress.epoch, int(best)})
        self.population.progress = progress

    def _announce(self, logged: Logged) -> None:
        self.population.announce(logged)
        latest = self.population.progress.history[-1]
        self.folder.write_live_metrics(training_pb2.RUN_STATUS_RUNNING, latest)

    def resume(self, path: Path) -> None:
        """Puts the population back where the checkpoint folder `path` left it and sends what
        of that epoch's announcement the event log lacks; the run goes on after that epoch."""
        checkpoint = read_checkpoint(path)
        saved = TrainingProgress.from_dict(checkpoint.state)
        current = self.population.progress
        # read through the current RunConfig: a checkpoint older than a setting holds none
        settings = config_to_dict(config_from_dict(saved.config))
        if (saved.models, settings) != (current.models, current.config):
            raise CheckpointMismatch(
                f"The checkpoint {checkpoint.path} was written for other models or settings "
                "than this run's; it cannot be resumed from. Start a new run."
            )
        if saved.dataset_sha256 != current.dataset_sha256:
            raise CheckpointMismatch(
                f"Dataset '{self.dataset.id}' changed since run {self.run_id} started (its "
                "sha256 differs); resuming would train on other data. Start a new run.",
                field="datasetId",
            )
        for member in self.population.members:
            member.load_state(checkpoint.member_state(member.name), str(checkpoint.path))
        restore_rng(saved.rng)
        self.population.progress, self.population.epoch = saved, saved.epoch
        self._started -= saved.elapsed_seconds
        logged = read_events(self.events.path) if self.events.path is not None else ()
        self._announce(
            {
                (kind, getattr(event, kind).epoch): event
                for event in logged
                if (kind := str(event.WhichOneof("payload"))) in ANNOUNCED
            }
        )
        for member in self.population.members:
            if saved.best[member.name]["epoch"] == saved.epoch:  # crashed before its save?
                self.folder.save_adapter(member.name, member.save)
        log.info("resumed %s after epoch %s", self.run_id, saved.epoch)

    def summary(self, status: training_pb2.RunStatus.ValueType) -> RunSummary:
        return RunSummary(
            run_id=self.run_id,
            run_dir=self.folder.path,
            config=self.config,
            status=status,
            duration_seconds=self._elapsed(),
            dataset=self.dataset.summary(*self.split_counts),
            base_models=list(self.infos),
            placements=[message_to_dict(p) for p in self.placements or ()],
            progress=self.population.progress,
        )

    def _finish(self, status: training_pb2.RunStatus.ValueType) -> RunSummary:
        progress = self.population.progress
        for member in self.population.members:
            if progress.best[member.name]["epoch"] is None:  # stopped before its first epoch
                self.folder.save_adapter(member.name, member.save)
        summary = self.summary(status)
        summary.dna = self.folder.certify(summary)
        done = training_pb2.TrainingComplete(
            status=status,
            epochs_run=len(progress.history),
            dna=summary.dna,
            run_dir=str(self.folder.path),
            duration_seconds=summary.duration_seconds,
            best_model=progress.best_model(),
            total_loss=progress.last_total,
        )
        done.val_losses.update(progress.last_val_losses)
        done.weights.update(progress.weights)
        self.events.emit("training_complete", done)
        remove_checkpoints(self.folder.path)  # after the event: a crash before it can resume
        return summary

    def _fail(self, exc: BaseException) -> RunSummary:
        message = str(exc) if isinstance(exc, OneSeekError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError) and not isinstance(exc, OneSeekError):
            message = f"Disk or file error: {exc}. Check free space and permissions, then resume."
        summary = self.summary(training_pb2.RUN_STATUS_FAILED)
        summary.error, summary.resumable = message, resumable_failure(exc)
        unexpected = not isinstance(exc, (OneSeekError, OSError))
        log.error("run failed (resumable=%s): %s", summary.resumable, message, exc_info=unexpected)
        try:
            self.folder.write_failure(summary, error_seq=self.events.seq + 1)
        except Exception as write_error:
            summary.error += f" (the run folder could not be written either: {write_error})"
        error = training_pb2.TrainingError(
            message=summary.error, status=training_pb2.RUN_STATUS_FAILED
        )
        if self.population.epoch:
            error.epoch = self.population.epoch
        try:
            self.events.emit("training_error", error)
        except Exception:
            self.events.path = None
            self.events.emit("training_error", error)
        return summary
