"""How much memory one member will need to train, known before any weight is loaded.

The parameter counts come from the model class itself, built from `config.json` on the meta
device (no memory, no weights); the activations from proxies of the same class: the same
config shrunk to a few small layers, wrapped and typed as the run will wrap and type the real
one, whose forward pass is run on the CPU while every tensor it keeps for the backward pass is
counted. What a layer keeps grows linearly with its width and with the tokens of a batch, so
the proxies' counts scale to the real model exactly where the architecture says so.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from services.api import training_pb2
from services.api.run_config import RunConfig, is_lora
from services.core.errors import InvalidInput
from services.training.models import weight_files
from services.training.precision import BYTES, Numerics

log = logging.getLogger("oneseek.training.sizing")

PROXY_HEAD_DIM = 8
"""Width of each attention head in a proxy: the proxy keeps the real head count."""
PROXY_VOCAB = 256
PROXY_BATCH, PROXY_SEQ = 2, 16
CPU_RUNTIME = 96 * 1024**2
"""What training on a CPU holds beyond its tensors: the allocator's free lists and slack,
oneDNN's kernels and scratch space, lazily loaded modules. bench/mid_model.py measures 30–70
MiB with no tokens at all and up to ~120 MiB beyond the tensors at a batch of 8 × 32."""
NF4_BYTES = 0.5 + 4 / 64 / 256 * 2 + 4 / 64 / 4
"""Bytes per 4-bit weight: its nibble, the 8-bit absmax of each 64-block quantized again in
blocks of 256 (double quantization), and a little slack for bitsandbytes' per-tensor state."""


@dataclass(frozen=True)
class ModelShape:
    """A base model's sizes as its class builds it from config.json."""

    parameters: int
    """Every parameter; a tied one (input and output embeddings) once."""
    quantizable: int
    """The parameters of its linear layers but the output head: what 4-bit stores in NF4."""
    lora_parameters: int
    """The adapter parameters a LoRA of rank 1 adds (a rank-r adapter adds r times as many)."""
    hidden_size: int
    layers: int
    vocab_size: int


def _config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _build(config: Any, device: str | torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device(device), _quiet():
        return AutoModelForCausalLM.from_config(config)  # type: ignore[no-any-return, no-untyped-call]


def _linear_parameters(model: nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def model_shape(path: Path) -> ModelShape:
    """The sizes of the model in folder `path`, from its config.json alone; InvalidInput
    (baseModels) when its class cannot be built from it."""
    try:
        return _shape(str(Path(path).resolve()), (Path(path) / "config.json").stat().st_mtime_ns)
    except Exception as error:  # an unknown model_type, a config its class rejects, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise InvalidInput(
            f"Base model '{Path(path).name}' cannot be sized from its config.json: {reason}",
            field="baseModels",
        ) from error


@lru_cache(maxsize=64)
def _shape(path: str, _mtime: int) -> ModelShape:
    from services.training.member import wrap_model

    config = _config(Path(path))
    model = _build(config, "meta")
    parameters = sum(p.numel() for p in model.parameters())
    quantizable = _linear_parameters(model)
    run = RunConfig(method=training_pb2.TRAINING_METHOD_LORA, lora_rank=1, lora_alpha=1)
    with _quiet():
        wrapped = wrap_model(run, model)
    lora = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return ModelShape(
        parameters=parameters,
        quantizable=quantizable,
        lora_parameters=lora,
        hidden_size=int(config.hidden_size),
        layers=int(config.num_hidden_layers),
        vocab_size=int(config.vocab_size),
    )


# ---- activations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationProfile:
    """The most a training step holds at once beyond the weights and their gradients (what the
    forward pass keeps for the backward pass, and the backward pass's working set), per token
    of a batch."""

    per_layer: float
    """Held for each decoder layer."""
    per_vocab_entry: float
    """Held per entry of the vocabulary (the logits, their log-softmax and its gradient)."""
    rest: float
    """Held outside the layers and the logits (embeddings, the final norm, and with gradient
    checkpointing the one layer being recomputed)."""


def _proxy(config: Any, layers: int, vocab: int) -> tuple[Any, float]:
    """`config` shrunk to `layers` layers, `vocab` entries and heads PROXY_HEAD_DIM wide; and
    how many times wider the real model's layers are."""
    proxy = copy.deepcopy(config)
    heads = int(config.num_attention_heads)
    width = min(int(config.hidden_size), heads * PROXY_HEAD_DIM)
    scale = config.hidden_size / width
    proxy.hidden_size = width
    if getattr(config, "head_dim", None):
        proxy.head_dim = max(2, round(config.head_dim / scale))
    for name in ("intermediate_size", "n_inner"):
        value = getattr(config, name, None)
        if value:
            setattr(proxy, name, max(1, round(value / scale)))
    real_layers = int(config.num_hidden_layers)
    for name, value in config.to_dict().items():  # per-layer lists, e.g. layer_types
        if isinstance(value, list) and len(value) == real_layers and name != "architectures":
            setattr(proxy, name, value[:layers])
    proxy.num_hidden_layers = layers
    proxy.vocab_size = vocab
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(proxy, name, None) is not None:
            setattr(proxy, name, 0)
    proxy.use_cache = False
    return proxy, scale


class PeakBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The most bytes of tensor storage alive at once among those made while it is active
    (what existed before, the weights above all, is not counted)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.before = {tensor.untyped_storage()._cdata for tensor in existing}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        out = func(*args, **(kwargs or {}))
        for item in tree_leaves(out):
            if not isinstance(item, torch.Tensor):
                continue
            storage = item.untyped_storage()
            key = storage._cdata
            if key in self.live or key in self.before:
                continue  # a view, an in-place result, or a weight
            self.live[key] = storage.nbytes()
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key)
        return out


