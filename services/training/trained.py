"""A model a certified run trained, found in its run folder and loaded for use (generation,
export): the base model from MODELS_DIR with the run's LoRA adapter merged in, or the run's
full weights, in the run's precision, on the device its plan named when this machine has one.
Nothing is loaded from a folder that does not verify: a tampered run is refused."""

from __future__ import annotations

import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.api import training_pb2
from services.api.run_config import RunConfig, config_from_dict, is_lora
from services.core.errors import Conflict, InvalidInput, NotFound
from services.core.layout import ADAPTERS_DIR, CERTIFIED_DIR, DNA_FILE, RESULTS_FILE, models_dir
from services.core.training_config import validate_model_name
from services.core.verify import verify_run_folder
from services.training.models import BaseModelInfo, load_model, quiet_progress
from services.training.precision import DTYPES, resolve_precision

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# transformers' progress bars and log levels are process-wide switches that each load flips and
# restores: two loads at once (two models of one request) would restore them under each other
_LOADING = threading.Lock()


@dataclass(frozen=True)
class TrainedSource:
    """What a certified run folder says of one of its models, read without loading anything."""

    run_dir: Path
    model: str
    models_root: Path
    config: RunConfig
    dna: dict[str, Any]
    results: dict[str, Any]
    field: str = "models"
    """The request field that named the model (a generate request's `models`, an export's
    `model`): every refusal about the model names it."""

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTERS_DIR / self.model

    @property
    def base_dir(self) -> Path:
        return self.models_root / self.model

    @property
    def lora(self) -> bool:
        return is_lora(self.config)

    @property
    def four_bit(self) -> bool:
        return self.config.quantization == training_pb2.QUANTIZATION_4BIT

    @property
    def base_model(self) -> dict[str, Any]:
        """The DNA's record of the base model (name, architecture, hashes)."""
        for entry in self.dna.get("base_models") or ():
            if isinstance(entry, dict) and entry.get("name") == self.model:
                return entry
        return {"name": self.model}

    def planned_device(self) -> str:
        for placement in self.results.get("placement") or ():
            if isinstance(placement, dict) and placement.get("model") == self.model:
                return str(placement.get("device") or "cpu")
        return "cpu"


def run_models(run_dir: Path) -> list[str]:
    """The models a certified run folder holds, in the run's order."""
    results = _read_json(run_dir / RESULTS_FILE, run_dir)
    return [str(m.get("name")) for m in results.get("base_models") or () if isinstance(m, dict)]


def best_model(run_dir: Path) -> str | None:
    best = _read_json(run_dir / RESULTS_FILE, run_dir).get("best_model")
    return str(best) if best else None


def locate(
    run_dir: Path, model: str, models_root: Path | None = None, *, field: str = "models"
) -> TrainedSource:
    """One model of a certified run: NotFound for a folder or model that is not there, Conflict
    for a run that ended with nothing certified."""
    run_dir = Path(run_dir)
    validate_model_name(model, field)
    if not run_dir.is_dir():
        raise NotFound(f"{run_dir} is not a run folder.", field="runId")
    dna = _read_json(run_dir / DNA_FILE, run_dir)
    results = _read_json(run_dir / RESULTS_FILE, run_dir)
    names = [m.get("name") for m in results.get("base_models") or () if isinstance(m, dict)]
    if model not in names:
        raise NotFound(
            f"Model {model!r} is not one of run {run_dir.name}'s models "
            f"({', '.join(map(str, names))}).",
            field=field,
        )
    if not (run_dir / ADAPTERS_DIR / model).is_dir():
        raise Conflict(
            f"Run {run_dir.name} holds no trained weights for {model!r} (adapters/{model}/ is "
            "missing).",
            field=field,
        )
    return TrainedSource(
        run_dir=run_dir,
        model=model,
        models_root=Path(models_root) if models_root is not None else default_models_root(run_dir),
        config=config_from_dict(results.get("config") or {}),
        dna=dna,
        results=results,
        field=field,
    )


