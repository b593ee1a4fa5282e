"""RunState: the fold of a run's events into metrics and leaderboard, event by event."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from services.api import training_pb2
from services.api.codec import event_to_dict, message_to_dict, now_timestamp
from services.api.run_state import RunState, fold
from services.metrics.records import record_from_run
from tests.metrics.sample_run import (
    LEARNING_RATE,
    MODELS,
    RUN_ID,
    interrupted_then_resumed,
    run_config,
    run_events,
    run_message,
    three_epochs,
)


def _new_state() -> RunState:
    return record_from_run(run_message()).state()


def test_before_the_first_epoch_every_model_is_listed_at_its_start_values() -> None:
    state = _new_state()
    metrics = message_to_dict(state.metrics())
    assert metrics["status"] == "running"
    assert metrics["current_epoch"] == 0 and metrics["total_epochs"] == 3
    assert metrics["val_losses"] == {} and metrics["total_loss"] is None
    assert metrics["weights"] == dict.fromkeys(MODELS, 1.0)
    assert metrics["lr_multipliers"] == dict.fromkeys(MODELS, LEARNING_RATE)
    assert metrics["auto_stop_info"]["remaining"] == 3
    assert metrics["auto_stop_info"]["current_change"] is None
    assert metrics["progress_percent"] == 0 and metrics["training_history"] == []
    board = message_to_dict(state.leaderboard())
    entries = board["leaderboard"]
    # no loss yet: name order, ranks still 1..N
    assert [e["model_name"] for e in entries] == sorted(MODELS)
    assert [e["rank"] for e in entries] == [1, 2, 3]
    assert all(e["val_loss"] is None for e in entries)
    assert all(e["weight_multiplier"] == 1.0 for e in entries)
    assert all(e["lr_multiplier"] == LEARNING_RATE for e in entries)


def test_a_whole_run_folds_into_the_last_epoch_and_the_ending() -> None:
    events = run_events(three_epochs())
    state = fold(_new_state(), events)
    ends = [e for e in events if e.WhichOneof("payload") == "epoch_end"]
    last_end = ends[-1].epoch_end
    metrics = state.metrics()
    assert metrics.status == training_pb2.RUN_STATUS_COMPLETED
    assert metrics.current_epoch == 3 and metrics.total_epochs == 3
    assert dict(metrics.val_losses) == three_epochs()[-1]
    assert dict(metrics.weights) == dict(last_end.weights)
    assert dict(metrics.lr_multipliers) == dict(last_end.lr_multipliers)
    assert metrics.total_loss == last_end.total_loss
    assert metrics.auto_stop_info == last_end.auto_stop_info
    assert metrics.progress_percent == 100.0
    assert list(metrics.training_history) == [e.epoch_end for e in ends]
    assert metrics.timestamp == events[-1].timestamp
    assert state.best_model == "tiny-llama" and state.dna == "dna-v2:abc123"
    assert state.last_seq == events[-1].seq


def test_leaderboard_is_sorted_by_loss_with_ranks_and_the_new_weights() -> None:
    events = run_events(three_epochs()[:2], ending="running")
    state = fold(_new_state(), events)
    board = state.leaderboard()
    entries = list(board.leaderboard)
    # epoch 2: tiny-llama 2.6 < tiny-qwen 2.7 < tiny-gpt2 3.7
    assert [e.model_name for e in entries] == ["tiny-llama", "tiny-qwen", "tiny-gpt2"]
    assert [e.rank for e in entries] == [1, 2, 3]
    end = [e for e in events if e.WhichOneof("payload") == "epoch_end"][-1].epoch_end
    for entry in entries:
        assert entry.val_loss == end.val_losses[entry.model_name]
        assert entry.weight_multiplier == end.weights[entry.model_name]
        assert entry.lr_multiplier == end.lr_multipliers[entry.model_name]
    # the winner of epoch 2 was boosted, the loser penalised
    assert entries[0].weight_multiplier > 1.0 > entries[-1].weight_multiplier
    assert board.current_epoch == 2 and board.total_epochs == 3
    assert board.progress_percent < 100
    assert state.metrics().status == training_pb2.RUN_STATUS_RUNNING


def test_progress_moves_the_percentage_and_an_error_ends_at_100() -> None:
    events = run_events(three_epochs()[:1], ending="failed", progress_per_model=2)
    state = _new_state()
    seen = []
    for event in events:
        state.apply(event)
        seen.append(state.progress_percent)
    assert seen == sorted(seen) and 0 < seen[1] < 100
    assert state.status == "failed" and state.progress_percent == 100.0
    assert state.error is not None and "diverged" in state.error


def test_auto_stop_ends_the_run_auto_stopped() -> None:
    config = run_config(epochs=10)
    flat = [{"tiny-llama": 2.0, "tiny-gpt2": 2.0, "tiny-qwen": 2.0}] * 10
    events = run_events(flat, config=config)
    kinds = [e.WhichOneof("payload") for e in events]
    assert "auto_stop_triggered" in kinds
    state = fold(RunState(RUN_ID, config=config), events)
    assert state.status == "auto_stopped" and state.progress_percent == 100.0
    assert state.auto_stop_info is not None and state.auto_stop_info.triggered
    assert state.current_epoch == 4  # epochs 2, 3 and 4 changed by 0 < threshold


def test_apply_ignores_a_replayed_or_foreign_event() -> None:
    events = run_events(three_epochs())
    state = fold(_new_state(), events[:5])
    before = state.metrics()
    assert not state.apply(events[2])
    other = training_pb2.TrainingEvent()
    other.CopyFrom(events[5])
    other.run_id = "run-20260131-142501"
    assert not state.apply(other)
    assert state.metrics() == before
    assert state.apply(events[5])


def test_dicts_in_the_documented_shape_fold_like_messages() -> None:
    events = run_events(three_epochs())
    from_messages = fold(_new_state(), events).metrics()
    from_dicts = fold(_new_state(), [event_to_dict(e) for e in events]).metrics()
    assert from_dicts == from_messages


def test_a_resumed_run_is_running_again() -> None:
    events = run_events(three_epochs()[:1], ending="failed")
    state = fold(_new_state(), events)
    assert state.status == "failed"
    resumed = training_pb2.TrainingEvent(run_id=RUN_ID, seq=state.last_seq + 1)
    resumed.timestamp.CopyFrom(now_timestamp())
    resumed.epoch_start.epoch = 2
    resumed.epoch_start.total_epochs = 3
    state.apply(resumed)
    assert state.status == "running" and state.error is None
    # progress starts again from the epochs already done, not from the ending's 100
    assert state.progress_percent == 100.0 / 3


def test_an_interrupted_run_resumed_and_finished_reads_like_one_run() -> None:
    """A run interrupted after epoch 1, then resumed: epochs 2 and 3 follow the terminal
    event with later seqs, and the run ends completed with one history entry per epoch."""
    events = interrupted_then_resumed()
    cut = next(i for i, e in enumerate(events) if e.WhichOneof("payload") == "training_error")
    state = fold(_new_state(), events[: cut + 1])
    assert state.status == "interrupted" and state.finished and state.progress_percent == 100
    fold(state, events[cut + 1 :])
    reference = fold(_new_state(), run_events(three_epochs()))
    assert state.status == "completed" and state.error is None
    assert [h.epoch for h in state.history] == [1, 2, 3]
    assert state.history == reference.history
    assert state.metrics().val_losses == reference.metrics().val_losses
    assert state.progress_percent == 100 and state.last_seq == len(events) == events[-1].seq


def test_initial_state_carries_metrics_config_models_and_the_last_seq() -> None:
    events = run_events(three_epochs()[:1], ending="running")
    state = fold(_new_state(), events)
    first = state.initial_state(now_timestamp())
    assert first.seq == events[-1].seq and first.run_id == RUN_ID
    payload = first.initial_state
    assert payload.config == run_config()
    assert [m.name for m in payload.models] == list(MODELS)
    assert payload.metrics.current_epoch == 1
    data = event_to_dict(first)
    assert data["type"] == "initial_state" and data["current_epoch"] == 1
    assert data["config"]["base_models"] == list(MODELS)


def test_an_unknown_config_is_learned_from_the_events() -> None:
    events = run_events(three_epochs()[:1], ending="running")
    state = fold(RunState(RUN_ID), events)
    assert state.total_epochs == 3
    assert sorted(state.names) == sorted(MODELS)
    assert [e.rank for e in state.leaderboard().leaderboard] == [1, 2, 3]


losses = st.floats(min_value=0.0, max_value=50.0, allow_nan=False)
names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


@given(st.dictionaries(names, losses, min_size=1, max_size=8))
def test_leaderboard_order_is_by_loss_then_name(val_losses: dict[str, float]) -> None:
    config = run_config(models=sorted(val_losses), epochs=2)
    end = training_pb2.TrainingEvent(run_id=RUN_ID, seq=1)
    end.timestamp.CopyFrom(now_timestamp())
    end.epoch_end.epoch = 1
    end.epoch_end.val_losses.update(val_losses)
    state = RunState(RUN_ID, config=config)
    state.apply(end)
    entries = list(state.leaderboard().leaderboard)
    keys = [(e.val_loss, e.model_name) for e in entries]
    assert keys == sorted(keys)
    assert [e.rank for e in entries] == list(range(1, len(val_losses) + 1))
    assert all(math.isfinite(e.lr_multiplier) for e in entries)


def test_an_epoch_start_that_says_where_members_run_updates_their_placement() -> None:
    """The ray executor names each member's node in epoch_start: metrics and initial_state
    show it; a member it does not name keeps the plan's placement."""
    planned = training_pb2.Placement(model="a", device="cpu", estimated_bytes=100)
    models = [
        training_pb2.ModelInfo(name="a", placement=planned),
        training_pb2.ModelInfo(name="b", placement=training_pb2.Placement(model="b", device="cpu")),
    ]
    state = RunState("run-20260101-000001", models=models)
    start = training_pb2.TrainingEvent(run_id="run-20260101-000001", seq=1)
    start.epoch_start.epoch = 1
    start.epoch_start.placement.add(model="a", device="cpu", estimated_bytes=100, node="ab12/77")
    assert state.apply(start)
    nodes = {p.model: p.node for p in state.metrics().placement}
    assert nodes == {"a": "ab12/77", "b": ""}
    shown = state.initial_state(now_timestamp()).initial_state.models
    assert [m.placement.node for m in shown] == ["ab12/77", ""]
