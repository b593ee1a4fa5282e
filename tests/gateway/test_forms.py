"""Start and report bodies into gRPC requests: the same verdicts as the services' own rules."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.forms import report_request, start_request
from services.api import training_pb2
from services.api.run_config import build_config, config_from_body, config_to_dict, read_request
from services.core.errors import InvalidInput
from services.core.training_config import START_OPTIONS, TRAINING_CONFIG, StartOption

BASE = {"datasetId": "small", "baseModels": ["tiny-llama"]}
MAX_EPOCHS = TRAINING_CONFIG["limits"]["max_epochs"]


def test_every_start_option_is_a_request_field_and_back() -> None:
    request_fields = set(training_pb2.StartRunRequest.DESCRIPTOR.fields_by_name)
    assert {option.name for option in START_OPTIONS} == request_fields
    for option in START_OPTIONS:  # each camelCase name is a field the checks accept
        if not option.required:
            config_from_body({**BASE, option.camel: None})
    with pytest.raises(InvalidInput) as unknown:
        start_request({**BASE, "weightDecay": 0.1})
    assert unknown.value.field == "weightDecay"


def other_than_default(option: StartOption) -> Any:
    """A valid value of `option` that is not its default (the highest allowed, say)."""
    if option.kind == "boolean":
        return not option.default
    if option.kind == "enum":
        return next(value for value in option.choices if value != option.default)
    if option.kind == "integer":
        return int(option.high) if option.high is not None else option.default + 1
    return (option.low or 0) + (option.default - (option.low or 0)) / 2  # a number between


def test_the_service_reads_back_exactly_what_was_sent() -> None:
    body: dict[str, Any] = {**BASE, "baseModels": ["tiny-llama", "tiny-gpt2"]}
    body.update({o.camel: other_than_default(o) for o in START_OPTIONS if not o.required})
    body["learningRate"] = 1  # an int where a float is meant is still a number
    body["method"] = "lora"  # quantization 4bit (not its default) needs it
    request = start_request(body)
    values = read_request(request)
    assert {option.camel: values[option.name] for option in START_OPTIONS} == body
    config = build_config(values)
    assert config == config_from_body(body)
    stored = config_to_dict(config)
    for option in START_OPTIONS:  # every value reached the run's config, none is a default
        value: Any = stored
        for part in (option.target or option.name).split("."):
            value = value[part]
        assert value == body[option.camel], option.name


def test_null_and_absent_take_the_defaults() -> None:
    request = start_request({**BASE, "epochs": None, "method": None})
    assert not request.HasField("epochs")
    assert request.method == training_pb2.TRAINING_METHOD_UNSPECIFIED
    assert build_config(read_request(request)) == config_from_body(BASE)


@given(st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)))
def test_epochs_are_accepted_exactly_when_the_rule_says(epochs: Any) -> None:
    valid = type(epochs) is int and 1 <= epochs <= MAX_EPOCHS
    if valid:
        assert start_request({**BASE, "epochs": epochs}).epochs == epochs
    else:
        with pytest.raises(InvalidInput) as refused:
            start_request({**BASE, "epochs": epochs})
        assert refused.value.field == "epochs"


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)))
def test_learning_rate_must_be_positive_and_finite(rate: float) -> None:
    if rate > 0 and rate != float("inf"):
        assert start_request({**BASE, "learningRate": rate}).learning_rate == float(rate)
    else:
        with pytest.raises(InvalidInput) as refused:
            start_request({**BASE, "learningRate": rate})
        assert refused.value.field == "learningRate"


def test_report_request_carries_every_value() -> None:
    request = report_request(
        "run-20260101-120000",
        {
            "epoch": 2,
            "total_epochs": 5,
            "val_losses": {"a": 1.5, "b": 2},
            "train_losses": {"a": 1.6},
            "weights": {"a": 1.2},
            "lr_multipliers": {"a": 1.2e-4},
            "total_loss": 1.7,
            "auto_stop_info": {"threshold": 0.01, "patience": 3, "current_change": None},
            "progress_percent": 40,
        },
    )
    assert request.run_id == "run-20260101-120000" and request.epoch == 2
    assert dict(request.val_losses) == {"a": 1.5, "b": 2.0}
    assert request.total_epochs == 5 and request.total_loss == 1.7
    assert request.auto_stop_info.patience == 3
    assert not request.auto_stop_info.HasField("current_change")
    assert request.progress_percent == 40.0


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(allow_nan=True), min_size=1))
def test_report_losses_must_be_finite(losses: dict[str, float]) -> None:
    finite = all(abs(v) != float("inf") and v == v for v in losses.values())
    body = {"epoch": 1, "val_losses": losses}
    if finite:
        assert dict(report_request("run-20260101-120000", body).val_losses) == losses
    else:
        with pytest.raises(InvalidInput) as refused:
            report_request("run-20260101-120000", body)
        assert refused.value.field == "val_losses"


def test_a_report_takes_camel_case_too_but_not_a_field_twice() -> None:
    snake = {
        "epoch": 2,
        "total_epochs": 5,
        "val_losses": {"a": 1.5},
        "lr_multipliers": {"a": 1e-4},
        "auto_stop_info": {"min_epochs": 2, "current_change": 0.5},
    }
    camel = {
        "epoch": 2,
        "totalEpochs": 5,
        "valLosses": {"a": 1.5},
        "lrMultipliers": {"a": 1e-4},
        "autoStopInfo": {"minEpochs": 2, "currentChange": 0.5},
    }
    run_id = "run-20260101-120000"
    assert report_request(run_id, camel) == report_request(run_id, snake)
    with pytest.raises(InvalidInput) as twice:
        report_request(run_id, {**snake, "valLosses": {"a": 2.0}})
    assert twice.value.field == "valLosses" and "twice" in twice.value.message
    with pytest.raises(InvalidInput) as unknown:
        report_request(run_id, {**snake, "valLoss": {"a": 2.0}})
    assert unknown.value.field == "valLoss"
