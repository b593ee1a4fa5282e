"""What a member computes in: the run's `precision` resolved for its device, and what that
means for loading its weights, the forward pass and the optimizer step (docs/memory.md).

- LoRA: the frozen base is loaded directly in the compute dtype (bf16/fp16), the adapters and
  their optimizer state are fp32, and the forward pass runs under autocast.
- Full fine-tune: fp32 master weights, gradients and optimizer state; the forward pass runs
  under autocast, so matmuls are bf16/fp16 and the update never rounds to 16 bits.
- fp16 scales the loss (GradScaler) so small gradients do not underflow; bf16 needs no scaling.
- Losses are computed from fp32 logits, whatever the precision (see `PopulationMember.validate`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}


def bf16_gpu() -> bool:
    """Whether this process's current CUDA device computes in bf16 (Ampere and newer)."""
    return bool(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))


def resolve_precision(requested: str, device_type: str, bf16_supported: bool = False) -> str:
    """`requested` for a device: `auto` is bf16 on a CUDA device that supports it, fp16 on
    one that does not, fp32 on a CPU; anything else stays as it is."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if bf16_supported else "fp16"
    return "fp32"


@dataclass(frozen=True)
class Numerics:
    """How one member's tensors are typed: `precision` is fp32, bf16 or fp16 (resolved)."""

    precision: str
    device_type: str
    lora: bool

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype the base weights are loaded in: a frozen LoRA base in the compute dtype;
        the weights a full fine-tune trains stay fp32 (the master copy)."""
        return self.compute_dtype if self.lora else torch.float32

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's context: autocast to the compute dtype, or nothing for fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (its small gradients would underflow without); None else."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)
