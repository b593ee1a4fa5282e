"""The CUDA paths of precision, quantization and placement. They skip without a GPU; run them on
one with `pytest tests/gpu` (docs/memory.md says how). Each trains the tiny demo models for real."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from services.api import training_pb2
from services.api.codec import message_to_dict
from services.api.generate_request import check_generate
from services.api.run_config import build_config
from services.core.verify import verify_run_folder as verify_run
from services.training.data import load_dataset
from services.training.events import EventLog
from services.training.generation import answer, prompt_ids
from services.training.member import PopulationMember
from services.training.memory_plan import Device, plan_members, visible_devices
from services.training.models import resolve_models
from services.training.population import TrainingRun
from services.training.run_folder import RunFolder
from services.training.trained import load_trained, locate
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODELS = ["tiny-llama", "tiny-gpt2"]


def train(
    models_dir: Path, placements: list[training_pb2.Placement] | None = None, **values: object
):  # type: ignore[no-untyped-def]
    config = build_config({"dataset_id": "sample", "base_models": MODELS, "epochs": 2, **values})
    infos = resolve_models(MODELS, models_dir)
    dataset = load_dataset("sample", REPO / "datasets")
    folder = RunFolder.create(models_dir, "run-20260101-000000")
    run = TrainingRun(
        config,
        run_id=folder.run_id,
        models=infos,
        dataset=dataset,
        folder=folder,
        events=EventLog(folder.run_id),
        stop=threading.Event(),
        placements=placements,
    )
    summary = run.run()
    assert summary.status == training_pb2.RUN_STATUS_COMPLETED, summary.error
    return run, summary


@pytest.fixture
def models(tmp_path: Path, demo_models_dir: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    for name in MODELS:
        (root / name).symlink_to(demo_models_dir / name)
    return root


@pytest.mark.parametrize("method", ["lora", "full"])
def test_auto_is_bf16_on_a_gpu_and_the_run_certifies(models: Path, method: str) -> None:
    run, summary = train(models, method=method)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert {p["precision"] for p in summary.placements} == {expected}
    assert all(p["device"].startswith("cuda") for p in summary.placements)
    assert verify_run(summary.run_dir).ok
    member = run.population.members[0]
    trainable = [p for p in member.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)  # adapters / master weights
    if method == "lora":
        frozen = [p for p in member.model.parameters() if not p.requires_grad]
        assert any(p.dtype == torch.bfloat16 or p.dtype == torch.float16 for p in frozen)


def test_fp16_scales_the_loss(models: Path) -> None:
    run, summary = train(models, precision="fp16")
    member = run.population.members[0]
    assert member.scaler is not None and member.scaler.is_enabled()
    assert member.scaler.get_scale() > 1
    assert all(v == v for v in summary.progress.last_val_losses.values())


def test_4bit_trains_lora_on_an_nf4_base(models: Path) -> None:
    pytest.importorskip("bitsandbytes")
    run, summary = train(models, quantization="4bit", precision="bf16")
    member = run.population.members[0]
    kinds = {type(module).__name__ for module in member.model.modules()}
    assert "Linear4bit" in kinds
    assert verify_run(summary.run_dir).ok


def test_members_that_do_not_fit_together_take_turns_on_the_gpu(models: Path) -> None:
    config = build_config({"dataset_id": "sample", "base_models": MODELS, "method": "full"})
    infos = resolve_models(MODELS, models)
    records = load_dataset("sample", REPO / "datasets").records
    roomy = plan_members(config, infos, records)
    largest = max(p.estimated_bytes for p in roomy)
    # room for the largest alone: both cannot stay resident, so at least one waits in host
    # memory (the plan keeps resident whichever still fits beside the one training)
    squeezed = [Device("cpu", 64 * 1024**3), Device("cuda:0", largest, True)]
    placements = plan_members(config, infos, records, squeezed)
    offloaded = {p.model: p.offloaded for p in placements}
    assert any(offloaded.values()), [message_to_dict(p) for p in placements]
    run, _ = train(models, placements=placements, method="full")
    for member in run.population.members:
        between = next(member.model.parameters()).device.type
        assert between == ("cpu" if offloaded[member.info.name] else "cuda"), member.info.name
        with member.turn():
            assert next(member.model.parameters()).device.type == "cuda"
        assert next(member.model.parameters()).device.type == between


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_take_one_member_each(models: Path) -> None:
    devices = visible_devices()
    config = build_config({"dataset_id": "sample", "base_models": MODELS})
    infos = resolve_models(MODELS, models)
    placements = plan_members(
        config, infos, load_dataset("sample", REPO / "datasets").records, devices
    )
    assert sorted(p.device for p in placements) == ["cuda:0", "cuda:1"]
    _, summary = train(models, placements=placements)
    assert verify_run(summary.run_dir).ok


def test_the_estimate_is_within_a_quarter_of_the_measured_peak(mid_model_dir: Path) -> None:
    config = build_config(
        {"dataset_id": "sample", "base_models": ["mid-llama"], "precision": "bf16", "batch_size": 8}
    )
    info = resolve_models(["mid-llama"], mid_model_dir)
    dataset = load_dataset("sample", REPO / "datasets")
    placement = plan_members(config, info, dataset.records)[0]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    member = PopulationMember(
        config, info[0], dataset.records[:64], dataset.records[64:80], placement
    )
    member.train_epoch(1, lambda: False, lambda step: None)
    measured = torch.cuda.max_memory_allocated() - before
    error = (placement.estimated_bytes - measured) / measured
    print(f"estimate {placement.estimated_bytes} measured {measured} error {error:+.3f}")
    assert abs(error) <= 0.25


def test_a_gpu_run_generates_on_the_gpu_in_its_precision(models: Path) -> None:
    _, summary = train(models)
    trained = load_trained(locate(summary.run_dir, "tiny-llama"))
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert trained.device.type == "cuda" and trained.merged
    assert next(trained.model.parameters()).dtype == dtype
    spec = check_generate({"prompt": "What is the capital of", "max_new_tokens": 24})
    ids = prompt_ids(trained, spec)
    pieces: list[str] = []
    result = answer(trained, ids, spec, lambda text, _: pieces.append(text))
    with torch.inference_mode():
        reference = trained.model.generate(  # type: ignore[operator]
            input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=24,
            do_sample=False,
        )  # fmt: skip
    expected = trained.tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.text == "".join(pieces) == expected
    sampled = check_generate(
        {"prompt": "What is", "max_new_tokens": 24, "temperature": 0.9, "seed": 3}
    )
    ids = prompt_ids(trained, sampled)
    runs = [answer(trained, ids, sampled, lambda *_: None).text for _ in range(2)]
    assert runs[0] == runs[1]  # the request's own CUDA generator


def test_a_4bit_run_generates_with_its_adapter_on_the_nf4_base(models: Path) -> None:
    pytest.importorskip("bitsandbytes")
    _, summary = train(models, quantization="4bit", precision="bf16")
    trained = load_trained(locate(summary.run_dir, "tiny-llama"))
    assert not trained.merged  # NF4 weights cannot take the adapter in
    assert "Linear4bit" in {type(m).__name__ for m in trained.model.modules()}
    spec = check_generate({"prompt": "What is", "max_new_tokens": 16})
    result = answer(trained, prompt_ids(trained, spec), spec, lambda *_: None)
    assert result.completion_tokens > 0