def step_bytes(model: nn.Module, numerics: Numerics, ids: torch.Tensor) -> int:
    """The most memory a training step (forward and backward) on the batch `ids` holds at once
    beyond the weights: what the forward pass keeps for the backward pass, the backward pass's
    working set, and the gradients."""
    mask = torch.ones_like(ids)
    model.train()
    existing = [*model.parameters(), *model.buffers(), ids, mask]
    tracker = PeakBytes(existing)
    with tracker, _quiet():
        with numerics.autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    return tracker.peak


def _per_token(model: nn.Module, numerics: Numerics, vocab: int) -> float:
    """A step's memory per token: the growth from one batch size to twice it, so what a step
    holds once whatever the batch (autocast's 16-bit copies of the weights) is left out."""
    generator = torch.Generator().manual_seed(0)
    small, large = (
        step_bytes(
            model, numerics, torch.randint(0, vocab, (batch, PROXY_SEQ), generator=generator)
        )
        for batch in (PROXY_BATCH, 2 * PROXY_BATCH)
    )
    return (large - small) / (PROXY_BATCH * PROXY_SEQ)


def _typed(model: nn.Module, run: RunConfig, numerics: Numerics) -> nn.Module:
    from services.training.member import prepare_base, wrap_model

    model = model.to(numerics.load_dtype)
    with _quiet():
        model = wrap_model(run, prepare_base(run, model))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def activation_profile(path: Path, run: RunConfig, numerics: Numerics) -> ActivationProfile:
    """What a training step of the model in `path` holds per token, as the run trains it
    (LoRA or full, its precision, gradient checkpointing)."""
    # what shapes the activations, and nothing else, so other settings share the proxies
    wrapping = RunConfig(
        method=run.method,
        lora_rank=run.lora_rank,
        lora_alpha=run.lora_alpha,
        lora_dropout=run.lora_dropout,
        gradient_checkpointing=run.gradient_checkpointing,
    )
    # a 16-bit proxy runs on the CPU, where bf16 keeps exactly what fp16 keeps on a GPU
    proxy = "fp32" if numerics.precision == "fp32" else "bf16"
    mtime = (Path(path) / "config.json").stat().st_mtime_ns
    try:
        return _profile(
            str(Path(path).resolve()), mtime, proxy, wrapping.SerializeToString(deterministic=True)
        )
    except Exception:  # a class whose proxy will not build or run: estimate from its widths
        log.warning("no proxy of %s could run; activations estimated from its widths", path)
        return profile_from_widths(_config(Path(path)), numerics)


