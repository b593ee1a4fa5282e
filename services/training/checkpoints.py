"""Per-epoch checkpoints of a run: what resuming needs, under `<run>/checkpoints/epoch-NNNN/`.

Like the HF Trainer's `checkpoint-*` folders: per member its trainable weights (safetensors) and
optimizer state, plus `state.json`: the population's TrainingProgress and every file's sha256.
Written into a staging folder and renamed into place, a checkpoint is whole or absent; the run
keeps at most its best and its last.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from services.api.run_config import RunConfig, config_to_dict
from services.core.adaptive_weights import initial_weights
from services.core.atomic import fsync_dir, replace_dir_atomic, write_json_atomic
from services.core.auto_stop import AutoStopState
from services.core.errors import ArtifactError, InvalidInput
from services.core.layout import CHECKPOINTS_DIR

log = logging.getLogger("oneseek.training.checkpoints")

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
FORMAT = 1
_NAME = re.compile(r"^epoch-(\d{4,})$")


class CheckpointError(ArtifactError):
    """A checkpoint could not be written, or one on disk is incomplete or altered."""


class CheckpointMismatch(InvalidInput):
    """A checkpoint does not belong to this run's models, data or settings."""


@dataclass
class MemberState:
    """What a checkpoint keeps of one member: the parameters its optimizer moves, and its
    optimizer's `state_dict()`."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


@dataclass
class TrainingProgress:
    """The population's state: everything but the tensors that the next epoch depends on.
    `to_dict()` is a checkpoint's state.json; `from_dict()` reads one back."""

    run_id: str
    config: dict[str, Any]
    """`config_to_dict` of the run's settings: a checkpoint of other settings is refused."""
    dataset_sha256: str
    models: list[str]
    weights: dict[str, float] = field(default_factory=dict)
    auto_stop: AutoStopState = field(default_factory=AutoStopState)
    best: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model its best epoch so far: `{"epoch", "val_loss"}`, both null before the first."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every epoch's epoch_end event, as the run's events.jsonl holds it."""
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    last_val_losses: dict[str, float] = field(default_factory=dict)
    last_total: float | None = None
    steps_done: int = 0
    step_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    """Run time up to the checkpoint, over every attempt of a resumed run."""
    rng: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    announcement: list[dict[str, Any]] = field(default_factory=list)
    """The events that announce `epoch` (epoch_end, weight_adjustment, auto_stop_triggered),
    as stamped when the checkpoint was written: what resuming emits when the log lacks them."""

    @classmethod
    def start(
        cls, run_id: str, config: RunConfig, dataset_sha256: str, models: Sequence[str]
    ) -> TrainingProgress:
        best = {name: {"epoch": None, "val_loss": None} for name in models}
        weights = initial_weights(models)
        return cls(run_id, config_to_dict(config), dataset_sha256, list(models), weights, best=best)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["auto_stop"]["totals"] = list(self.auto_stop.totals)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingProgress:
        """Reads a state.json (its format and files are the checkpoint's own). One written
        before announcements were checkpointed has none: its epoch was announced first."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        stop = dict(values.pop("auto_stop"))
        stop["totals"] = tuple(stop["totals"])
        return cls(**values, auto_stop=AutoStopState(**stop))

    def best_model(self) -> str | None:
        """The model with the lowest validation loss in the latest epoch (ties by name)."""
        if not self.last_val_losses:
            return None
        return min(self.last_val_losses.items(), key=lambda item: (item[1], item[0]))[0]


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint on disk (its files' hashes checked when it was loaded)."""

    epoch: int
    path: Path
    state: dict[str, Any]

    def member_state(self, model: str) -> MemberState:
        folder = self.path / "models" / model
        return MemberState(
            weights=load_file(str(folder / WEIGHTS_FILE)),
            optimizer=torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        )


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return checkpoints_root(run_dir) / f"epoch-{epoch:04d}"


def checkpoint_epochs(run_dir: Path) -> list[int]:
    """Epochs that have a checkpoint folder in place, ascending (staging folders excluded)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = (_NAME.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m is not None)


# ---- random number generators ------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as JSON."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


# ---- writing, reading, pruning -----------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    """Plain Python writes, so a full disk or a file-size limit surfaces as an OSError with
    its errno (torch's and safetensors' own writers report it as opaque runtime errors)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    state: Mapping[str, Any],
    members: Mapping[str, MemberState],
) -> Path:
    """Writes the checkpoint of `epoch` (`state`: the TrainingProgress.to_dict(); `members`:
    each member's state) atomically and returns its folder. Any OSError becomes a
    CheckpointError naming the path and the system's reason."""
    final = checkpoint_path(run_dir, epoch)
    staged = final.with_name(f".{final.name}.staging")
    try:
        if staged.exists():
            shutil.rmtree(staged)
        files: dict[str, dict[str, str]] = {}
        for name, member in members.items():
            folder = staged / "models" / name
            folder.mkdir(parents=True)
            weights, moments = folder / WEIGHTS_FILE, folder / OPTIMIZER_FILE
            _write_file(weights, safetensors_bytes(member.weights))
            buffer = io.BytesIO()
            torch.save(member.optimizer, buffer)
            _write_file(moments, buffer.getvalue())
            fsync_dir(folder)
            files[name] = {WEIGHTS_FILE: _sha256(weights), OPTIMIZER_FILE: _sha256(moments)}
        write_json_atomic(
            staged / STATE_FILE, {**state, "format": FORMAT, "epoch": epoch, "files": files}
        )
        replace_dir_atomic(staged, final)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        where = exc.filename or staged
        raise CheckpointError(
            f"Cannot write the checkpoint of epoch {epoch} to {final} ({where}): "
            f"{exc.strerror or exc}. Free disk space or fix the permissions of the run folder, "
            "then resume the run."
        ) from exc
    return final


def read_checkpoint(path: Path) -> Checkpoint:
    """Reads one checkpoint folder and checks every file against the hashes in its state."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / STATE_FILE} cannot be read: {exc}.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path / STATE_FILE} is not a format-{FORMAT} checkpoint state.")
    checkpoint = Checkpoint(epoch=int(state["epoch"]), path=path, state=state)
    for model, hashes in dict(state.get("files", {})).items():
        for name, expected in dict(hashes).items():
            file = path / "models" / model / name
            try:
                actual = _sha256(file)
            except OSError as exc:
                raise CheckpointError(f"{file} cannot be read: {exc.strerror or exc}.") from exc
            if actual != expected:
                raise CheckpointError(f"{file} does not match the hash recorded in {STATE_FILE}.")
    return checkpoint


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that reads back intact; an altered one is skipped (with a
    warning) for the one before it. None when the run never finished an epoch."""
    for epoch in reversed(checkpoint_epochs(run_dir)):
        try:
            return read_checkpoint(checkpoint_path(run_dir, epoch))
        except CheckpointError as exc:
            log.warning("skipping checkpoint of epoch %s: %s", epoch, exc)
    return None


def prune_checkpoints(run_dir: Path, keep: Iterable[int]) -> list[int]:
    """Removes every checkpoint (and leftover staging folder) but the epochs in `keep`;
    returns the epochs removed. Best effort: a folder that will not go is left for next time."""
    kept = set(keep)
    root = checkpoints_root(run_dir)
    removed: list[int] = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match is not None and int(match.group(1)) in kept:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if match is not None and not path.exists():
            removed.append(int(match.group(1)))
    return sorted(removed)


def remove_checkpoints(run_dir: Path) -> None:
    """A run that ended with a certified folder has nothing left to resume."""
    shutil.rmtree(checkpoints_root(run_dir), ignore_errors=True)
