"""The memory plan: where each member of a run trains, decided before any weight is loaded.

`place` is the pure rule (docs/memory.md): given each member's estimated need and each
device's free memory, one member per GPU when there are enough, several on one GPU when they
fit together, and otherwise members held in host memory between their turns and moved onto
their GPU for their own (the population trains one member at a time). Without a GPU, every
member trains on the CPU. `plan_run` measures the devices and the members and explains a
refusal: the member, its need, the largest free device and what would make it fit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.api import training_pb2
from services.api.codec import dict_to_message, enum_from_str, enum_to_str, message_to_dict
from services.api.run_config import RunConfig, is_lora
from services.core.errors import InvalidInput
from services.core.training_config import TRAINING_CONFIG
from services.training.data import Record, tokenize_records
from services.training.models import BaseModelInfo, load_tokenizer
from services.training.precision import Numerics, resolve_precision
from services.training.sizing import MemoryEstimate, estimate_member

USABLE = 0.9
"""The share of a device's free memory the plan fills: the rest absorbs the allocator's
fragmentation and the estimate's error."""
GIB = 1024**3


def human(size: float) -> str:
    """Bytes for people: 31.2 GiB, 740 MiB, 12 KiB."""
    if size >= GIB:
        return f"{size / GIB:.1f} GiB"
    if size >= 1024**2:
        return f"{size / 1024**2:.0f} MiB"
    return f"{size / 1024:.0f} KiB"


@dataclass(frozen=True)
class Device:
    name: str
    """"cpu" or "cuda:N"."""
    free: int
    """Bytes the plan may fill."""
    bf16: bool = False
    """A CUDA device that computes in bf16."""

    @property
    def cuda(self) -> bool:
        return self.name.startswith("cuda")


@dataclass(frozen=True)
class Need:
    """One member's need: what it holds between turns and what it adds while it trains."""

    model: str
    resident: int
    transient: int
    movable: bool = True
    """False for a 4-bit base, which bitsandbytes cannot move between devices."""

    @property
    def peak(self) -> int:
        return self.resident + self.transient


@dataclass(frozen=True)
class Slot:
    model: str
    device: str
    offloaded: bool = False


class NoPlacement(Exception):
    def __init__(self, need: Need, device: Device, reason: str) -> None:
        super().__init__(reason)
        self.need, self.device, self.reason = need, device, reason


def _load(needs: Sequence[tuple[Need, bool]]) -> int:
    """Peak of one device holding `needs` (need, offloaded), one of them training at a time."""
    resident = sum(n.resident for n, off in needs if not off)
    busiest = max((n.peak if off else n.transient for n, off in needs), default=0)
    return resident + busiest


def place(needs: Sequence[Need], devices: Sequence[Device]) -> list[Slot]:
    """Each member's device, in the order of `needs`; NoPlacement when there is none."""
    gpus = sorted((d for d in devices if d.cuda), key=lambda d: (-d.free, d.name))
    cpu = next((d for d in devices if not d.cuda), Device("cpu", 0))
    largest = max(needs, key=lambda n: (n.peak, n.model))
    if not gpus:
        if _load([(n, False) for n in needs]) <= cpu.free:
            return [Slot(n.model, cpu.name) for n in needs]
        why = "alone" if largest.peak > cpu.free else "beside the other models"
        raise NoPlacement(largest, cpu, why)
    if largest.peak > gpus[0].free:
        raise NoPlacement(largest, gpus[0], "alone")
    order = sorted(needs, key=lambda n: (-n.peak, n.model))
    on: dict[str, list[tuple[Need, bool]]] = {g.name: [] for g in gpus}
    if _fill(order, gpus, on, offload=False):  # every member resident: one per GPU first
        return _slots(needs, on)
    # some members wait in host memory: the ones that cannot move stay resident, the rest are
    # offloaded, then as many as still fit are made resident again (fewer moves each epoch)
    on = {g.name: [] for g in gpus}
    fixed = [n for n in order if not n.movable]
    if not _fill(fixed, gpus, on, offload=False) or not _fill(
        [n for n in order if n.movable], gpus, on, offload=True
    ):
        raise NoPlacement(largest, gpus[0], "beside the other models")
    for gpu in gpus:
        for index, (need, off) in enumerate(on[gpu.name]):
            if off:
                trial = [*on[gpu.name]]
                trial[index] = (need, False)
                if _load(trial) <= gpu.free:
                    on[gpu.name] = trial
    waiting = sum(n.resident for held in on.values() for n, off in held if off)
    if waiting > cpu.free:
        biggest = max((n for held in on.values() for n, off in held if off), key=lambda n: n.peak)
        raise NoPlacement(biggest, cpu, "in host memory between its turns")
    return _slots(needs, on)


