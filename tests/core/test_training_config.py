"""The defaults, run ids, names, and the start request's validation (DESIGN.md sections 4, 7, 9)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.adaptive_weights import AdaptiveWeightsConfig
from services.core.auto_stop import AutoStopConfig
from services.core.errors import InvalidInput, NotFound
from services.core.training_config import (
    RUN_ID_RE,
    TRAINING_CONFIG,
    RunConfig,
    generate_run_id,
    get_config,
    validate_base_models,
    validate_dataset_id,
    validate_model_name,
    validate_run_id,
)

MINIMAL = {"datasetId": "sample", "baseModels": ["tiny-gpt2", "tiny-llama"]}


# --- the config itself ---------------------------------------------------------------------


def test_config_has_the_seed_sections_and_values() -> None:
    assert list(TRAINING_CONFIG) == [
        "defaults",
        "limits",
        "adaptive_weights",
        "confidence_auto_stop",
        "live_leaderboard",
        "metadata",
    ]
    assert TRAINING_CONFIG["defaults"]["epochs"] == 3
    assert TRAINING_CONFIG["adaptive_weights"]["adjust_strategy"]["top_model_boost"] == 0.3
    assert TRAINING_CONFIG["confidence_auto_stop"]["threshold"] == 0.001
    assert TRAINING_CONFIG["live_leaderboard"]["refresh_interval"] == 5
    assert TRAINING_CONFIG["metadata"]["timestamp_format"] == "%Y%m%d-%H%M%S"


def test_config_is_read_only_all_the_way_down() -> None:
    with pytest.raises(TypeError):
        TRAINING_CONFIG["defaults"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        TRAINING_CONFIG["adaptive_weights"]["adjust_strategy"]["top_model_boost"] = 9


def test_get_config_is_a_deep_mutable_json_copy() -> None:
    config = get_config()
    config["defaults"]["epochs"] = 99
    config["adaptive_weights"]["adjust_strategy"]["top_model_boost"] = 9.0
    config["metadata"].clear()
    assert TRAINING_CONFIG["defaults"]["epochs"] == 3
    assert TRAINING_CONFIG["adaptive_weights"]["adjust_strategy"]["top_model_boost"] == 0.3
    assert TRAINING_CONFIG["metadata"]["temp_suffix"] == ".tmp"
    fresh = get_config()
    assert fresh["defaults"]["epochs"] == 3
    assert json.loads(json.dumps(fresh)) == fresh
    assert type(fresh["adaptive_weights"]["adjust_strategy"]) is dict


def test_dataclass_defaults_agree_with_the_config() -> None:
    # the dataclass defaults must never drift from the one source
    assert AdaptiveWeightsConfig.from_mapping(TRAINING_CONFIG["adaptive_weights"]) == (
        AdaptiveWeightsConfig()
    )
    assert AutoStopConfig.from_mapping(TRAINING_CONFIG["confidence_auto_stop"]) == AutoStopConfig()


# --- run ids -------------------------------------------------------------------------------


def test_generate_run_id_formats_a_fixed_utc_time() -> None:
    now = datetime(2026, 1, 31, 14, 25, 0, tzinfo=timezone.utc)
    assert generate_run_id(now) == "run-20260131-142500"


def test_generate_run_id_treats_naive_time_as_utc() -> None:
    assert generate_run_id(datetime(2026, 3, 4, 5, 6, 7)) == "run-20260304-050607"


def test_generate_run_id_converts_an_aware_time_to_utc() -> None:
    # 01:30 on 1 March at UTC+5 is 20:30 on 28 February in UTC
    now = datetime(2026, 3, 1, 1, 30, 0, tzinfo=timezone(timedelta(hours=5)))
    assert generate_run_id(now) == "run-20260228-203000"


def test_generate_run_id_adds_suffixes_on_collision() -> None:
    now = datetime(2026, 1, 31, 14, 25, 0, tzinfo=timezone.utc)
    taken = {"run-20260131-142500"}
    first = generate_run_id(now, exists=taken.__contains__)
    assert first == "run-20260131-142500-2"
    taken.add(first)
    assert generate_run_id(now, exists=taken.__contains__) == "run-20260131-142500-3"


def test_generate_run_id_defaults_to_now_in_utc() -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run_id = validate_run_id(generate_run_id())
    after = datetime.now(timezone.utc)
    stamp = datetime.strptime(run_id, "run-%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    assert before <= stamp <= after


# %Y is not zero-padded before year 1000 on glibc; no clock that starts a run says that
@given(
    st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.just(timezone.utc)),
    st.integers(min_value=0, max_value=5),
)
def test_generated_ids_always_validate(now: datetime, collisions: int) -> None:
    taken: set[str] = set()
    for _ in range(collisions + 1):
        run_id = generate_run_id(now, exists=taken.__contains__)
        assert validate_run_id(run_id) == run_id
        assert run_id not in taken
        taken.add(run_id)


@pytest.mark.parametrize(
    "run_id",
    ["run-20260131-142500", "run-20260131-142500-2", "run-20260131-142500-17"],
)
def test_validate_run_id_accepts(run_id: str) -> None:
    assert validate_run_id(run_id) == run_id
    assert RUN_ID_RE.fullmatch(run_id)


@pytest.mark.parametrize(
    "run_id",
    [
        "run-2026-01-31T14:25:00",
        "run-20260131-14:25:00",
        "run-20260131-142500\n",
        "run-20260131-142500/..",
        "../run-20260131-142500",
        "run-..",
        "run-２０２６０１３１-１４２５００",
        "run-٢٠٢٦٠١٣١-١٤٢٥٠٠",
        "run-20260131-142500-",
        "run-20260131-142500-٢",
        "run-2026013-142500",
        "RUN-20260131-142500",
        " run-20260131-142500",
        "",
        None,
        20260131,
    ],
)
def test_validate_run_id_rejects(run_id: object) -> None:
    with pytest.raises(InvalidInput) as error:
        validate_run_id(run_id)
    assert error.value.field == "runId"
    assert "run-YYYYMMDD-HHMMSS" in str(error.value)


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-gpt2", "Llama-2-7b-chat", "qwen2.5_0.5B", "a", "x" * 128])
def test_model_names_accepted(name: str) -> None:
    assert validate_model_name(name) == name
    assert validate_dataset_id(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "-flag", "a/b", "/abs", "../x", "a..b", "a b", "a\n", "x" * 129, "é", 3, None],
)
def test_model_names_rejected(name: object) -> None:
    with pytest.raises(InvalidInput) as error:
        validate_model_name(name)
    assert error.value.field == "baseModels"
    with pytest.raises(InvalidInput) as error:
        validate_dataset_id(name)
    assert error.value.field == "datasetId"


def test_validate_base_models_returns_the_names_in_order() -> None:
    assert validate_base_models(("b", "a")) == ["b", "a"]
    assert validate_base_models(["b", "a"], available=["a", "b", "c"]) == ["b", "a"]


@pytest.mark.parametrize("names", [None, [], ()])
def test_empty_selection_is_the_documented_error(names: list[object] | None) -> None:
    with pytest.raises(InvalidInput) as error:
        validate_base_models(names)
    assert str(error.value) == "No base models selected"
    assert error.value.field == "baseModels"


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ("tiny-gpt2", "list"),
        ({"a": 1}, "list"),
        (["a", "b", "a"], "'a' is selected twice"),
        ([f"m{i}" for i in range(11)], "at most 10"),
        (["../x"], "not valid"),
        (["/abs"], "not valid"),
        (["a/b"], "not valid"),
        (["ok", 7], "not valid"),
    ],
)
def test_validate_base_models_errors(names: Any, match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as error:
        validate_base_models(names)
    assert error.value.field == "baseModels"


def test_ten_models_are_allowed() -> None:
    assert len(validate_base_models([f"m{i}" for i in range(10)])) == 10


def test_unknown_model_is_not_found_and_lists_the_available_ones() -> None:
    with pytest.raises(NotFound) as error:
        validate_base_models(["a", "ghost"], available=["b", "a"])
    assert error.value.field == "baseModels"
    assert "'ghost'" in str(error.value)
    assert "a, b" in str(error.value)


# --- RunConfig -----------------------------------------------------------------------------


def test_from_request_takes_defaults_from_the_config() -> None:
    config = RunConfig.from_request(MINIMAL)
    defaults = TRAINING_CONFIG["defaults"]
    assert config.dataset_id == "sample"
    assert config.base_models == ("tiny-gpt2", "tiny-llama")
    assert config.epochs == defaults["epochs"]
    assert config.learning_rate == defaults["learning_rate"]
    assert config.batch_size == defaults["batch_size"]
    assert config.seed == defaults["seed"]
    assert config.method == defaults["method"]
    assert config.lora_rank == defaults["lora_rank"]
    assert config.lora_alpha == defaults["lora_alpha"]
    assert config.lora_dropout == defaults["lora_dropout"]
    assert config.max_seq_length == defaults["max_seq_length"]
    assert config.validation_split == defaults["validation_split"]
    assert config.weight_decay == defaults["weight_decay"]
    assert config.refresh_interval == TRAINING_CONFIG["live_leaderboard"]["refresh_interval"]
    assert config.adaptive_weights == AdaptiveWeightsConfig()
    assert config.auto_stop == AutoStopConfig()


def test_from_request_uses_a_given_config_for_defaults() -> None:
    custom = get_config()
    custom["defaults"]["epochs"] = 7
    custom["confidence_auto_stop"]["enabled"] = False
    custom["adaptive_weights"]["adjust_strategy"]["top_model_boost"] = 0.2
    config = RunConfig.from_request(MINIMAL, custom)
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
    config = RunConfig.from_request(body)
    assert (config.epochs, config.learning_rate, config.batch_size, config.seed) == (5, 2e-4, 4, 7)
    assert (config.method, config.lora_rank, config.lora_alpha) == ("full", 16, 32)
    assert (config.lora_dropout, config.max_seq_length, config.validation_split) == (0.1, 128, 0.2)
    assert config.refresh_interval == 0.5
    assert config.auto_stop == AutoStopConfig(threshold=0.01, patience=2, min_epochs=3)


def test_null_optional_fields_take_the_default() -> None:
    config = RunConfig.from_request({**MINIMAL, "epochs": None, "autoStopPatience": None})
    assert config.epochs == 3
    assert config.auto_stop.patience == 3


def test_integral_learning_rate_becomes_a_float() -> None:
    config = RunConfig.from_request({**MINIMAL, "learningRate": 1})
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
        RunConfig.from_request({**MINIMAL, field: value})
    assert error.value.field == field
    assert field in str(error.value) or field in ("datasetId", "baseModels")


def test_bounds_are_inclusive() -> None:
    body = {**MINIMAL, "epochs": 100, "batchSize": 1024, "loraRank": 1024, "seed": 2**32 - 1}
    config = RunConfig.from_request({**body, "maxSeqLength": 32768, "autoStopThreshold": 0})
    assert (config.epochs, config.batch_size, config.lora_rank) == (100, 1024, 1024)
    assert config.auto_stop.threshold == 0.0
    assert RunConfig.from_request({**MINIMAL, "epochs": 1, "maxSeqLength": 8}).epochs == 1


@pytest.mark.parametrize("field", ["datasetId", "baseModels"])
def test_required_fields(field: str) -> None:
    body = dict(MINIMAL)
    del body[field]
    with pytest.raises(InvalidInput) as error:
        RunConfig.from_request(body)
    assert error.value.field == field


def test_missing_base_models_is_the_documented_error() -> None:
    with pytest.raises(InvalidInput, match=r"^No base models selected$"):
        RunConfig.from_request({"datasetId": "sample"})


def test_unknown_field_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(InvalidInput) as error:
        RunConfig.from_request({**MINIMAL, "learning_rate": 1e-4})
    message = str(error.value)
    assert "'learning_rate'" in message
    assert "learningRate" in message
    assert "autoStopPatience" in message
    assert error.value.field == "learning_rate"


@pytest.mark.parametrize("body", [None, [], "datasetId=sample", 3])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(InvalidInput):
        RunConfig.from_request(body)


def test_direct_construction_validates_too() -> None:
    good = RunConfig.from_request(MINIMAL).to_dict()
    with pytest.raises(InvalidInput) as error:
        RunConfig.from_dict({**good, "learning_rate": -1.0})
    assert error.value.field == "learningRate"
    with pytest.raises(InvalidInput) as error:
        RunConfig.from_dict({**good, "weight_decay": -0.1})
    assert error.value.field == "weightDecay"


def test_to_dict_is_snake_case_json() -> None:
    data = RunConfig.from_request({**MINIMAL, "seed": 1}).to_dict()
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
    config = RunConfig.from_request(body)
    data = json.loads(json.dumps(config.to_dict()))
    assert RunConfig.from_dict(data) == config


@pytest.mark.parametrize("change", ["drop", "extra", "nested-extra"])
def test_from_dict_refuses_missing_or_extra_keys(change: str) -> None:
    data = RunConfig.from_request(MINIMAL).to_dict()
    if change == "drop":
        del data["seed"]
    elif change == "extra":
        data["colour"] = "blue"
    else:
        data["auto_stop"]["colour"] = "blue"
    with pytest.raises(InvalidInput):
        RunConfig.from_dict(data)
