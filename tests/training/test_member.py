"""A population member on its own (no population, event log or run folder), and the plain
values a run carries: TrainingProgress (a checkpoint's state.json) and RunSummary."""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api import training_pb2
from services.api.run_config import RunConfig, config_from_body, config_from_dict, config_to_dict
from services.core.auto_stop import AutoStopState
from services.training.checkpoints import (
    TrainingProgress,
    capture_rng,
    read_checkpoint,
    save_checkpoint,
)
from services.training.data import Record, load_dataset, split_dataset
from services.training.member import PopulationMember, StepInfo, cpu_placement
from services.training.models import BaseModelInfo, resolve_models
from services.training.run_folder import RunSummary

REPO = Path(__file__).resolve().parents[2]
CPU = cpu_placement()
Plain = tuple[RunConfig, BaseModelInfo, list[Record], list[Record]]


@pytest.fixture(scope="module")
def plain(demo_models_dir: Path) -> Plain:
    """What a member is built from: the run's config, its model's info and the split."""
    config = config_from_body(
        {
            "datasetId": "sample",
            "baseModels": ["tiny-gpt2"],
            "learningRate": 2e-3,
            "maxSeqLength": 32,
            "batchSize": 4,
        }
    )
    (info,) = resolve_models(["tiny-gpt2"], demo_models_dir)
    records = load_dataset("sample", REPO / "datasets").records[:24]
    train, validation = split_dataset(records, config.validation_split, config.seed)
    return config, info, train, validation


def member_of(plain: Plain) -> PopulationMember:
    config, info, train, validation = plain
    return PopulationMember(config, info, train, validation, CPU)


def epoch(member: PopulationMember, number: int) -> float:
    loss = member.train_epoch(number, lambda: False, lambda _: None)
    assert loss is not None
    return loss


@pytest.mark.slow
def test_a_member_trains_an_epoch_and_validates_on_its_own(plain: Plain) -> None:
    member = member_of(plain)
    before = member.validate()
    steps: list[StepInfo] = []
    loss = member.train_epoch(1, lambda: False, steps.append)
    assert loss is not None and math.isfinite(loss) and loss == member.running_loss()
    assert member.validate() < before
    assert [s.step for s in steps] == list(range(1, member.steps_per_epoch + 1))
    assert {(s.epoch, s.model, s.total_steps) for s in steps} == {
        (1, "tiny-gpt2", member.steps_per_epoch)
    }
    assert all(s.seconds > 0 and s.elapsed >= s.seconds for s in steps)
    assert [s.tokens for s in steps] == sorted({s.tokens for s in steps})  # grows every step
    # the same plain values give the same member, bit for bit
    twin = member_of(plain)
    assert epoch(twin, 1) == loss and twin.validate() == member.validate()


@pytest.mark.slow
def test_a_member_stops_when_asked_and_reports_the_rate_it_applies(plain: Plain) -> None:
    member = member_of(plain)
    steps: list[StepInfo] = []
    assert member.train_epoch(1, lambda: len(steps) == 2, steps.append) is None
    assert len(steps) == 2  # the step in flight finished, no more
    assert member.set_learning_rate(3e-4) == 3e-4
    assert {group["lr"] for group in member.optimizer.param_groups} == {3e-4}


@pytest.mark.slow
def test_a_members_state_round_trips_exactly_through_a_checkpoint(
    plain: Plain, tmp_path: Path
) -> None:
    trained = member_of(plain)
    epoch(trained, 1)
    trained.set_learning_rate(1.5e-3)
    path = save_checkpoint(tmp_path, 1, {}, {trained.name: trained.state()})

    restored = member_of(plain)
    restored.load_state(read_checkpoint(path).member_state(trained.name))
    mine, theirs = trained.state(), restored.state()
    assert mine.weights.keys() == theirs.weights.keys()
    for name, tensor in mine.weights.items():
        assert torch.equal(theirs.weights[name], tensor)
    assert theirs.optimizer["param_groups"] == mine.optimizer["param_groups"]
    for key, moments in mine.optimizer["state"].items():
        for name, value in moments.items():
            assert torch.equal(theirs.optimizer["state"][key][name], value)
    # and both go on alike
    assert epoch(restored, 2) == epoch(trained, 2)
    assert restored.validate() == trained.validate()