def profile_from_widths(config: Any, numerics: Numerics) -> ActivationProfile:
    """What a Llama-style decoder layer keeps per token, from its widths: about 10 hidden-wide
    and 4 MLP-wide tensors in the compute dtype, the k/v projections, and the norms' fp32
    copies (fitted to the proxies of the demo architectures)."""
    compute = BYTES[numerics.precision]
    hidden = int(config.hidden_size)
    inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * (hidden // heads)
    return ActivationProfile(
        per_layer=compute * (10.3 * hidden + 2 * kv + 4.2 * inner) + 8.4 * hidden,
        per_vocab_entry=4.0,
        rest=(2 * compute + 8) * hidden,
    )


@lru_cache(maxsize=64)
def _profile(path: str, _mtime: int, precision: str, wrapping: bytes) -> ActivationProfile:
    run = RunConfig.FromString(wrapping)
    proxy_numerics = Numerics(precision, "cpu", is_lora(run))
    config = _config(Path(path))
    counts = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for layers, vocab in ((1, PROXY_VOCAB), (2, PROXY_VOCAB), (1, 2 * PROXY_VOCAB)):
            proxy, scale = _proxy(config, layers, vocab)
            model = _typed(_build(proxy, "cpu"), run, proxy_numerics)
            counts[layers, vocab] = _per_token(model, proxy_numerics, vocab)
    per_layer = counts[2, PROXY_VOCAB] - counts[1, PROXY_VOCAB]
    per_entry = (counts[1, 2 * PROXY_VOCAB] - counts[1, PROXY_VOCAB]) / PROXY_VOCAB
    rest = counts[1, PROXY_VOCAB] - per_layer - per_entry * PROXY_VOCAB
    return ActivationProfile(
        per_layer=max(0.0, per_layer) * scale,
        per_vocab_entry=max(0.0, per_entry),
        rest=max(0.0, rest) * scale,
    )


# ---- one member's need ------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """One member's estimated peak while it trains, by part, in bytes."""

    weights: int
    """Its parameters as stored: base and adapters, or the fp32 master weights."""
    gradients: int
    optimizer: int
    """AdamW's two moments of every trainable parameter, fp32."""
    activations: int
    """What the forward pass keeps plus the backward pass's working set, at the run's
    largest batch."""
    overhead: int = 0
    """On a CPU: the allocator's and kernels' own memory, and the checkpoint file read beside
    the weights while they are converted to another dtype (beyond what training adds)."""
    batch: tuple[int, int] = (0, 0)
    """That batch: (examples, tokens each)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def placement(
        self, model: str, device: str, precision: int, offloaded: bool = False
    ) -> training_pb2.Placement:
        """The plan's record of a member placed with this estimate."""
        return training_pb2.Placement(
            model=model,
            device=device,
            precision=precision,  # type: ignore[arg-type]
            estimated_bytes=self.total,
            weight_bytes=self.weights,
            gradient_bytes=self.gradients,
            optimizer_bytes=self.optimizer,
            activation_bytes=self.activations,
            overhead_bytes=self.overhead,
            offloaded=offloaded,
        )

    @property
    def resident(self) -> int:
        """What stays between its turns: weights and optimizer state (gradients are freed after
        each step, activations after each backward pass)."""
        return self.weights + self.optimizer

    @property
    def transient(self) -> int:
        return self.gradients + self.activations + self.overhead


def estimate_member(
    path: Path, run: RunConfig, numerics: Numerics, batch_tokens: tuple[int, int]
) -> MemoryEstimate:
    """The peak memory of training the model in `path` with `run`'s settings in `numerics`,
    on batches of `batch_tokens` = (examples, tokens each) at most."""
    shape = model_shape(path)
    compute = BYTES[numerics.precision]
    if is_lora(run):
        trainable = shape.lora_parameters * run.lora_rank
        if run.quantization == training_pb2.QUANTIZATION_4BIT:
            # NF4 linear layers; the rest is kept in fp32 for a stable k-bit training
            base = shape.quantizable * NF4_BYTES + (shape.parameters - shape.quantizable) * 4
        else:
            base = shape.parameters * compute
        weights = int(base) + trainable * 4
    else:
        trainable = shape.parameters
        weights = trainable * 4  # fp32 master weights whatever the compute precision
    profile = activation_profile(path, run, numerics)
    examples, length = batch_tokens
    per_token = (
        shape.layers * profile.per_layer + profile.rest + profile.per_vocab_entry * shape.vocab_size
    )
    activations = math.ceil(examples * length * per_token)
    if numerics.mixed and not is_lora(run):
        # autocast keeps a 16-bit copy of each fp32 weight it multiplies until the backward pass
        activations += shape.quantizable * compute
    gradients, optimizer = trainable * 4, trainable * 8
    overhead = 0
    if numerics.device_type == "cpu":
        # the peak is the larger of loading's (while the weights are converted to another
        # dtype, the checkpoint file is read in full beside them) and training's, which adds
        # the runtime's own memory to the tensors
        stored = sum(file.stat().st_size for file in weight_files(Path(path)))
        converting = round(stored / max(1, shape.parameters)) != (compute if is_lora(run) else 4)
        loading = stored if converting else 0
        overhead = max(CPU_RUNTIME, loading - (gradients + optimizer + activations))
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        overhead=overhead,
        batch=batch_tokens,
    )