def _fill(
    needs: Sequence[Need],
    gpus: Sequence[Device],
    on: dict[str, list[tuple[Need, bool]]],
    offload: bool,
) -> bool:
    """Puts each of `needs` on the GPU with the most room left after it (an empty one first);
    False when one fits nowhere."""
    for need in needs:
        best: tuple[int, int, str] | None = None
        for gpu in gpus:
            load = _load([*on[gpu.name], (need, offload)])
            if load <= gpu.free:
                key = (len(on[gpu.name]), load - gpu.free, gpu.name)
                best = key if best is None or key < best else best
        if best is None:
            return False
        on[best[2]].append((need, offload))
    return True


def _slots(needs: Sequence[Need], on: dict[str, list[tuple[Need, bool]]]) -> list[Slot]:
    where = {n.model: (device, off) for device, held in on.items() for n, off in held}
    return [Slot(n.model, where[n.model][0], where[n.model][1]) for n in needs]


# ---- the devices of this machine --------------------------------------------------------------


def host_available() -> int:
    """Bytes of RAM the kernel says a new process may use (MemAvailable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_CUDA_PROBE = """
import json, torch
print(json.dumps([
    [torch.cuda.mem_get_info(index)[0], torch.cuda.get_device_capability(index) >= (8, 0)]
    for index in range(torch.cuda.device_count())
]))
"""
"""Each visible GPU's free bytes, and whether it computes in bf16 (Ampere and newer)."""


