"""Realistic event sequences for the metrics tests: the training service's real EventLog and the
real adaptive-weights and auto-stop rules, emitting in the order the population trainer does."""

from __future__ import annotations

from collections.abc import Sequence

from services.api import training_pb2
from services.api.codec import now_timestamp, parse_timestamp
from services.core.adaptive_weights import (
    AdaptiveWeightsConfig,
    adjust_weights,
    initial_weights,
    lr_multipliers,
    population_loss,
)
from services.core.auto_stop import AutoStopConfig, AutoStopState, auto_stop_step
from services.training.events import EventLog

RUN_ID = "run-20260131-142500"
MODELS = ("tiny-llama", "tiny-gpt2", "tiny-qwen")
LEARNING_RATE = 1e-4


def run_config(
    models: Sequence[str] = MODELS, epochs: int = 3, learning_rate: float = LEARNING_RATE
) -> training_pb2.RunConfig:
    return training_pb2.RunConfig(
        dataset_id="sample",
        base_models=list(models),
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=8,
        seed=42,
        method=training_pb2.TRAINING_METHOD_LORA,
        adaptive_weights=training_pb2.AdaptiveWeightsConfig(
            enabled=True,
            min_multiplier=0.5,
            max_multiplier=1.5,
            top_model_boost=0.3,
            bottom_model_penalty=0.4,
            normalize_weights=True,
        ),
        auto_stop=training_pb2.AutoStopConfig(
            enabled=True, threshold=0.001, patience=3, min_epochs=2
        ),
    )


def run_message(
    run_id: str = RUN_ID, config: training_pb2.RunConfig | None = None
) -> training_pb2.Run:
    config = config or run_config()
    run = training_pb2.Run(
        run_id=run_id,
        status=training_pb2.RUN_STATUS_RUNNING,
        config=config,
        total_epochs=config.epochs,
        models=[
            training_pb2.ModelInfo(name=m, architecture="LlamaForCausalLM", parameter_count=1000)
            for m in config.base_models
        ],
    )
    run.created_at.CopyFrom(parse_timestamp("2026-01-31T14:25:00.000Z"))
    return run