def default_models_root(run_dir: Path) -> Path:
    """Where a run's base models are: the folder above `oneseek-certified/` when the run sits
    in `<models>/oneseek-certified/<runId>/`, else MODELS_DIR."""
    resolved = Path(run_dir).resolve()
    if resolved.parent.name == CERTIFIED_DIR:
        return resolved.parent.parent
    return models_dir()


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    if not path.is_file():
        raise Conflict(
            f"Run {run_dir.name} has no {path.name}: only a run that ended certified (completed, "
            "auto_stopped or stopped) can be used.",
            field="runId",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise Conflict(f"{path} cannot be read: {error}", field="runId") from error
    if not isinstance(data, dict):
        raise Conflict(f"{path} is not a JSON object.", field="runId")
    return data


def verify_source(
    source: TrainedSource, *, needs_base: bool = True, doing: str = "its models are not loaded"
) -> None:
    """Conflict naming what differs when the run folder (its adapters, its files, this model's
    base weights when present) is not exactly what was certified; NotFound when the base is
    needed (`needs_base`, a LoRA run) and missing."""
    # this model's base only: the others' weights (7B each) are not what is being loaded
    report = verify_run_folder(
        source.run_dir, models_root=source.models_root, base_models=[source.model]
    )
    if not report.ok:
        shown = " ".join(report.problems[:3])
        more = f" (and {len(report.problems) - 3} more)" if len(report.problems) > 3 else ""
        raise Conflict(
            f"Run {source.run_id} does not verify, so {doing}: {shown}{more} "
            "Run `oneseek verify` on the folder for every difference.",
            field="runId",
        )
    # a full run's weights stand alone; a base that is absent is not checked (a note)
    if needs_base and source.lora and not source.base_dir.is_dir():
        raise NotFound(
            f"Base model {source.model!r} of run {source.run_id} is not in {source.models_root}.",
            field=source.field,
        )


def choose_device(source: TrainedSource) -> torch.device:
    """The device the run's plan named, when this machine has it; another GPU when it has one;
    else the CPU. A 4-bit base needs a GPU."""
    planned = source.planned_device()
    if torch.cuda.is_available():
        index = int(planned.split(":")[1]) if planned.startswith("cuda:") else 0
        if planned == "cpu" and not source.four_bit:
            return torch.device("cpu")
        return torch.device("cuda", index if index < torch.cuda.device_count() else 0)
    if source.four_bit:
        raise Conflict(
            f"Run {source.run_id} trained {source.model!r} on a 4-bit base, which needs a CUDA GPU "
            "and this machine has none; export it with --merge on a GPU machine instead.",
            field=source.field,
        )
    return torch.device("cpu")


def inference_precision(source: TrainedSource, device: torch.device) -> str:
    """The run's precision on `device`: auto resolves as training resolves it (bf16 on a GPU
    that has it, fp32 on a CPU); fp16 has no CPU kernels worth using, so a CPU takes fp32, and a
    GPU without bf16 takes fp16."""
    from services.api.codec import enum_to_str
    from services.training.precision import bf16_gpu

    descriptor = training_pb2.RunConfig.DESCRIPTOR.fields_by_name["precision"].enum_type
    requested = enum_to_str(descriptor, source.config.precision) or "auto"
    bf16 = device.type == "cuda" and bf16_gpu()
    resolved = resolve_precision(requested, device.type, bf16)
    if device.type == "cpu" and resolved == "fp16":
        return "fp32"
    if device.type == "cuda" and resolved == "bf16" and not bf16:
        return "fp16"
    return resolved


@dataclass
class TrainedModel:
    """A loaded trained model, ready to generate or save."""

    source: TrainedSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    precision: str
    merged: bool
    """The LoRA adapter is merged into the base weights (a plain transformers model)."""
    load_seconds: float

    @property
    def nbytes(self) -> int:
        """What it holds in memory: every parameter and buffer."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def context_length(self) -> int | None:
        """The most tokens the model attends to (prompt and answer together), when its config
        says."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def load_trained(
    source: TrainedSource,
    *,
    merge: bool = True,
    device: torch.device | None = None,
    precision: str | None = None,
    verify: bool = True,
) -> TrainedModel:
    """The trained model of `source`, after the run folder verifies. `merge` folds a LoRA
    adapter into the base weights (not for a 4-bit base, whose weights cannot take it)."""
    started = time.perf_counter()
    if verify:
        verify_source(source)
    if device is None or source.four_bit:
        chosen = choose_device(source)  # a 4-bit base refuses a machine without a GPU
        device = device if device is not None and device.type == "cuda" else chosen
    precision = precision or inference_precision(source, device)
    dtype = DTYPES[precision]
    with _LOADING:
        model, merged, tokenizer = _load(source, merge, device, dtype)
    model.eval()  # type: ignore[no-untyped-call]
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return TrainedModel(
        source=source,
        model=model,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        merged=merged,
        load_seconds=time.perf_counter() - started,
    )


def _load(
    source: TrainedSource, merge: bool, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, bool, PreTrainedTokenizerBase]:
    tokenizer = _tokenizer(source)
    if source.lora:
        base = load_model(
            _info(source.model, source.base_dir), device, dtype, four_bit=source.four_bit
        )
        model, merged = _with_adapter(base, source, merge and not source.four_bit)
    else:
        model, merged = load_model(_info(source.model, source.adapter_dir), device, dtype), True
    return model, merged, tokenizer


def _info(name: str, path: Path) -> BaseModelInfo:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    architecture = (config.get("architectures") or [""])[0]
    return BaseModelInfo(
        name=name,
        path=path,
        architecture=architecture,
        model_type=str(config.get("model_type", "")),
        parameter_count=0,
    )


def _tokenizer(source: TrainedSource) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the adapter (the one the run trained with)."""
    from transformers import AutoTokenizer

    where = (
        source.adapter_dir
        if (source.adapter_dir / "tokenizer_config.json").is_file()
        else (source.base_dir)
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as error:
        raise InvalidInput(
            f"The tokenizer of {source.model!r} in {where} cannot be loaded: {error}",
            field=source.field,
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer  # type: ignore[no-any-return]


def _with_adapter(
    base: PreTrainedModel, source: TrainedSource, merge: bool
) -> tuple[PreTrainedModel, bool]:
    from peft import PeftModel

    with quiet_progress(), warnings.catch_warnings():
        # peft still asks transformers for a renamed property; the notice is not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model: Any = PeftModel.from_pretrained(base, source.adapter_dir, is_trainable=False)
    if merge:
        return model.merge_and_unload(), True
    return model, False
