"""The start options and the RunConfig they build: defaults from TRAINING_CONFIG, every check
naming its camelCase field, and the round trip through the run folder's JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given
from hypothesis import strategies as st

from services.api import training_pb2
from services.api.codec import enum_to_str
from services.api.run_config import (
    adaptive_weights,
    auto_stop,
    config_from_body,
    config_from_dict,
    config_to_dict,
)
from services.core.adaptive_weights import AdaptiveWeightsConfig
from services.core.auto_stop import AutoStopConfig
from services.core.errors import InvalidInput
from services.core.training_config import START_OPTIONS, TRAINING_CONFIG, get_config

MINIMAL = {"datasetId": "sample", "baseModels": ["tiny-gpt2", "tiny-llama"]}


def test_from_request_takes_defaults_from_the_config() -> None:
    config = config_from_body(MINIMAL)
    defaults = TRAINING_CONFIG["defaults"]
    assert config.dataset_id == "sample"
    assert list(config.base_models) == ["tiny-gpt2", "tiny-llama"]
    assert config.epochs == defaults["epochs"]
    assert config.learning_rate == defaults["learning_rate"]
    assert config.batch_size == defaults["batch_size"]
    assert config.seed == defaults["seed"]
    assert config.method == training_pb2.TRAINING_METHOD_LORA == 1
    assert config.lora_rank == defaults["lora_rank"]
    assert config.lora_alpha == defaults["lora_alpha"]
    assert config.lora_dropout == defaults["lora_dropout"]
    assert config.max_seq_length == defaults["max_seq_length"]
    assert config.validation_split == defaults["validation_split"]
    assert config.weight_decay == defaults["weight_decay"]
    assert config.refresh_interval == TRAINING_CONFIG["live_leaderboard"]["refresh_interval"]
    assert adaptive_weights(config) == AdaptiveWeightsConfig()
    assert auto_stop(config) == AutoStopConfig()


def test_from_request_uses_a_given_config_for_defaults() -> None:
    custom = get_config()
    custom["defaults"]["epochs"] = 7
    custom["confidence_auto_stop"]["enabled"] = False
    custom["adaptive_weights"]["adjust_strategy"]["top_model_boost"] = 0.2
    config = config_from_body(MINIMAL, custom)
    assert config.epochs == 7
    assert config.auto_stop.enabled is False
    assert config.adaptive_weights.top_model_boost == 0.2


def test_from_request_reads_every_field() -> None:
    body = {
        **MINIMAL,
        "epochs": 5,
        "learningRate": 2e-4,
        "batchSize": 4,
        "seed": 7,
        "method": "full",
        "loraRank": 16,
        "loraAlpha": 32,
        "loraDropout": 0.1,
        "maxSeqLength": 128,
        "validationSplit": 0.2,
        "refreshInterval": 0.5,
        "autoStopThreshold": 0.01,
        "autoStopPatience": 2,
        "minEpochs": 3,
    }
    config = config_from_body(body)
    assert (config.epochs, config.learning_rate, config.batch_size, config.seed) == (5, 2e-4, 4, 7)
    assert (config.method, config.lora_rank, config.lora_alpha) == (
        training_pb2.TRAINING_METHOD_FULL,
        16,
        32,
    )
    assert (config.lora_dropout, config.max_seq_length, config.validation_split) == (0.1, 128, 0.2)
    assert config.refresh_interval == 0.5
    assert auto_stop(config) == AutoStopConfig(threshold=0.01, patience=2, min_epochs=3)


def test_null_optional_fields_take_the_default() -> None:
    config = config_from_body({**MINIMAL, "epochs": None, "autoStopPatience": None})
    assert config.epochs == 3
    assert config.auto_stop.patience == 3


def test_integral_learning_rate_becomes_a_float() -> None:
    config = config_from_body({**MINIMAL, "learningRate": 1})
    assert config.learning_rate == 1.0
    assert isinstance(config.learning_rate, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", 101),
        ("epochs", 2.0),
        ("epochs", True),
        ("epochs", "3"),
        ("learningRate", 0),
        ("learningRate", -1e-4),
        ("learningRate", math.nan),
        ("learningRate", math.inf),
        ("learningRate", "1e-4"),
        ("learningRate", True),
        ("batchSize", 0),
        ("batchSize", 1025),
        ("batchSize", False),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 1.5),
        ("method", "qlora"),
        ("method", 1),
        ("loraRank", 0),
        ("loraRank", 1025),
        ("loraAlpha", 0),
        ("loraDropout", 1.0),
        ("loraDropout", -0.1),
        ("maxSeqLength", 7),
        ("maxSeqLength", 32769),
        ("validationSplit", 0),
        ("validationSplit", 1),
        ("validationSplit", math.nan),
        ("refreshInterval", 0),
        ("refreshInterval", -1),
        ("autoStopThreshold", -0.001),
        ("autoStopThreshold", math.inf),
        ("autoStopThreshold", True),
        ("autoStopPatience", 0),
        ("autoStopPatience", 1.0),
        ("autoStopPatience", True),
        ("minEpochs", 0),
        ("minEpochs", 2.5),
        ("datasetId", "../etc/passwd"),
        ("datasetId", ""),
        ("datasetId", 5),
        ("baseModels", []),
        ("baseModels", "tiny-gpt2"),
        ("baseModels", ["a", "a"]),
    ],
)
def test_every_range_error_names_its_camel_case_field(field: str, value: object) -> None:
    with pytest.raises(InvalidInput) as error:
        config_from_body({**MINIMAL, field: value})
    assert error.value.field == field
    assert field in str(error.value) or field in ("datasetId", "baseModels")


def test_bounds_are_inclusive() -> None:
    body = {**MINIMAL, "epochs": 100, "batchSize": 1024, "loraRank": 1024, "seed": 2**32 - 1}
    config = config_from_body({**body, "maxSeqLength": 32768, "autoStopThreshold": 0})
    assert (config.epochs, config.batch_size, config.lora_rank) == (100, 1024, 1024)
    assert config.auto_stop.threshold == 0.0
    assert config_from_body({**MINIMAL, "epochs": 1, "maxSeqLength": 8}).epochs == 1


@pytest.mark.parametrize("field", ["datasetId", "baseModels"])
def test_required_fields(field: str) -> None:
    body = dict(MINIMAL)
    del body[field]
    with pytest.raises(InvalidInput) as error:
        config_from_body(body)
    assert error.value.field == field


def test_missing_base_models_is_the_documented_error() -> None:
    with pytest.raises(InvalidInput, match=r"^No base models selected$"):
        config_from_body({"datasetId": "sample"})


def test_unknown_field_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(InvalidInput) as error:
        config_from_body({**MINIMAL, "learning_rate": 1e-4})
    message = str(error.value)
    assert "'learning_rate'" in message
    assert "learningRate" in message
    assert "autoStopPatience" in message
    assert error.value.field == "learning_rate"


@pytest.mark.parametrize("body", [None, [], "datasetId=sample", 3])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(InvalidInput):
        config_from_body(body)


def test_direct_construction_validates_too() -> None:
    good = config_to_dict(config_from_body(MINIMAL))
    with pytest.raises(InvalidInput) as error:
        config_from_dict({**good, "learning_rate": -1.0})
    assert error.value.field == "learningRate"
    with pytest.raises(InvalidInput) as error:
        config_from_dict({**good, "weight_decay": -0.1})
    assert error.value.field == "weightDecay"


def test_to_dict_is_snake_case_json() -> None:
    data = config_to_dict(config_from_body({**MINIMAL, "seed": 1}))
    assert data["dataset_id"] == "sample"
    assert data["base_models"] == ["tiny-gpt2", "tiny-llama"]
    assert data["adaptive_weights"] == {
        "enabled": True,
        "min_multiplier": 0.5,
        "max_multiplier": 1.5,
        "top_model_boost": 0.3,
        "bottom_model_penalty": 0.4,
        "normalize_weights": True,
    }
    assert data["auto_stop"] == {
        "enabled": True,
        "threshold": 0.001,
        "patience": 3,
        "min_epochs": 2,
    }
    assert json.loads(json.dumps(data)) == data


@given(
    epochs=st.integers(min_value=1, max_value=100),
    learning_rate=st.floats(min_value=1e-8, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    method=st.sampled_from(["lora", "full"]),
    threshold=st.floats(min_value=0, max_value=1),
    patience=st.integers(min_value=1, max_value=10),
    models=st.lists(
        st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=1, max_size=10, unique=True
    ),
)
def test_to_dict_from_dict_round_trip(
    epochs: int,
    learning_rate: float,
    seed: int,
    method: str,
    threshold: float,
    patience: int,
    models: list[str],
) -> None:
    body = {
        "datasetId": "sample",
        "baseModels": models,
        "epochs": epochs,
        "learningRate": learning_rate,
        "seed": seed,
        "method": method,
        "autoStopThreshold": threshold,
        "autoStopPatience": patience,
    }
    config = config_from_body(body)
    data = json.loads(json.dumps(config_to_dict(config)))
    assert config_from_dict(data) == config


@pytest.mark.parametrize("change", ["drop", "extra", "nested-extra"])
def test_from_dict_refuses_missing_or_extra_keys(change: str) -> None:
    data = config_to_dict(config_from_body(MINIMAL))
    if change == "drop":
        del data["seed"]
    elif change == "extra":
        data["colour"] = "blue"
    else:
        data["auto_stop"]["colour"] = "blue"
    with pytest.raises(InvalidInput):
        config_from_dict(data)


# ---- the description and the proto say the same --------------------------------------------

_PROTO_KINDS = {
    FieldDescriptor.TYPE_INT64: "integer",
    FieldDescriptor.TYPE_INT32: "integer",
    FieldDescriptor.TYPE_DOUBLE: "number",
    FieldDescriptor.TYPE_BOOL: "boolean",
    FieldDescriptor.TYPE_ENUM: "enum",
    FieldDescriptor.TYPE_STRING: "string",
}


def proto_kind(field: Any) -> str:
    return "array" if field.is_repeated else _PROTO_KINDS[field.type]


def test_every_request_field_is_one_described_option_of_its_proto_type() -> None:
    request: Any = training_pb2.StartRunRequest.DESCRIPTOR
    config: Any = training_pb2.RunConfig.DESCRIPTOR
    assert {o.name for o in START_OPTIONS} == set(request.fields_by_name)
    for option in START_OPTIONS:
        field = request.fields_by_name[option.name]
        assert option.camel == field.json_name
        assert option.kind == proto_kind(field), option.name
        *parents, leaf = (option.target or option.name).split(".")
        holder = config
        for parent in parents:
            holder = holder.fields_by_name[parent].message_type
        assert proto_kind(holder.fields_by_name[leaf]) == option.kind, option.target
        if option.kind == "enum":
            values = [enum_to_str(field.enum_type, v.number) for v in field.enum_type.values]
            assert list(option.choices) == [v for v in values if v is not None]
        if not option.required:  # the default is TRAINING_CONFIG's, and passes its own check
            assert option.default_value() == option.default == option.parse(option.default)
