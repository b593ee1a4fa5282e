"""Where and in what a trained model is loaded for use, decided without a GPU: the device of
the run's plan when this machine has it, and the run's precision resolved for that device.
(The loading itself on a GPU is tested in tests/gpu.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.api.run_config import build_config
from services.core.errors import Conflict
from services.training import precision
from services.training.trained import TrainedSource, choose_device, inference_precision


def _source(tmp_path: Path, planned: str = "cpu", **values: object) -> TrainedSource:
    config = build_config({"dataset_id": "d", "base_models": ["m"], **values})
    results = {"placement": [{"model": "m", "device": planned}]}
    return TrainedSource(tmp_path, "m", tmp_path, config, {}, results)


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(precision, "bf16_gpu", lambda: bf16)


@pytest.mark.parametrize(
    ("planned", "gpus", "expected"),
    [
        ("cuda:1", 2, "cuda:1"),  # the plan's GPU, when there is one
        ("cuda:3", 2, "cuda:0"),  # a GPU this machine lacks: its first
        ("cpu", 2, "cpu"),  # planned on the CPU: stays there
        ("cuda:0", 0, "cpu"),  # no GPU here
    ],
)
def test_the_device_follows_the_plan_where_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planned: str, gpus: int, expected: str
) -> None:
    _gpus(monkeypatch, gpus)
    assert str(choose_device(_source(tmp_path, planned))) == expected


def test_a_4bit_run_needs_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _source(tmp_path, "cpu", quantization="4bit")
    _gpus(monkeypatch, 1)
    assert str(choose_device(source)) == "cuda:0"  # even if planned elsewhere
    _gpus(monkeypatch, 0)
    with pytest.raises(Conflict, match="CUDA GPU") as caught:
        choose_device(source)
    assert caught.value.field == "models"


@pytest.mark.parametrize(
    ("requested", "device", "bf16", "expected"),
    [
        ("auto", "cpu", False, "fp32"),
        ("bf16", "cpu", False, "bf16"),  # asked for: kept, a CPU computes bf16
        ("fp16", "cpu", False, "fp32"),  # no fp16 kernels worth using on a CPU
        ("auto", "cuda", True, "bf16"),
        ("auto", "cuda", False, "fp16"),
        ("bf16", "cuda", False, "fp16"),  # a GPU without bf16
        ("fp32", "cuda", True, "fp32"),
    ],
)
def test_the_precision_is_the_runs_resolved_for_the_device(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    requested: str,
    device: str,
    bf16: bool,
    expected: str,
) -> None:
    _gpus(monkeypatch, 1 if device == "cuda" else 0, bf16)
    source = _source(tmp_path, precision=requested)
    assert inference_precision(source, torch.device(device)) == expected