def run_events(
    val_losses: Sequence[dict[str, float]],
    *,
    run_id: str = RUN_ID,
    config: training_pb2.RunConfig | None = None,
    ending: str = "completed",
    progress_per_model: int = 1,
) -> list[training_pb2.TrainingEvent]:
    """One run's events: per epoch epoch_start, progress, epoch_end, weight_adjustment (and
    auto_stop_triggered when it fires); then training_complete (`ending` "completed"),
    training_error ("failed"), or nothing ("running")."""
    config = config or run_config()
    names = list(config.base_models)
    aw = AdaptiveWeightsConfig(
        top_model_boost=config.adaptive_weights.top_model_boost,
        bottom_model_penalty=config.adaptive_weights.bottom_model_penalty,
    )
    stop_config = AutoStopConfig(
        threshold=config.auto_stop.threshold,
        patience=config.auto_stop.patience,
        min_epochs=config.auto_stop.min_epochs,
    )
    out: list[training_pb2.TrainingEvent] = []
    log = EventLog(run_id, sinks=(out.append,))
    weights = initial_weights(names)
    stop = AutoStopState()
    planned = config.epochs * len(names) * progress_per_model
    done = 0
    status = training_pb2.RUN_STATUS_COMPLETED
    for epoch, losses in enumerate(val_losses, start=1):
        start = training_pb2.EpochStart(epoch=epoch, total_epochs=config.epochs)
        start.weights.update(weights)
        start.lr_multipliers.update(lr_multipliers(weights, config.learning_rate))
        log.emit("epoch_start", start)
        for name in names:
            for step in range(1, progress_per_model + 1):
                done += 1
                log.emit(
                    "progress",
                    training_pb2.Progress(
                        epoch=epoch,
                        model=name,
                        step=step,
                        total_steps=progress_per_model,
                        train_loss=losses[name] + 0.1,
                        tokens_per_second=1234.5,
                        progress_percent=100.0 * done / planned,
                    ),
                )
        total = population_loss(losses, weights)
        change = adjust_weights(weights, losses, aw)
        weights = dict(change.weights)
        lrs = lr_multipliers(weights, config.learning_rate)
        stop = auto_stop_step(stop, total, stop_config)
        info = stop.info(stop_config)
        auto_info = training_pb2.AutoStopInfo(
            threshold=info["threshold"],
            patience=info["patience"],
            min_epochs=info["min_epochs"],
            streak=info["streak"],
            remaining=info["remaining"],
            triggered=info["triggered"],
        )
        if info["current_change"] is not None:
            auto_info.current_change = info["current_change"]
        end = training_pb2.EpochEnd(
            epoch=epoch,
            current_epoch=epoch,
            total_epochs=config.epochs,
            total_loss=total,
            progress_percent=100.0 * done / planned,
            auto_stop_info=auto_info,
        )
        end.val_losses.update(losses)
        end.train_losses.update({m: v + 0.1 for m, v in losses.items()})
        end.weights.update(weights)
        end.lr_multipliers.update(lrs)
        log.emit("epoch_end", end)
        adjustment = training_pb2.WeightAdjustment(epoch=epoch, ranking=list(change.ranking))
        adjustment.previous_weights.update(change.previous_weights)
        adjustment.raw_weights.update(change.raw_weights)
        adjustment.weights.update(change.weights)
        adjustment.lr_multipliers.update(lrs)
        adjustment.applied_lrs.update(lrs)
        log.emit("weight_adjustment", adjustment)
        if stop.triggered:
            fired = training_pb2.AutoStopTriggered(epoch=epoch, window=stop.window(stop_config))
            fired.auto_stop_info.CopyFrom(auto_info)
            log.emit("auto_stop_triggered", fired)
            status = training_pb2.RUN_STATUS_AUTO_STOPPED
            break
    last = val_losses[-1] if val_losses else {}
    if ending == "completed":
        complete = training_pb2.TrainingComplete(
            status=status,
            epochs_run=len(val_losses),
            dna="dna-v2:abc123",
            run_dir=f"/models/oneseek-certified/{run_id}",
            duration_seconds=12.5,
        )
        if last:
            complete.best_model = min(last.items(), key=lambda item: (item[1], item[0]))[0]
            complete.total_loss = total
        complete.val_losses.update(last)
        complete.weights.update(weights)
        log.emit("training_complete", complete)
    elif ending == "failed":
        error = training_pb2.TrainingError(
            message="Model 'tiny-gpt2' diverged at epoch 2: its loss is nan.",
            status=training_pb2.RUN_STATUS_FAILED,
            epoch=len(val_losses),
        )
        log.emit("training_error", error)
    return out


def three_epochs() -> list[dict[str, float]]:
    """Losses where tiny-qwen leads, tiny-gpt2 trails, and the ranking changes at epoch 2."""
    return [
        {"tiny-llama": 3.2, "tiny-gpt2": 4.1, "tiny-qwen": 3.0},
        {"tiny-llama": 2.6, "tiny-gpt2": 3.7, "tiny-qwen": 2.7},
        {"tiny-llama": 2.3, "tiny-gpt2": 3.5, "tiny-qwen": 2.5},
    ]


def with_cursors(
    events: Sequence[training_pb2.TrainingEvent], start: int = 1
) -> list[training_pb2.TrainingEvent]:
    """Copies stamped with the training service's global cursor, as StreamEvents sends them."""
    out = []
    for offset, event in enumerate(events):
        copy = training_pb2.TrainingEvent()
        copy.CopyFrom(event)
        copy.cursor = start + offset
        out.append(copy)
    return out


def interrupted_then_resumed() -> list[training_pb2.TrainingEvent]:
    """Epoch 1, an `interrupted` ending, then epochs 2-3 and the real ending, seqs going on."""
    full = run_events(three_epochs())
    kinds = [e.WhichOneof("payload") for e in full]
    first = full[: kinds.index("weight_adjustment") + 1]
    cut = training_pb2.TrainingEvent(run_id=RUN_ID, seq=len(first) + 1)
    cut.timestamp.CopyFrom(now_timestamp())
    cut.training_error.message = "The training service stopped while this run was active."
    cut.training_error.status = training_pb2.RUN_STATUS_INTERRUPTED
    rest = []
    for seq, event in enumerate(full[len(first) :], start=len(first) + 2):
        moved = training_pb2.TrainingEvent()
        moved.CopyFrom(event)
        moved.seq = seq
        rest.append(moved)
    return [*first, cut, *rest]
