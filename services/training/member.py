"""One member of a population: a base model with its tokenizer, optimizer and data. Built
from plain values and returning plain values, it knows no population, event log or run
folder, so an executor may place it in another process or machine."""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from services.api import training_pb2
from services.api.codec import enum_to_str
from services.api.run_config import RunConfig, is_lora
from services.training.checkpoints import CheckpointMismatch, MemberState
from services.training.data import Batch, Record, make_batches, tokenize_records
from services.training.models import BaseModelInfo, load_model, load_tokenizer
from services.training.precision import Numerics, bf16_gpu, resolve_precision


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one purpose (a model's init, an epoch's shuffle) that does not depend on
    which other models are in the run, so adding a model never changes another's losses."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1)


def token_weighted_mean(losses: Sequence[torch.Tensor], weights: Sequence[int]) -> float:
    if not losses:
        return math.nan
    stacked = torch.stack([loss.float() for loss in losses])
    counts = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    return float((stacked * counts).sum() / counts.sum())


def fp32_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss over the labelled tokens, computed from fp32 logits whatever
    the model computed in, so every precision reports comparable numbers."""
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


def cpu_placement(precision: str = "fp32") -> training_pb2.Placement:
    """A placement on the CPU: what a member gets when nothing else is planned."""
    value = training_pb2.Precision.Value(f"PRECISION_{precision.upper()}")
    return training_pb2.Placement(device="cpu", precision=value)


def prepare_base(config: RunConfig, model: nn.Module) -> nn.Module:
    """The base model readied for the run's memory settings: gradient checkpointing (never
    re-entrant: adapters on a frozen base still get their gradients), and a 4-bit base made
    trainable through its adapters (norms in fp32, inputs needing gradients)."""
    base: Any = model
    kwargs = {"use_reentrant": False}
    if config.quantization == training_pb2.QUANTIZATION_4BIT:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(  # type: ignore[no-any-return, no-untyped-call]
            base,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=kwargs,
        )
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.config.use_cache = False
    return model


def wrap_model(config: RunConfig, model: nn.Module) -> nn.Module:
    """The model as the run trains it: LoRA adapters on its projections, or itself."""
    if not is_lora(config):
        return model
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    target_modules: list[str] | str = list(targets) if targets else "all-linear"
    # GPT-2 style models store their projections transposed (Conv1D); LoRA must know
    conv1d = any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in (targets or ())
        for name, module in model.named_modules()
    )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft still asks transformers for a renamed property; the notice is not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, lora)  # type: ignore[no-any-return]


def capture_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> MemberState:
    """The parameters the optimizer moves (LoRA matrices, or every weight for full training)
    and its state. named_parameters() lists a tied weight once, so nothing is stored twice."""
    weights = {
        name: param.detach().to("cpu").contiguous().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    return MemberState(weights=weights, optimizer=optimizer.state_dict())


def restore_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: MemberState, source: str
) -> None:
    """Puts back exactly what `capture_state` took; refuses a state of another model."""
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    saved = set(state.weights)
    try:
        if saved != expected:
            missing, extra = sorted(expected - saved), sorted(saved - expected)
            raise ValueError(f"missing {missing[:3]}, unexpected {extra[:3]}")
        model.load_state_dict(state.weights, strict=False)  # the frozen rest stays as loaded
    except (ValueError, RuntimeError) as exc:  # torch names a parameter whose shape differs
        raise CheckpointMismatch(
            f"{source} does not fit the model ({exc}). The base model or the training method "
            "changed since the checkpoint was written."
        ) from exc
    optimizer.load_state_dict(state.optimizer)


@dataclass(frozen=True)
class StepInfo:
    """After every optimizer step (cheap: no device sync): `seconds` of the step itself, `tokens`
    and `elapsed` so far in the epoch; the population fills in its steps done and planned."""

    epoch: int
    model: str
    step: int
    total_steps: int
    seconds: float = 0.0
    tokens: int = 0
    elapsed: float = 0.0
    steps_done: int = 0
    steps_planned: int = 0


class PopulationMember:
    """One base model, wrapped for training, with its own optimizer and tokenized split."""

    node = ""
    """Where it runs when not in the run's own process (a Ray executor's handle says)."""

    def __init__(
        self,
        config: RunConfig,
        info: BaseModelInfo,
        train: Sequence[Record],
        validation: Sequence[Record],
        placement: training_pb2.Placement | None = None,
    ) -> None:
        placement = placement or cpu_placement()
        self.info, self.device = info, torch.device(placement.device)
        # an offloaded member waits in host memory and comes onto its device for its turns
        self.home = torch.device("cpu") if placement.offloaded else self.device
        precision = enum_to_str(training_pb2.Precision.DESCRIPTOR, placement.precision) or "fp32"
        if precision == "auto":  # placed on a cluster's GPU: only here is the GPU known
            cuda = self.device.type == "cuda"
            precision = resolve_precision("auto", self.device.type, cuda and bf16_gpu())
        self.numerics = Numerics(precision, self.device.type, is_lora(config))
        self.scaler = self.numerics.scaler()
        # the two settings it uses between epochs; the rest is spent building it
        self.seed, self.batch_size = config.seed, config.batch_size
        self.tokenizer = load_tokenizer(info)
        torch.manual_seed(derive_seed(config.seed, info.name, "init"))
        base = load_model(
            info,
            self.home,
            self.numerics.load_dtype,
            four_bit=config.quantization == training_pb2.QUANTIZATION_4BIT,
        )
        self.model = wrap_model(config, prepare_base(config, base))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for param in trainable:  # adapters, or the master weights, train in fp32
            param.data = param.data.float()
        # every weight starts at 1.0, so the first epoch's learning rate is the run's own
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        examples = tokenize_records(validation, self.tokenizer, config.max_seq_length)
        batches = make_batches(
            examples, config.batch_size, self.tokenizer.pad_token_id, shuffle_seed=None
        )
        # on its device once, unless the member leaves it between turns
        resident = self.home == self.device
        self.val_batches = [self._to_device(b) for b in batches] if resident else batches
        self.train_examples = tokenize_records(train, self.tokenizer, config.max_seq_length)
        self._losses: list[torch.Tensor] = []
        self._counts: list[int] = []

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_examples) / self.batch_size)

    def batches(self, epoch: int) -> list[Batch]:
        """The epoch's training batches: the same order for every member of the run."""
        return make_batches(
            self.train_examples,
            self.batch_size,
            self.tokenizer.pad_token_id,
            shuffle_seed=derive_seed(self.seed, "shuffle", epoch),
        )

    def train_epoch(
        self, epoch: int, stop: Callable[[], bool], on_step: Callable[[StepInfo], None]
    ) -> float | None:
        """One epoch; its token-weighted mean train loss, or None when `stop()` turned true
        (the epoch is abandoned)."""
        batches = self.batches(epoch)
        torch.manual_seed(derive_seed(self.seed, self.name, "epoch", epoch))
        model, optimizer = self.model, self.optimizer
        model.train()
        self._losses, self._counts = [], []
        tokens = 0
        started = time.perf_counter()
        for step, batch in enumerate(batches, start=1):
            if stop():
                return None
            batch = self._to_device(batch)
            step_started = time.perf_counter()
            with self.numerics.autocast():
                loss = model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    labels=batch.labels,
                ).loss
            if self.scaler is None:
                loss.backward()
                optimizer.step()
            else:  # fp16: scaled so small gradients survive, unscaled before the step
                self.scaler.scale(loss).backward()
                self.scaler.step(optimizer)
                self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            self._losses.append(loss.detach())
            self._counts.append(batch.target_tokens)
            tokens += batch.tokens
            on_step(
                StepInfo(
                    epoch, self.name, step, len(batches), now - step_started, tokens, now - started
                )
            )
        return self.running_loss()

    def running_loss(self) -> float:
        """The token-weighted mean train loss of the epoch so far (waits for the device). Safe
        beside the training thread (the ray executor asks from another): only the steps whose
        loss and count are both in are counted."""
        losses, counts = self._losses, self._counts
        steps = min(len(losses), len(counts))
        return token_weighted_mean(losses[:steps], counts[:steps])

    @torch.no_grad()
    def validate(self) -> float:
        """The token-weighted mean loss on the held-out records, from fp32 logits."""
        self.model.eval()
        losses: list[torch.Tensor] = []
        counts: list[int] = []
        for batch in map(self._to_device, self.val_batches):
            with self.numerics.autocast():
                logits = self.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask
                ).logits
            losses.append(fp32_loss(logits, batch.labels))
            counts.append(batch.target_tokens)
        return token_weighted_mean(losses, counts)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """While it trains or validates: on its device. An offloaded member comes from host
        memory with its optimizer state, and goes back after."""
        if self.home == self.device:
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move(self.home)

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        # host to GPU may overlap (the GPU stream orders it before use); GPU to host must not,
        # since a checkpoint may read the host copy before an asynchronous copy has landed
        overlap = device.type == "cuda"
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # `step` stays put
                    state[key] = value.to(device, non_blocking=overlap)

    def set_learning_rate(self, rate: float) -> float:
        """Sets the rate for the next epoch; returns the rate read back from the optimizer."""
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        return float(self.optimizer.param_groups[0]["lr"])

    def state(self) -> MemberState:
        return capture_state(self.model, self.optimizer)

    def load_state(self, state: MemberState, source: str = "The checkpoint") -> None:
        restore_state(self.model, self.optimizer, state, source)

    def save(self, folder: Path) -> None:
        """Writes the adapter (LoRA) or the full weights, and the tokenizer, into `folder`
        (safetensors: the default of both PEFT and transformers)."""
        model: Any = self.model  # a PreTrainedModel or a PeftModel: both save_pretrained
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        tensors = ("input_ids", "attention_mask", "labels")
        moved = {n: getattr(batch, n).to(self.device, non_blocking=True) for n in tensors}
        return replace(batch, **moved)