def visible_devices() -> list[Device]:
    """Every CUDA device with its free memory, and the CPU with the RAM available; each at the
    USABLE share. CUDA is asked in a short child process, so this one never holds a CUDA
    context (and its memory) on every GPU."""
    import torch

    devices = [Device("cpu", int(host_available() * USABLE))]
    if not torch.cuda.is_available():
        return devices
    probe = subprocess.run(
        [sys.executable, "-c", _CUDA_PROBE], capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0:
        raise RuntimeError(f"could not read the GPUs' free memory: {probe.stderr.strip()}")
    for index, (free, bf16) in enumerate(json.loads(probe.stdout)):
        devices.append(Device(f"cuda:{index}", int(free * USABLE), bool(bf16)))
    return devices


# ---- a run's plan -----------------------------------------------------------------------------

Estimator = Callable[[BaseModelInfo, RunConfig, Numerics], MemoryEstimate]


def run_numerics(config: RunConfig, devices: Sequence[Device]) -> Numerics:
    """The run's precision on the kind of device it trains on, checked against the machine."""
    gpus = [d for d in devices if d.cuda]
    requested = _option(config, "precision")
    device_type = "cuda" if gpus else "cpu"
    if config.quantization == training_pb2.QUANTIZATION_4BIT:
        if not gpus:
            raise InvalidInput(
                "quantization 4bit needs a CUDA GPU (bitsandbytes' NF4 kernels), and this "
                "machine has none: use quantization none.",
                field="quantization",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InvalidInput(
                "quantization 4bit needs the bitsandbytes package, which is not installed: "
                "pip install 'oneseek[gpu]', or use quantization none.",
                field="quantization",
            )
    if requested == "fp16" and not gpus:
        raise InvalidInput(
            "precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32 (or auto).",
            field="precision",
        )
    if requested == "bf16" and gpus and not all(d.bf16 for d in gpus):
        raise InvalidInput(
            "precision bf16 is not supported by this machine's GPU; use fp16 or auto.",
            field="precision",
        )
    precision = resolve_precision(requested, device_type, all(d.bf16 for d in gpus))
    return Numerics(precision, device_type, is_lora(config))


def _option(config: RunConfig, name: str) -> str:
    """An enum setting of the run as the start options spell it: "auto", "4bit"."""
    return (
        enum_to_str(RunConfig.DESCRIPTOR.fields_by_name[name].enum_type, getattr(config, name))
        or ""
    )


def _need(name: str, estimate: MemoryEstimate, config: RunConfig) -> Need:
    quantized = config.quantization == training_pb2.QUANTIZATION_4BIT
    return Need(name, estimate.resident, estimate.transient, movable=not quantized)


def _placements(
    config: RunConfig,
    models: Sequence[BaseModelInfo],
    devices: Sequence[Device],
    estimate: Estimator,
) -> list[training_pb2.Placement]:
    numerics = run_numerics(config, devices)
    estimates = {info.name: estimate(info, config, numerics) for info in models}
    slots = place([_need(n, e, config) for n, e in estimates.items()], devices)
    precision = enum_from_str(training_pb2.Precision.DESCRIPTOR, numerics.precision)
    return [
        estimates[slot.model].placement(slot.model, slot.device, precision, slot.offloaded)
        for slot in slots
    ]


def _alternatives(config: RunConfig, devices: Sequence[Device]) -> list[tuple[str, RunConfig]]:
    """Changes of the settings that lower the memory a member needs, one at a time, each
    setting's mildest change first."""
    options: list[tuple[str, dict[str, object]]] = []
    gpus = [d for d in devices if d.cuda]
    bf16 = all(d.bf16 for d in gpus)
    if run_numerics(config, devices).precision == "fp32" and bf16:
        options.append(("precision bf16", {"precision": training_pb2.PRECISION_BF16}))
    if is_lora(config) and gpus and config.quantization != training_pb2.QUANTIZATION_4BIT:
        options.append(("quantization 4bit", {"quantization": training_pb2.QUANTIZATION_4BIT}))
    if not config.gradient_checkpointing:
        options.append(("gradientCheckpointing true", {"gradient_checkpointing": True}))
    batch = config.batch_size
    while batch > 1:
        batch //= 2
        options.append((f"batchSize {batch}", {"batch_size": batch}))
    length = config.max_seq_length
    while length > 64:
        length //= 2
        options.append((f"maxSeqLength {length}", {"max_seq_length": length}))
    changed = []
    for words, values in options:
        variant = RunConfig()
        variant.CopyFrom(config)
        for name, value in values.items():
            setattr(variant, name, value)
        changed.append((words, variant))
    return changed


def plan_run(
    config: RunConfig,
    models: Sequence[BaseModelInfo],
    estimate: Estimator,
    devices: Sequence[Device] | None = None,
) -> list[training_pb2.Placement]:
    """Each member's placement, in the order of `models`; InvalidInput naming the member that
    cannot be placed, its need, the largest free device and what would make it fit."""
    devices = list(devices) if devices is not None else visible_devices()
    try:
        return _placements(config, models, devices, estimate)
    except NoPlacement as error:
        refusal = error
    need, device = refusal.need, refusal.device
    numerics = run_numerics(config, devices)
    parts = estimate(next(m for m in models if m.name == need.model), config, numerics)
    fixes: list[str] = []
    for words, variant in _alternatives(config, devices):
        setting = words.split()[0]
        if any(fix.startswith(setting + " ") for fix in fixes):
            continue  # a milder change of this setting works already
        try:
            _placements(variant, models, devices, estimate)
        except (NoPlacement, InvalidInput):
            continue
        fixes.append(words)
    remedy = (
        f"It would fit with {' or '.join(fixes)}."
        if fixes
        else "No smaller setting makes it fit: use a device with more free memory."
    )
    where = {
        "alone": "",
        "beside the other models": " beside the run's other models",
        "in host memory between its turns": " in host memory between its turns",
    }[refusal.reason]
    raise InvalidInput(
        f"Model '{need.model}' needs about {human(need.peak)} to train (weights "
        f"{human(parts.weights)}, gradients {human(parts.gradients)}, optimizer state "
        f"{human(parts.optimizer)}, activations {human(parts.activations)} for batches of "
        f"{parts.batch[0]} × {parts.batch[1]} tokens), which does not fit{where}: the largest "
        "free device is "
        f"{device.name} with {human(device.free)} usable. {remedy}",
        field="baseModels",
    )


def dataset_estimator(records: Sequence[Record]) -> Estimator:
    """Estimates at the run's largest batch: `batchSize` examples (no more than the records)
    as long as its longest tokenized record, capped by `maxSeqLength`, so a generous cap on
    short data is not refused. Each model's tokenizer reads the records once."""
    longest: dict[str, int] = {}
    cap = int(TRAINING_CONFIG["limits"]["max_seq_length"])

    def estimate(info: BaseModelInfo, config: RunConfig, numerics: Numerics) -> MemoryEstimate:
        if info.name not in longest:
            tokenized = tokenize_records(records, load_tokenizer(info), cap)
            longest[info.name] = max((len(e.input_ids) for e in tokenized), default=1)
        length = min(longest[info.name], config.max_seq_length)
        examples = max(1, min(config.batch_size, len(records)))
        return estimate_member(info.path, config, numerics, (examples, length))

    return estimate


def plan_members(
    config: RunConfig,
    models: Sequence[BaseModelInfo],
    records: Sequence[Record],
    devices: Sequence[Device] | None = None,
) -> list[training_pb2.Placement]:
    """The run's memory plan for its dataset's `records` (see `plan_run`)."""
    return plan_run(config, models, dataset_estimator(records), devices)


def plan_on_cluster_gpus(
    config: RunConfig, models: Sequence[BaseModelInfo], records: Sequence[Record]
) -> list[training_pb2.Placement]:
    """With the ray executor on a cluster with GPUs: each member an actor with a GPU of its own
    (inside it, cuda:0). Ray does not say how much memory its nodes' GPUs have, so each member's
    estimate is reported, not checked against one; `auto` precision is resolved by the member
    on its GPU."""
    requested = _option(config, "precision")
    numerics = Numerics(resolve_precision(requested, "cuda", True), "cuda", is_lora(config))
    estimate = dataset_estimator(records)
    return [
        estimate(info, config, numerics).placement(info.name, "cuda:0", config.precision)
        for info in models
    ]


def planned_models(
    config: RunConfig,
    models: Sequence[BaseModelInfo],
    records: Sequence[Record],
    devices: Sequence[Device] | None = None,
    *,
    cluster_gpus: int = 0,
) -> list[dict[str, Any]]:
    """The run's models as its Run message lists them (ModelInfo, JSON shape), each with its
    placement: on this machine's devices, or, with `cluster_gpus`, a GPU each in a cluster."""
    if cluster_gpus:
        placements = plan_on_cluster_gpus(config, models, records)
    else:
        placements = plan_members(config, models, records, devices)
    return [
        {**info.to_dict(), "placement": message_to_dict(placement)}
        for info, placement in zip(models, placements, strict=True)
    ]


def placements_of(models: Sequence[Mapping[str, Any]]) -> list[training_pb2.Placement] | None:
    """The placements `planned_models` put in the models' dicts; None when one has none."""
    found = []
    for model in models:
        if not model.get("placement"):
            return None
        placement = dict_to_message(model["placement"], training_pb2.Placement())
        assert isinstance(placement, training_pb2.Placement)
        found.append(placement)
    return found
