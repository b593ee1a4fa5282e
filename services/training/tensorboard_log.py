"""A run's TensorBoard event files, made from its events: `tensorboard/models/<model>/` (the
train loss at each logged step; per epoch the train and validation loss, the adaptive weight and
the effective learning rate) and `tensorboard/population/` (the population loss per epoch).

They are one more view of the event stream, like the page: written by whichever process owns
the run's EventLog (the CLI, or the run's worker with either executor), outside the certificate.
Every scalar is derived from events.jsonl, so a resumed run rebuilds them from it: an epoch
trained again (after a crash, a resume, a lost member) never shows twice, and nothing a crash
kept from the files is lost. A file that cannot be written never fails a run.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.api import training_pb2
from services.training.events import EventLog, read_events

log = logging.getLogger("oneseek.training.tensorboard")

MODELS_RUN = "models"
"""`models/<model>`: one TensorBoard run per model, so its charts overlay the models."""
POPULATION_RUN = "population"
TRAIN_LOSS = "train/loss"
"""x: the global step, (epoch - 1) × steps per epoch + step; y: the epoch's running train loss
so far (token-weighted), what each progress event carries."""
EPOCH_TAGS = {
    "train_losses": "epoch/train_loss",
    "val_losses": "epoch/val_loss",
    "weights": "epoch/weight",
    "lr_multipliers": "epoch/learning_rate",
}
"""x: the epoch. epoch_end's maps by model: the weight and effective learning rate are those
the epoch's adjustment set (what the leaderboard shows after it, and the next epoch trains
with)."""
POPULATION_LOSS = "epoch/population_loss"
_FLUSHED = frozenset({"epoch_end", "training_complete", "training_error"})


@dataclass(frozen=True)
class Scalar:
    run: str
    """The TensorBoard run: a folder under tensorboard/."""
    tag: str
    step: int
    value: float
    walltime: float
    """The event's time, so files rebuilt on a resume keep the original times."""
    epoch: int


def scalars_of(event: training_pb2.TrainingEvent) -> list[Scalar]:
    """What one event shows in TensorBoard (most events show nothing)."""
    kind = event.WhichOneof("payload")
    walltime = event.timestamp.seconds + event.timestamp.nanos / 1e9
    if kind == "progress":
        p = event.progress
        step = (p.epoch - 1) * p.total_steps + p.step
        return [
            Scalar(f"{MODELS_RUN}/{p.model}", TRAIN_LOSS, step, p.train_loss, walltime, p.epoch)
        ]
    if kind != "epoch_end":
        return []
    end, found = event.epoch_end, []
    for field, tag in EPOCH_TAGS.items():
        values: Any = getattr(end, field)
        for model in sorted(values):
            run = f"{MODELS_RUN}/{model}"
            found.append(Scalar(run, tag, end.epoch, float(values[model]), walltime, end.epoch))
    found.append(
        Scalar(POPULATION_RUN, POPULATION_LOSS, end.epoch, end.total_loss, walltime, end.epoch)
    )
    return found


class TensorBoardLog:
    """The scalars of a run's events so far, kept in memory (a few per epoch and per progress
    interval) and written to `root`; when an epoch starts again, its earlier attempt's steps
    are dropped and the files rewritten without them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._scalars: list[Scalar] = []
        self._written = 0
        """How many of `_scalars` the files hold."""
        self._stale = False
        """The files hold scalars no longer kept (or an earlier process's): rewrite them."""
        self._writers: dict[str, Any] = {}
        self._failed = False

    @classmethod
    def follow(cls, root: Path, events: EventLog) -> TensorBoardLog:
        """The run's TensorBoard log: rebuilt from what `events`' file holds (a resumed run's
        earlier events; earlier files are replaced at the first write), then fed every event
        `events` emits."""
        board = cls(root)
        if events.path is not None:
            try:
                for event in read_events(events.path):
                    board.take(event)
            except (OSError, ValueError) as error:  # the run itself reads the log again
                log.warning("TensorBoard files of %s miss events: %s", events.path, error)
        board._stale = board.root.exists()
        events.add_sink(board.on_event)
        return board

    def take(self, event: training_pb2.TrainingEvent) -> None:
        """Keeps what `event` shows, without writing."""
        if event.WhichOneof("payload") == "epoch_start":
            # an epoch (re)starting: steps of an earlier attempt at it were never concluded
            # (they come last: events arrive in epoch order)
            epoch = event.epoch_start.epoch
            kept = [s for s in self._scalars if s.epoch < epoch]
            if len(kept) < self._written:
                self._stale = True
            self._scalars = kept
        self._scalars.extend(scalars_of(event))

    def on_event(self, event: training_pb2.TrainingEvent) -> None:
        """An EventLog sink: keep the event's scalars, write them, flush at every epoch's end
        and at the run's end. Trouble writing is logged, and ends the TensorBoard log only."""
        if self._failed:
            return
        try:
            self.take(event)
            self.write(flush=event.WhichOneof("payload") in _FLUSHED)
        except Exception as error:  # a log view must never fail the run (disk full, ...)
            self._failed = True
            log.warning(
                "TensorBoard files in %s are not written for the rest of this run (%s); "
                "events.jsonl has everything, and resuming rebuilds them",
                self.root,
                error,
            )
            self._close()

    def write(self, *, flush: bool = False) -> None:
        """Writes what the files lack (all of it, into fresh files, when they are stale)."""
        if self._stale:
            self._close()
            shutil.rmtree(self.root, ignore_errors=True)
            self._written, self._stale = 0, False
        for scalar in self._scalars[self._written :]:
            self._writer(scalar.run).add_scalar(
                scalar.tag, scalar.value, scalar.step, walltime=scalar.walltime
            )
        self._written = len(self._scalars)
        if flush:
            for writer in self._writers.values():
                writer.flush()

    def close(self) -> None:
        if not self._failed:
            try:
                self.write(flush=True)
            except Exception as error:
                log.warning("TensorBoard files in %s could not be completed: %s", self.root, error)
        self._close()

    def _writer(self, run: str) -> Any:
        writer = self._writers.get(run)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.root / run))
            self._writers[run] = writer
        return writer

    def _close(self) -> None:
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            try:
                writer.close()
            except Exception as error:  # its file is given up either way
                log.debug("closing a TensorBoard writer in %s: %s", self.root, error)
