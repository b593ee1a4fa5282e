"""Reports of outside training processes: the checks, and the events a report becomes."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api import metrics_pb2, training_pb2
from services.api.codec import now_timestamp
from services.api.reports import check_report
from services.api.run_state import RunState
from services.core.errors import InvalidInput
from services.metrics.reports import EpochAlreadyReported, ReportRefused, plan_report

RUN = "run-20260201-090000"


def report(**fields: Any) -> metrics_pb2.ReportMetricsRequest:
    base: dict[str, Any] = {
        "run_id": RUN,
        "epoch": 1,
        "total_epochs": 3,
        "val_losses": {"a": 2.0, "b": 3.0},
    }
    base.update(fields)
    return metrics_pb2.ReportMetricsRequest(**base)


def apply_plan(state: RunState, request: metrics_pb2.ReportMetricsRequest) -> int:
    plan = plan_report(state, request, now_timestamp())
    for event in plan.events:
        assert state.apply(event)
    return plan.seq


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"run_id": "run-1"}, "runId", "Run id 'run-1' is not valid"),
        ({"epoch": 0}, "epoch", "epoch must be from 1"),
        ({"epoch": 4, "total_epochs": 3}, "total_epochs", "total_epochs must be from 4"),
        ({"val_losses": {}}, "val_losses", "val_losses is empty"),
        ({"val_losses": {"../etc": 1.0}}, "val_losses", "Model name '../etc' is not valid"),
        ({"val_losses": {"a": math.nan}}, "val_losses", "val_losses['a'] must be a finite"),
        ({"val_losses": {"a": math.inf}}, "val_losses", "must be a finite number"),
        ({"weights": {"a": 0.0}}, "weights", "weights['a'] must be a finite number above 0"),
        ({"weights": {"c": 1.0}}, "weights", "names model 'c', which has no entry in val_losses"),
        ({"lr_multipliers": {"a": -1e-4}}, "lr_multipliers", "above 0"),
        ({"train_losses": {"b": math.nan}}, "train_losses", "train_losses['b']"),
        ({"total_loss": math.inf}, "total_loss", "total_loss must be a finite number"),
        ({"progress_percent": 101.0}, "progress_percent", "at most 100"),
        (
            {"auto_stop_info": training_pb2.AutoStopInfo(threshold=-1.0)},
            "auto_stop_info",
            "auto_stop_info.threshold",
        ),
        (
            {"auto_stop_info": training_pb2.AutoStopInfo(streak=-2)},
            "auto_stop_info",
            "auto_stop_info.streak must be 0 or more",
        ),
    ],
)
def test_bad_reports_name_the_field(fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words.replace("[", r"\[").replace("]", r"\]")) as caught:
        check_report(report(**fields))
    assert caught.value.field == field


def test_too_many_models_are_refused() -> None:
    losses = {f"m{i}": 1.0 for i in range(101)}
    with pytest.raises(InvalidInput, match="at most 100"):
        check_report(report(val_losses=losses))


def test_a_good_report_becomes_an_epoch_end_with_the_population_loss() -> None:
    state = RunState(RUN, total_epochs=3)
    request = report(weights={"a": 1.3}, train_losses={"a": 2.2})
    check_report(request)
    plan = plan_report(state, request, now_timestamp())
    assert plan.seq == 1 and [e.WhichOneof("payload") for e in plan.events] == ["epoch_end"]
    end = plan.events[0].epoch_end
    assert (end.epoch, end.current_epoch, end.total_epochs) == (1, 1, 3)
    assert end.total_loss == pytest.approx(2.5)  # weights in force during epoch 1 were 1.0
    assert end.progress_percent == pytest.approx(100 / 3)
    state.apply(plan.events[0])
    assert state.weights == {"a": 1.3, "b": 1.0}  # b keeps its weight
    # epoch 2: the population loss uses the weights reported at epoch 1
    second = plan_report(state, report(epoch=2, val_losses={"a": 1.0, "b": 2.0}), now_timestamp())
    assert second.events[0].epoch_end.total_loss == pytest.approx((1.3 * 1.0 + 2.0) / 2)


def test_a_retried_report_is_stored_once() -> None:
    state = RunState(RUN, total_epochs=3)
    first = report(total_loss=2.4, progress_percent=30.0)
    seq = apply_plan(state, first)
    apply_plan(state, report(epoch=2, val_losses={"a": 1.5, "b": 2.5}))
    again = plan_report(state, first, now_timestamp())
    assert again.seq == seq and again.events == []


def test_a_different_report_of_a_reported_epoch_is_refused() -> None:
    state = RunState(RUN, total_epochs=3)
    apply_plan(state, report())
    with pytest.raises(EpochAlreadyReported, match="report epoch 2 next"):
        plan_report(state, report(val_losses={"a": 9.0, "b": 3.0}), now_timestamp())
    apply_plan(state, report(epoch=3, val_losses={"a": 1.0, "b": 1.5}, total_epochs=5))
    with pytest.raises(ReportRefused, match="comes too late") as caught:
        plan_report(state, report(epoch=2, total_epochs=5), now_timestamp())
    assert "report epoch 4 next" in caught.value.message.lower()


def test_the_last_epoch_completes_the_run() -> None:
    state = RunState(RUN, total_epochs=2)
    apply_plan(state, report(total_epochs=2))
    plan = plan_report(
        state, report(epoch=2, total_epochs=2, val_losses={"a": 1.5, "b": 1.2}), now_timestamp()
    )
    assert [e.WhichOneof("payload") for e in plan.events] == ["epoch_end", "training_complete"]
    assert [e.seq for e in plan.events] == [2, 3] and plan.seq == 2
    done = plan.events[1].training_complete
    assert done.status == training_pb2.RUN_STATUS_COMPLETED
    assert done.best_model == "b" and done.epochs_run == 2
    for event in plan.events:
        state.apply(event)
    assert state.status == "completed" and state.progress_percent == 100.0
    with pytest.raises(ReportRefused, match="is completed: it takes no more reports"):
        plan_report(state, report(epoch=3, total_epochs=4), now_timestamp())


def test_a_triggered_auto_stop_ends_the_run_auto_stopped() -> None:
    state = RunState(RUN, total_epochs=10)
    info = training_pb2.AutoStopInfo(threshold=0.01, patience=1, min_epochs=1, triggered=True)
    plan = plan_report(state, report(total_epochs=10, auto_stop_info=info), now_timestamp())
    assert plan.events[-1].training_complete.status == training_pb2.RUN_STATUS_AUTO_STOPPED


def test_an_epoch_beyond_the_known_total_is_refused() -> None:
    state = RunState(RUN, total_epochs=2)
    request = metrics_pb2.ReportMetricsRequest(run_id=RUN, epoch=3, val_losses={"a": 1.0})
    with pytest.raises(InvalidInput, match="beyond the 2 epochs"):
        plan_report(state, request, now_timestamp())


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True),
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
        min_size=1,
        max_size=6,
    )
)
def test_total_loss_is_the_mean_loss_at_equal_weights(losses: dict[str, float]) -> None:
    request = metrics_pb2.ReportMetricsRequest(run_id=RUN, epoch=1, val_losses=losses)
    check_report(request)
    end = plan_report(RunState(RUN), request, now_timestamp()).events[0].epoch_end
    assert end.total_loss == pytest.approx(sum(losses.values()) / len(losses), abs=1e-6)
    assert end.progress_percent == 0.0  # total_epochs unknown