@pytest.mark.slow
def test_a_member_pickles_and_is_built_from_plain_values(plain: Plain) -> None:
    """What an executor needs to place members in other processes: a member travels as a
    pickle, and its inputs as JSON (the config) and pickles (info, records, device)."""
    member = member_of(plain)
    epoch(member, 1)
    copy = pickle.loads(pickle.dumps(member))
    assert copy.validate() == member.validate()
    assert epoch(copy, 2) == epoch(member, 2)

    config, *rest = plain
    shipped = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    info, train, validation, device = pickle.loads(pickle.dumps((*rest, CPU)))
    rebuilt = PopulationMember(shipped, info, train, validation, device)
    assert rebuilt.validate() == member_of(plain).validate()


# ---- the plain values of a run --------------------------------------------------------------

CONFIG = config_from_body({"datasetId": "small", "baseModels": ["a", "b"], "epochs": 3})
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
losses = st.fixed_dictionaries({"a": finite, "b": finite})


def a_progress(**changes: Any) -> TrainingProgress:
    end = {"type": "epoch_end", "run_id": "run-20260101-000001", "seq": 9, "epoch": 2}
    adjustment = {"type": "weight_adjustment", "run_id": "run-20260101-000001", "seq": 10}
    progress = TrainingProgress.start("run-20260101-000001", CONFIG, "ab" * 32, ["a", "b"])
    return replace(
        progress,
        **{
            "weights": {"a": 1.3, "b": 0.7},
            "auto_stop": AutoStopState(
                epoch=2, previous_total=1.5, current_change=0.25, streak=1, totals=(1.75, 1.5)
            ),
            "best": {"a": {"epoch": 2, "val_loss": 1.25}, "b": {"epoch": 1, "val_loss": 1.8}},
            "history": [{**end, "epoch": 1}, end],
            "adjustments": [{"epoch": 1, "ranking": ["a", "b"]}],
            "last_val_losses": {"a": 1.25, "b": 1.75},
            "last_total": 1.5,
            "steps_done": 12,
            "step_seconds": 0.5,
            "elapsed_seconds": 3.25,
            "rng": capture_rng(),
            "epoch": 2,
            "announcement": [end, adjustment],
            **changes,
        },
    )


def test_the_progress_round_trips_as_a_checkpoints_state() -> None:
    progress = a_progress()
    text = json.dumps(progress.to_dict(), allow_nan=False)
    assert TrainingProgress.from_dict(json.loads(text)) == progress
    # a state.json carries the checkpoint's own keys too; one written before announcements
    # were checkpointed has none (its epoch was announced first)
    state = {**json.loads(text), "format": 1, "files": {}}
    assert TrainingProgress.from_dict(state) == progress
    del state["announcement"]
    assert TrainingProgress.from_dict(state) == replace(progress, announcement=[])


@settings(max_examples=60, deadline=None)
@given(
    weights=losses,
    totals=st.lists(finite, max_size=6),
    last_total=st.none() | finite,
    steps=st.integers(0, 2**40),
    seconds=finite,
)
def test_any_progress_round_trips_through_json(
    weights: dict[str, float],
    totals: list[float],
    last_total: float | None,
    steps: int,
    seconds: float,
) -> None:
    progress = a_progress(
        weights=weights,
        auto_stop=AutoStopState(len(totals), totals[-1] if totals else None, totals=tuple(totals)),
        last_val_losses=weights,
        last_total=last_total,
        steps_done=steps,
        step_seconds=seconds,
        rng={},
    )
    text = json.dumps(progress.to_dict(), allow_nan=False)
    assert TrainingProgress.from_dict(json.loads(text)) == progress


def test_the_summary_round_trips_through_json() -> None:
    info = BaseModelInfo("a", Path("/models/a"), "LlamaForCausalLM", "llama", 1_000)
    summary = RunSummary(
        run_id="run-20260101-000001",
        run_dir=Path("/models/oneseek-certified/run-20260101-000001"),
        config=CONFIG,
        status=training_pb2.RUN_STATUS_FAILED,
        duration_seconds=12.5,
        dataset={"id": "small", "sha256": "ab" * 32, "records": 24},
        base_models=[info],
        placements=[{"model": "a", "device": "cpu", "precision": "fp32"}],
        progress=a_progress(),
        error="Disk or file error",
        resumable=True,
    )
    text = json.dumps(summary.to_dict(), allow_nan=False)
    assert RunSummary.from_dict(json.loads(text)) == summary
    assert summary.epochs_run == 2 and summary.last_epoch == summary.progress.history[-1]
    assert summary.final_lr_multipliers == {
        "a": pytest.approx(1.3 * CONFIG.learning_rate),
        "b": pytest.approx(0.7 * CONFIG.learning_rate),
    }
