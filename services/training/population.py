"""The population trainer: fine-tunes several base models on one dataset, epoch by epoch.

Every epoch each model trains on the same batches in the same order with its own optimizer,
then all are validated on the held-out split, the adaptive weights engine moves their
learning rates, and confidence auto-stop decides whether the population has plateaued.
Everything that happens is an event (services.api TrainingEvent) on the run's EventLog.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.api import training_pb2
from services.api.codec import run_status_name
from services.api.run_config import RunConfig, adaptive_weights, auto_stop, config_to_dict, is_lora
from services.core.adaptive_weights import (
    WeightAdjustment,
    adjust_weights,
    initial_weights,
    lr_multipliers,
    population_loss,
)
from services.core.auto_stop import AutoStopState, auto_stop_step
from services.core.errors import ArtifactError, InvalidInput, NotFound, OneSeekError
from services.training.checkpoints import (
    capture_rng,
    prune_checkpoints,
    read_checkpoint,
    remove_checkpoints,
    restore_optimizer,
    restore_rng,
    restore_trainable,
    save_checkpoint,
)
from services.training.data import (
    Batch,
    Dataset,
    TokenizedExample,
    make_batches,
    split_dataset,
    tokenize_records,
)
from services.training.events import EventLog
from services.training.models import BaseModelInfo, load_model, load_tokenizer
from services.training.run_folder import RunFolder

log = logging.getLogger("oneseek.training.population")


class TrainingDiverged(OneSeekError):
    """A model's loss became NaN or infinite."""


class CheckpointMismatch(InvalidInput):
    """A checkpoint does not belong to this run's models, data or settings."""


