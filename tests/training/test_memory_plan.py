"""The memory plan: sizes from config.json alone, activations from proxies, and the placement
rule (a pure function, property-tested); refusals name the member, its need and a fix."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from services.api import training_pb2
from services.api.run_config import build_config, config_from_dict, config_to_dict
from services.core.errors import InvalidInput
from services.training.data import Dataset, load_dataset
from services.training.member import prepare_base, wrap_model
from services.training.memory_plan import (
    Device,
    Need,
    NoPlacement,
    place,
    plan_members,
    run_numerics,
)
from services.training.models import BaseModelInfo, resolve_models
from services.training.precision import Numerics, resolve_precision
from services.training.service import TrainingService
from services.training.sizing import (
    PeakBytes,
    activation_profile,
    model_shape,
    profile_from_widths,
    step_bytes,
)
from tests.conftest import REPO, long_records

GIB = 1024**3
CPU = [Device("cpu", 16 * GIB)]
ARCHITECTURES = ("tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-mistral")


def config(model: str = "tiny-llama", **values: object) -> training_pb2.RunConfig:
    return build_config({"dataset_id": "sample", "base_models": [model], **values})


def sample() -> Dataset:
    return load_dataset("sample", REPO / "datasets")


def infos(models_dir: Path, *names: str) -> list[BaseModelInfo]:
    return resolve_models(list(names), models_dir)


# ---- sizes from config.json -------------------------------------------------------------------


@pytest.mark.parametrize("name", [*ARCHITECTURES, "mid-llama"])
def test_the_parameter_count_from_config_is_the_loaded_models(
    name: str, demo_models_dir: Path, mid_model_dir: Path
) -> None:
    path = (mid_model_dir if name.startswith("mid") else demo_models_dir) / name
    shape = model_shape(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    wrapped = wrap_model(config(name, lora_rank=4), model)
    # a rank-4 adapter has four times the parameters of a rank-1 one
    assert 4 * shape.lora_parameters == sum(
        p.numel() for p in wrapped.parameters() if p.requires_grad
    )
    assert 0 < shape.quantizable < shape.parameters
    if name.startswith("mid"):
        assert 25_000_000 <= shape.parameters <= 50_000_000


def test_the_tracker_weighs_what_is_alive_at_once() -> None:
    weight = torch.ones(1000)
    with PeakBytes([weight]) as tracker:
        first = torch.ones(1000)  # 4,000 bytes
        second = first * 2  # 8,000 alive
        view = second[:10]  # a view: nothing new
        weight.add_(1)  # in place on what existed before: not counted
        del first
        third = torch.zeros(500, dtype=torch.float64)  # 8,000 alive again
        assert tracker.now == 8000
        del second, view, third
    assert tracker.peak == 8000 and tracker.now == 0


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_proxies_predict_what_a_real_training_step_holds(
    name: str, method: str, precision: str, checkpointing: bool, demo_models_dir: Path
) -> None:
    path = demo_models_dir / name
    run = config(name, method=method, gradient_checkpointing=checkpointing)
    numerics = Numerics(precision, "cpu", method == "lora")
    profile = activation_profile(path, run, numerics)
    shape = model_shape(path)
    batch, length = 8, 96
    per_token = shape.layers * profile.per_layer + profile.rest
    predicted = batch * length * (per_token + profile.per_vocab_entry * shape.vocab_size)
    model = prepare_base(run, AutoModelForCausalLM.from_pretrained(path, dtype=numerics.load_dtype))
    model = wrap_model(run, model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(1))
    measured = step_bytes(model, numerics, ids)
    if method == "full" and precision == "bf16":
        measured -= shape.quantizable * 2  # autocast's copies of the weights, counted apart
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_less_memory_options_lower_the_estimate(demo_models_dir: Path) -> None:
    records = sample().records
    model = infos(demo_models_dir, "tiny-llama")

    def need(**values: object) -> int:
        placed = plan_members(config(**values), model, records, CPU)
        return int(placed[0].estimated_bytes)

    full = need(method="full")
    assert need(method="full", precision="bf16") < full
    assert need(method="full", gradient_checkpointing=True) < full
    assert need(method="full", batch_size=2) < full
    assert need() < full  # LoRA: no gradients or optimizer state for the frozen base
    placed = plan_members(config(method="full", precision="bf16"), model, records, CPU)[0]
    assert placed.estimated_bytes == sum(
        (
            placed.weight_bytes,
            placed.gradient_bytes,
            placed.optimizer_bytes,
            placed.activation_bytes,
            placed.overhead_bytes,
        )
    )
    assert placed.device == "cpu" and placed.precision == training_pb2.PRECISION_BF16


def test_a_generous_cap_on_short_data_is_not_counted(demo_models_dir: Path) -> None:
    model, records = infos(demo_models_dir, "tiny-llama"), sample().records
    short = plan_members(config(max_seq_length=256), model, records, CPU)[0]
    generous = plan_members(config(max_seq_length=32768), model, records, CPU)[0]
    assert short.activation_bytes == generous.activation_bytes


# ---- the precision a run gets -------------------------------------------------------------------


def test_auto_precision_follows_the_device() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda", bf16_supported=True) == "bf16"
    assert resolve_precision("auto", "cuda", bf16_supported=False) == "fp16"
    assert resolve_precision("fp16", "cuda", bf16_supported=True) == "fp16"
    bf16_gpu = [*CPU, Device("cuda:0", 80 * GIB, bf16=True)]
    old_gpu = [*CPU, Device("cuda:0", 16 * GIB, bf16=False)]
    assert run_numerics(config(), CPU).precision == "fp32"
    assert run_numerics(config(), bf16_gpu).precision == "bf16"
    assert run_numerics(config(), old_gpu).precision == "fp16"
    assert run_numerics(config(precision="bf16"), CPU).precision == "bf16"
    numerics = run_numerics(config(method="full", precision="bf16"), CPU)
    assert numerics.load_dtype == torch.float32 and numerics.compute_dtype == torch.bfloat16
    assert run_numerics(config(precision="bf16"), CPU).load_dtype == torch.bfloat16
    assert run_numerics(config(precision="fp16"), old_gpu).precision == "fp16"
    assert Numerics("fp16", "cpu", lora=True).scaler() is not None  # loss scaling: fp16 only
    assert Numerics("bf16", "cpu", lora=True).scaler() is None


@pytest.mark.parametrize(
    ("values", "devices", "field", "words"),
    [
        ({"quantization": "4bit"}, CPU, "quantization", "cuda"),
        ({"precision": "fp16"}, CPU, "precision", "cuda"),
        ({"precision": "bf16"}, [*CPU, Device("cuda:0", GIB, bf16=False)], "precision", "bf16"),
    ],
)
def test_settings_this_machine_cannot_run_are_refused(
    values: dict[str, object], devices: list[Device], field: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        run_numerics(config(**values), devices)
    assert refused.value.field == field and words in str(refused.value).lower()


def test_4bit_needs_lora_wherever_it_runs() -> None:
    with pytest.raises(InvalidInput) as refused:
        config(method="full", quantization="4bit")
    assert refused.value.field == "quantization" and "lora" in str(refused.value)


def test_a_config_stored_before_the_memory_options_reads_as_fp32() -> None:
    stored = config_to_dict(config())
    for key in ("precision", "gradient_checkpointing", "quantization"):
        del stored[key]
    old = config_from_dict(stored)
    assert old.precision == training_pb2.PRECISION_FP32
    assert old.quantization == training_pb2.QUANTIZATION_NONE
    assert not old.gradient_checkpointing


# ---- the placement rule -----------------------------------------------------------------------


def need(model: str, resident: float, transient: float, movable: bool = True) -> Need:
    return Need(model, int(resident * GIB), int(transient * GIB), movable)


def gpus(*free: float, host: float = 256) -> list[Device]:
    cuda = [Device(f"cuda:{i}", int(size * GIB), bf16=True) for i, size in enumerate(free)]
    return [Device("cpu", int(host * GIB)), *cuda]


def test_one_member_per_gpu_when_there_are_enough() -> None:
    slots = place([need("a", 15, 5), need("b", 15, 5)], gpus(40, 40))
    assert {s.device for s in slots} == {"cuda:0", "cuda:1"}
    assert not any(s.offloaded for s in slots)


def test_members_share_a_gpu_when_they_fit_together() -> None:
    slots = place([need("a", 10, 5), need("b", 10, 8)], gpus(40))
    assert [(s.device, s.offloaded) for s in slots] == [("cuda:0", False)] * 2


def test_members_that_fit_only_alone_wait_in_host_memory() -> None:
    # each needs 30 GiB at its peak: together (25 + 25 + 5) or one beside the other's turn
    # (25 + 30) they would not fit in 40, so both wait in host memory between turns
    slots = place([need("a", 25, 5), need("b", 25, 5)], gpus(40))
    assert [(s.device, s.offloaded) for s in slots] == [("cuda:0", True)] * 2


def test_a_member_that_fits_beside_the_others_turns_stays_on_the_gpu() -> None:
    # a (6 GiB) stays: 5 + the 35 GiB peak of b or c fits in 40; b and c take turns
    slots = place([need("a", 5, 1), need("b", 25, 10), need("c", 25, 10)], gpus(40))
    assert {s.model: s.offloaded for s in slots} == {"a": False, "b": True, "c": True}


def test_a_4bit_member_is_never_offloaded() -> None:
    # together 10 + 20 + 20 > 40, but a (fixed) beside b's turn is 10 + 25
    slots = place([need("a", 10, 20, movable=False), need("b", 20, 5)], gpus(40))
    assert {s.model: s.offloaded for s in slots} == {"a": False, "b": True}


def test_no_gpu_means_every_member_trains_on_the_cpu() -> None:
    slots = place([need("a", 1, 1), need("b", 2, 1)], [Device("cpu", 8 * GIB)])
    assert [s.device for s in slots] == ["cpu", "cpu"]


@pytest.mark.parametrize(
    ("needs", "devices", "refused", "where"),
    [
        ([need("a", 1, 1), need("b", 30, 20)], gpus(40), "b", "cuda:0"),
        ([need("a", 3, 1), need("b", 4, 1)], [Device("cpu", 6 * GIB)], "b", "cpu"),
        ([need("a", 25, 5), need("b", 24, 5)], gpus(40, host=10), "a", "cpu"),
    ],
)
def test_no_placement_names_a_member(
    needs: list[Need], devices: list[Device], refused: str, where: str
) -> None:
    with pytest.raises(NoPlacement) as failure:
        place(needs, devices)
    assert failure.value.need.model == refused and failure.value.device.name == where


needs_strategy = st.lists(
    st.builds(
        Need,
        model=st.just(""),
        resident=st.integers(1, 60 * GIB),
        transient=st.integers(0, 40 * GIB),
        movable=st.booleans(),
    ),
    min_size=1,
    max_size=6,
)
devices_strategy = st.tuples(
    st.integers(0, 512 * GIB),
    st.lists(st.integers(0, 96 * GIB), min_size=0, max_size=4),
)


@settings(max_examples=400, deadline=None)
@given(needs_strategy, devices_strategy)
def test_every_plan_fits_its_devices(needs: list[Need], budget: tuple[int, list[int]]) -> None:
    needs = [Need(f"m{i}", n.resident, n.transient, n.movable) for i, n in enumerate(needs)]
    host, free = budget
    devices = [Device("cpu", host), *(Device(f"cuda:{i}", f) for i, f in enumerate(free))]
    try:
        slots = place(needs, devices)
    except NoPlacement as failure:
        assert failure.need in needs
        return
    assert [s.model for s in slots] == [n.model for n in needs]
    by_name = {n.model: n for n in needs}
    if not free:
        assert all(s.device == "cpu" and not s.offloaded for s in slots)
        peak = sum(n.resident for n in needs) + max(n.transient for n in needs)
        assert peak <= host
        return
    waiting = 0
    for device in devices[1:]:
        held = [(by_name[s.model], s.offloaded) for s in slots if s.device == device.name]
        resident = sum(n.resident for n, off in held if not off)
        busiest = max((n.peak if off else n.transient for n, off in held), default=0)
        assert resident + busiest <= device.free
        waiting += sum(n.resident for n, off in held if off)
        assert not any(off and not n.movable for n, off in held)
    assert waiting <= host
    assert all(s.device != "cpu" for s in slots)


@settings(max_examples=300, deadline=None)
@given(needs_strategy, st.lists(st.integers(1, 96 * GIB), min_size=1, max_size=4))
def test_a_plan_exists_when_each_member_fits_alone_and_the_host_holds_the_rest(
    needs: list[Need], free: list[int]
) -> None:
    needs = [Need(f"m{i}", n.resident, n.transient) for i, n in enumerate(needs)]
    largest = max(free)
    needs = [n for n in needs if n.peak <= largest] or [Need("m0", 1, 0)]
    host = sum(n.resident for n in needs)
    devices = [Device("cpu", host), *(Device(f"cuda:{i}", f) for i, f in enumerate(free))]
    place(needs, devices)  # must not raise


# ---- refusals -----------------------------------------------------------------------------------


def test_a_refusal_names_the_member_its_need_the_device_and_a_fix(demo_models_dir: Path) -> None:
    model, records = infos(demo_models_dir, "tiny-llama", "tiny-gpt2"), sample().records
    run = build_config(
        {"dataset_id": "sample", "base_models": ["tiny-llama", "tiny-gpt2"], "method": "full"}
    )
    placed = plan_members(run, model, records, CPU)
    # one byte short of holding both, the one training at its peak
    held = sum(p.weight_bytes + p.optimizer_bytes for p in placed)
    busiest = max(p.gradient_bytes + p.activation_bytes + p.overhead_bytes for p in placed)
    budget = held + busiest - 1
    with pytest.raises(InvalidInput) as refused:
        plan_members(run, model, records, [Device("cpu", budget)])
    message = str(refused.value)
    assert refused.value.field == "baseModels"
    assert "'tiny-gpt2'" in message and "cpu" in message and "MiB" in message
    assert "It would fit with" in message and "batchSize" in message


def write_long_dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "long.jsonl").write_text(long_records(1024, 4200))
    return root


async def test_a_start_that_cannot_fit_is_refused_before_any_worker(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    """batch 1024 x 4096 tokens of a 0.2M-parameter model: tens of GB of activations, refused
    with a 400 before a worker process or a run folder exists, not killed by the OS."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-llama").symlink_to(demo_models_dir / "tiny-llama")
    svc = TrainingService(
        models_root=models,
        datasets_root=write_long_dataset(tmp_path / "datasets"),
        state_dir=tmp_path / "state",
    )
    svc.load()
    try:
        values = {
            "dataset_id": "long",
            "base_models": ["tiny-llama"],
            "batch_size": 1024,
            "max_seq_length": 4096,
        }
        with pytest.raises(InvalidInput) as refused:
            await svc.start(values)
        assert refused.value.field == "baseModels" and "tiny-llama" in str(refused.value)
        assert "GiB" in str(refused.value)
        assert svc.runs == {} and multiprocessing.active_children() == []
        assert not (models / "oneseek-certified").exists() or not any(
            (models / "oneseek-certified").iterdir()
        )
    finally:
        await svc.shutdown(grace=1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fallback_from_widths_agrees_with_the_proxies(
    name: str, precision: str, demo_models_dir: Path
) -> None:
    """What a model whose proxy will not run is estimated with, for a Llama-style layer: close,
    and rather too much than too little."""
    from transformers import AutoConfig

    path = demo_models_dir / name
    numerics = Numerics(precision, "cpu", lora=False)
    measured = activation_profile(path, config(name, method="full"), numerics)
    fallback = profile_from_widths(AutoConfig.from_pretrained(path), numerics)
    assert 0.9 * measured.per_layer <= fallback.per_layer <= 1.35 * measured.per_layer
