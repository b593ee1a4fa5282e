"""The defaults, run ids, names, and the start request's validation."""

from __future__ import annotations

import json
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
    generate_run_id,
    get_config,
    validate_base_models,
    validate_dataset_id,
    validate_model_name,
    validate_run_id,
)

# --- the config itself ---------------------------------------------------------------------


def test_config_has_the_seed_sections_and_values() -> None:
    assert list(TRAINING_CONFIG) == [
        "defaults",
        "limits",
        "adaptive_weights",
        "confidence_auto_stop",
        "live_leaderboard",
        "metadata",
        "generation",
    ]
    assert TRAINING_CONFIG["defaults"]["epochs"] == 3
    assert TRAINING_CONFIG["adaptive_weights"]["adjust_strategy"]["top_model_boost"] == 0.3
    assert TRAINING_CONFIG["confidence_auto_stop"]["threshold"] == 0.001
    assert TRAINING_CONFIG["live_leaderboard"]["refresh_interval"] == 5
    assert TRAINING_CONFIG["metadata"]["timestamp_format"] == "%Y%m%d-%H%M%S"
    assert TRAINING_CONFIG["generation"]["temperature"] == 0.0  # greedy unless asked


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