def resumable_failure(exc: BaseException) -> bool:
    """Whether resuming could get past `exc`: yes for trouble from outside the run (disk,
    memory); no for a divergence or bad input, which the same epoch would only repeat, and
    no for an unexpected error, which is most likely a bug that would repeat as well."""
    if isinstance(exc, (TrainingDiverged, InvalidInput, NotFound)):
        return False
    if isinstance(exc, (ArtifactError, OSError, MemoryError)):
        return True
    return isinstance(exc, torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class StepInfo:
    """Handed to `on_step` after every optimizer step (cheap: no device sync)."""

    epoch: int
    model: str
    step: int
    total_steps: int
    steps_done: int
    steps_planned: int


@dataclass
class ModelSlot:
    """One model of the population and everything that belongs to it alone."""

    info: BaseModelInfo
    model: nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    train_examples: list[TokenizedExample]
    val_batches: list[Batch]
    best_val_loss: float | None = None
    best_epoch: int | None = None

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: training_pb2.RunStatus.ValueType
    epochs_run: int
    best_model: str | None
    dna: str | None
    duration_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    resumable: bool = False

    @property
    def status_name(self) -> str:
        return run_status_name(self.status) or "unknown"


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one purpose (a model's init, an epoch's shuffle) that does not depend on
    which other models are in the run, so adding a model never changes another's losses."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _token_weighted_mean(losses: Sequence[torch.Tensor], weights: Sequence[int]) -> float:
    if not losses:
        return math.nan
    stacked = torch.stack([loss.float() for loss in losses])
    counts = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    return float((stacked * counts).sum() / counts.sum())


class PopulationTrainer:
    """Runs one run from its config to a certified run folder (or an honest failure)."""

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
        device: torch.device | None = None,
        resume_from: Path | None = None,
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.infos = list(models)
        self.dataset = dataset
        self.folder = folder
        self.events = events
        self.stop = stop or threading.Event()
        self.on_step = on_step
        self.device = device or pick_device()
        self.names = [info.name for info in self.infos]
        self.weights = initial_weights(self.names)
        self.auto_stop = AutoStopState()
        self.history: list[dict[str, Any]] = []
        self.adjustments: list[dict[str, Any]] = []
        self.slots: list[ModelSlot] = []
        self.steps_per_epoch = 0
        self.steps_done = 0
        self.train_count = 0
        self.val_count = 0
        self.epoch = 0
        self._step_seconds = 0.0
        self._last_progress = -math.inf
        self._last_val_losses: dict[str, float] = {}
        self._last_total: float | None = None
        self.resume_from = resume_from
        self.start_epoch = 1
        self._elapsed_before = 0.0  # seconds trained by earlier attempts of a resumed run
        self._started = time.monotonic()

    # ---- set-up -------------------------------------------------------------------------

    @property
    def steps_planned(self) -> int:
        return self.steps_per_epoch * len(self.infos) * self.config.epochs

    def progress_percent(self) -> float:
        if self.steps_planned == 0:
            return 0.0
        return min(100.0, 100.0 * self.steps_done / self.steps_planned)

    def effective_lrs(self) -> dict[str, float]:
        return lr_multipliers(self.weights, self.config.learning_rate)

    def prepare(self) -> None:
        """Splits the data, loads and wraps every model, builds optimizers and val batches."""
        cfg = self.config
        train, val = split_dataset(self.dataset.records, cfg.validation_split, cfg.seed)
        self.train_count, self.val_count = len(train), len(val)
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        lrs = self.effective_lrs()
        for info in self.infos:
            tokenizer = load_tokenizer(info)
            torch.manual_seed(derive_seed(cfg.seed, info.name, "init"))
            model = self._wrap(load_model(info, self.device))
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(
                trainable, lr=lrs[info.name], weight_decay=cfg.weight_decay
            )
            pad = tokenizer.pad_token_id
            val_batches = [
                self._to_device(b)
                for b in make_batches(
                    tokenize_records(val, tokenizer, cfg.max_seq_length),
                    cfg.batch_size,
                    pad,
                    shuffle_seed=None,
                )
            ]
            self.slots.append(
                ModelSlot(
                    info=info,
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    train_examples=tokenize_records(train, tokenizer, cfg.max_seq_length),
                    val_batches=val_batches,
                )
            )

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not is_lora(self.config):
            return model
        from peft import LoraConfig, get_peft_model
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        from transformers.pytorch_utils import Conv1D

        model_type = getattr(getattr(model, "config", None), "model_type", "")
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        target_modules: list[str] | str = list(targets) if targets else "all-linear"
        # GPT-2 style models store their projections transposed (Conv1D); LoRA must know
        conv1d = any(
            isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in (targets or ())
            for name, module in model.named_modules()
        )
        lora = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=target_modules,
            fan_in_fan_out=conv1d,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft still asks transformers for a renamed property; the notice is not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, lora)  # type: ignore[no-any-return]

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        return Batch(
            input_ids=batch.input_ids.to(self.device, non_blocking=True),
            attention_mask=batch.attention_mask.to(self.device, non_blocking=True),
            labels=batch.labels.to(self.device, non_blocking=True),
            tokens=batch.tokens,
            target_tokens=batch.target_tokens,
        )

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        started = self._started = time.monotonic()
        self.folder.started()
        try:
            if not self.slots:  # a caller may prepare first, to report bad input up front
                self.prepare()
            if self.resume_from is not None:
                self.restore(self.resume_from)
            status = self._train()
            return self._finish(status, started)
        except Exception as exc:
            return self._fail(exc, started)
        finally:
            self.events.close()

    def _train(self) -> training_pb2.RunStatus.ValueType:
        cfg = self.config
        if self.auto_stop.triggered:  # resumed after auto-stop fired but before the run ended
            return training_pb2.RUN_STATUS_AUTO_STOPPED
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            self.epoch = epoch
            start = training_pb2.EpochStart(epoch=epoch, total_epochs=cfg.epochs)
            start.weights.update(self.weights)
            start.lr_multipliers.update(self.effective_lrs())
            self.events.emit("epoch_start", start)
            train_losses: dict[str, float] = {}
            for slot in self.slots:
                loss = self.train_epoch(slot, epoch)
                if loss is None:
                    return training_pb2.RUN_STATUS_STOPPED
                train_losses[slot.name] = loss
            val_losses = {slot.name: self._validate(slot) for slot in self.slots}
            for name, value in (*train_losses.items(), *val_losses.items()):
                if not math.isfinite(value):
                    raise self._diverged(name, epoch, value)
            improved = self._keep_best(epoch, val_losses)
            fired = self._end_epoch(epoch, train_losses, val_losses)
            self._checkpoint(epoch)
            # adapters follow the checkpoint, so adapters/ never holds an epoch that resuming
            # would train again (restore re-saves them when the crash fell in between)
            for slot in improved:
                self.folder.save_adapter(slot.name, slot.model, slot.tokenizer)
            if fired:
                return training_pb2.RUN_STATUS_AUTO_STOPPED
            if self.stop.is_set():
                return training_pb2.RUN_STATUS_STOPPED
        return training_pb2.RUN_STATUS_COMPLETED

    def train_epoch(self, slot: ModelSlot, epoch: int) -> float | None:
        """One epoch of one model; None when a stop was requested (the epoch is abandoned)."""
        cfg = self.config
        batches = make_batches(
            slot.train_examples,
            cfg.batch_size,
            slot.tokenizer.pad_token_id,
            shuffle_seed=derive_seed(cfg.seed, "shuffle", epoch),
        )
        torch.manual_seed(derive_seed(cfg.seed, slot.name, "epoch", epoch))
        model, optimizer = slot.model, slot.optimizer
        model.train()
        losses: list[torch.Tensor] = []
        counts: list[int] = []
        tokens = 0
        epoch_started = time.perf_counter()
        for step, batch in enumerate(batches, start=1):
            if self.stop.is_set():
                return None
            batch = self._to_device(batch)
            step_started = time.perf_counter()
            loss = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=batch.labels,
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            self._step_seconds += now - step_started
            self.steps_done += 1
            losses.append(loss.detach())
            counts.append(batch.target_tokens)
            tokens += batch.tokens
            if self.on_step is not None:
                self.on_step(
                    StepInfo(
                        epoch, slot.name, step, len(batches), self.steps_done, self.steps_planned
                    )
                )
            if now - self._last_progress >= cfg.refresh_interval:
                self._emit_progress(
                    slot, epoch, step, len(batches), losses, counts, tokens, now - epoch_started
                )
        return _token_weighted_mean(losses, counts)

    @staticmethod
    def _diverged(model: str, epoch: int, loss: float) -> TrainingDiverged:
        return TrainingDiverged(
            f"Model '{model}' diverged at epoch {epoch}: its loss is {loss}. "
            "Lower the learning rate or check the model's weights and the data."
        )

    def _emit_progress(
        self,
        slot: ModelSlot,
        epoch: int,
        step: int,
        total_steps: int,
        losses: Sequence[torch.Tensor],
        counts: Sequence[int],
        tokens: int,
        elapsed: float,
    ) -> None:
        self._last_progress = time.perf_counter()  # at most one per refresh_interval
        remaining = self.steps_planned - self.steps_done
        per_step = self._step_seconds / self.steps_done if self.steps_done else 0.0
        train_loss = _token_weighted_mean(losses, counts)
        if not math.isfinite(train_loss):
            raise self._diverged(slot.name, epoch, train_loss)
        progress = training_pb2.Progress(
            epoch=epoch,
            model=slot.name,
            step=step,
            total_steps=total_steps,
            train_loss=train_loss,
            tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
            progress_percent=self.progress_percent(),
        )
        if self.steps_done:
            progress.eta_seconds = remaining * per_step
        self.events.emit("progress", progress)

    @torch.no_grad()
    def _validate(self, slot: ModelSlot) -> float:
        slot.model.eval()
        losses: list[torch.Tensor] = []
        counts: list[int] = []
        for batch in slot.val_batches:
            out = slot.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
            losses.append(out.loss.detach())
            counts.append(batch.target_tokens)
        return _token_weighted_mean(losses, counts)

    def _keep_best(self, epoch: int, val_losses: dict[str, float]) -> list[ModelSlot]:
        """Notes each model's best epoch; returns the models whose adapter must be saved."""
        improved = []
        for slot in self.slots:
            loss = val_losses[slot.name]
            if slot.best_val_loss is None or loss < slot.best_val_loss:
                slot.best_val_loss, slot.best_epoch = loss, epoch
                improved.append(slot)
        return improved

    # ---- checkpoints and resuming -------------------------------------------------------

    def checkpoint_state(self, elapsed: float) -> dict[str, Any]:
        """Everything but the tensors that the next epoch depends on (JSON)."""
        return {
            "run_id": self.run_id,
            "config": config_to_dict(self.config),
            "dataset_sha256": self.dataset.sha256,
            "models": list(self.names),
            "weights": dict(self.weights),
            "auto_stop": {
                "epoch": self.auto_stop.epoch,
                "previous_total": self.auto_stop.previous_total,
                "current_change": self.auto_stop.current_change,
                "streak": self.auto_stop.streak,
                "triggered": self.auto_stop.triggered,
                "totals": list(self.auto_stop.totals),
            },
            "best": {
                slot.name: {"epoch": slot.best_epoch, "val_loss": slot.best_val_loss}
                for slot in self.slots
            },
            "history": self.history,
            "adjustments": self.adjustments,
            "last_val_losses": dict(self._last_val_losses),
            "last_total": self._last_total,
            "steps_done": self.steps_done,
            "step_seconds": self._step_seconds,
            "elapsed_seconds": elapsed,
            "rng": capture_rng(),
        }

    def _checkpoint(self, epoch: int) -> None:
        elapsed = self._elapsed_before + time.monotonic() - self._started
        save_checkpoint(
            self.folder.path,
            epoch,
            self.checkpoint_state(elapsed),
            {slot.name: (slot.model, slot.optimizer) for slot in self.slots},
        )
        best = min(self.history, key=lambda h: (h["total_loss"], h["epoch"]))["epoch"]
        prune_checkpoints(self.folder.path, keep={epoch, int(best)})

    def restore(self, path: Path) -> None:
        """Puts the population back where the checkpoint folder `path` left it; the run goes
        on with the epoch after it."""
        checkpoint = read_checkpoint(path)
        state = checkpoint.state
        if state.get("models") != self.names or state.get("config") != config_to_dict(self.config):
            raise CheckpointMismatch(
                f"The checkpoint {checkpoint.path} was written for other models or settings "
                "than this run's; it cannot be resumed from. Start a new run."
            )
        if state.get("dataset_sha256") != self.dataset.sha256:
            raise CheckpointMismatch(
                f"Dataset '{self.dataset.id}' changed since run {self.run_id} started (its "
                "sha256 differs); resuming would train on other data. Start a new run.",
                field="datasetId",
            )
        for slot in self.slots:
            try:
                restore_trainable(slot.model, checkpoint.weights_file(slot.name))
            except ArtifactError as exc:
                raise CheckpointMismatch(exc.message) from exc
            restore_optimizer(slot.optimizer, checkpoint.optimizer_file(slot.name))
            best = state["best"][slot.name]
            slot.best_epoch, slot.best_val_loss = best["epoch"], best["val_loss"]
        stop = state["auto_stop"]
        self.auto_stop = AutoStopState(
            epoch=int(stop["epoch"]),
            previous_total=stop["previous_total"],
            current_change=stop["current_change"],
            streak=int(stop["streak"]),
            triggered=bool(stop["triggered"]),
            totals=tuple(float(t) for t in stop["totals"]),
        )
        self.weights = {name: float(state["weights"][name]) for name in self.names}
        self.history = list(state["history"])
        self.adjustments = list(state["adjustments"])
        self._last_val_losses = {k: float(v) for k, v in state["last_val_losses"].items()}
        self._last_total = state["last_total"]
        self.steps_done = int(state["steps_done"])
        self._step_seconds = float(state["step_seconds"])
        self._elapsed_before = float(state["elapsed_seconds"])
        self.epoch = checkpoint.epoch
        self.start_epoch = checkpoint.epoch + 1
        restore_rng(state["rng"])
        for slot in self.slots:
            if slot.best_epoch == checkpoint.epoch:  # the crash may have come before its save
                self.folder.save_adapter(slot.name, slot.model, slot.tokenizer)
        log.info("resumed %s after epoch %s", self.run_id, checkpoint.epoch)

    def _end_epoch(
        self, epoch: int, train_losses: dict[str, float], val_losses: dict[str, float]
    ) -> bool:
        """Weights, learning rates, events and live metrics; True when auto-stop fired."""
        cfg = self.config
        total = population_loss(val_losses, self.weights)
        adjustment: WeightAdjustment = adjust_weights(
            self.weights, val_losses, adaptive_weights(cfg)
        )
        self.weights = dict(adjustment.weights)
        lrs = self.effective_lrs()
        applied: dict[str, float] = {}
        for slot in self.slots:
            for group in slot.optimizer.param_groups:
                group["lr"] = lrs[slot.name]
            applied[slot.name] = float(slot.optimizer.param_groups[0]["lr"])
        self.auto_stop = auto_stop_step(self.auto_stop, total, auto_stop(cfg))
        info = self._auto_stop_info()

        end = training_pb2.EpochEnd(
            epoch=epoch,
            current_epoch=epoch,
            total_epochs=cfg.epochs,
            total_loss=total,
            progress_percent=self.progress_percent(),
        )
        end.val_losses.update(val_losses)
        end.train_losses.update(train_losses)
        end.weights.update(self.weights)
        end.lr_multipliers.update(lrs)
        end.auto_stop_info.CopyFrom(info)
        event = self.events.emit("epoch_end", end)
        self._last_val_losses, self._last_total = val_losses, total
        self.history.append(self.folder.epoch_record(event))
        self.folder.write_live_metrics(event, training_pb2.RUN_STATUS_RUNNING)

        change = training_pb2.WeightAdjustment(epoch=epoch, ranking=list(adjustment.ranking))
        change.previous_weights.update(adjustment.previous_weights)
        change.raw_weights.update(adjustment.raw_weights)
        change.weights.update(adjustment.weights)
        change.lr_multipliers.update(lrs)
        change.applied_lrs.update(applied)
        self.events.emit("weight_adjustment", change)
        self.adjustments.append(
            {
                "epoch": epoch,
                "ranking": list(adjustment.ranking),
                "previous_weights": dict(adjustment.previous_weights),
                "raw_weights": dict(adjustment.raw_weights),
                "weights": dict(adjustment.weights),
                "applied_lrs": applied,
            }
        )

        if self.auto_stop.triggered:
            fired = training_pb2.AutoStopTriggered(
                epoch=epoch, window=self.auto_stop.window(auto_stop(cfg))
            )
            fired.auto_stop_info.CopyFrom(info)
            self.events.emit("auto_stop_triggered", fired)
            return True
        return False

    def _auto_stop_info(self) -> training_pb2.AutoStopInfo:
        data = self.auto_stop.info(auto_stop(self.config))
        info = training_pb2.AutoStopInfo(
            threshold=data["threshold"],
            patience=data["patience"],
            min_epochs=data["min_epochs"],
            streak=data["streak"],
            remaining=data["remaining"],
            triggered=data["triggered"],
        )
        if data["current_change"] is not None:
            info.current_change = data["current_change"]
        return info

    # ---- endings ------------------------------------------------------------------------

    def best_model(self) -> str | None:
        if not self._last_val_losses:
            return None
        return min(self._last_val_losses.items(), key=lambda item: (item[1], item[0]))[0]

    def _finish(self, status: training_pb2.RunStatus.ValueType, started: float) -> RunOutcome:
        epochs_run = len(self.history)
        self.steps_done = self.steps_planned  # progress_percent is 100 at any ending
        for slot in self.slots:
            if slot.best_epoch is None:  # stopped before its first validation
                self.folder.save_adapter(slot.name, slot.model, slot.tokenizer)
        duration = self._elapsed_before + time.monotonic() - started
        certificate = self.folder.certify(
            trainer=self, status=status, epochs_run=epochs_run, duration=duration
        )
        done = training_pb2.TrainingComplete(
            status=status,
            epochs_run=epochs_run,
            dna=certificate.dna,
            run_dir=str(self.folder.path),
            duration_seconds=duration,
        )
        best = self.best_model()
        if best is not None:
            done.best_model = best
        if self._last_total is not None:
            done.total_loss = self._last_total
        done.val_losses.update(self._last_val_losses)
        done.weights.update(self.weights)
        self.events.emit("training_complete", done)
        remove_checkpoints(self.folder.path)  # after the event: a crash before it can resume
        return RunOutcome(
            run_id=self.run_id,
            run_dir=self.folder.path,
            status=status,
            epochs_run=epochs_run,
            best_model=best,
            dna=certificate.dna,
            duration_seconds=duration,
            history=self.history,
        )

    def _fail(self, exc: BaseException, started: float) -> RunOutcome:
        message = str(exc) if isinstance(exc, OneSeekError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError) and not isinstance(exc, OneSeekError):
            message = f"Disk or file error: {exc}. Check free space and permissions, then resume."
        resumable = resumable_failure(exc)
        unexpected = not isinstance(exc, (OneSeekError, OSError))
        log.error("run failed (resumable=%s): %s", resumable, message, exc_info=unexpected)
        duration = self._elapsed_before + time.monotonic() - started
        try:
            self.folder.write_failure(
                trainer=self,
                message=message,
                duration=duration,
                resumable=resumable,
                error_seq=self.events.seq + 1,
            )
        except Exception as write_error:
            message += f" (the run folder could not be written either: {write_error})"
        error = training_pb2.TrainingError(message=message, status=training_pb2.RUN_STATUS_FAILED)
        if self.epoch:
            error.epoch = self.epoch
        try:
            self.events.emit("training_error", error)
        except Exception:
            self.events.path = None
            self.events.emit("training_error", error)
        return RunOutcome(
            run_id=self.run_id,
            run_dir=self.folder.path,
            status=training_pb2.RUN_STATUS_FAILED,
            epochs_run=len(self.history),
            best_model=self.best_model(),
            dna=None,
            duration_seconds=duration,
            history=self.history,
            error=message,
            resumable=resumable,
        )
