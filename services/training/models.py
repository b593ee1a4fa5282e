"""Base models: find the folders under `$MODELS_DIR`, count their parameters, load them.

A base model is a folder with `config.json`, weights and tokenizer files that
`AutoModelForCausalLM` / `AutoTokenizer` load with `local_files_only=True`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.core.errors import InvalidInput
from services.core.layout import CERTIFIED_DIR, models_dir
from services.core.training_config import validate_base_models

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# a safetensors header is JSON of a few KB per tensor; anything this big is not one
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    """The folder name under MODELS_DIR; what a run request selects."""
    path: Path
    architecture: str
    """`config.json` "architectures"[0], e.g. "LlamaForCausalLM"."""
    model_type: str
    parameter_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "parameter_count": self.parameter_count,
        }


def weight_files(path: Path) -> list[Path]:
    """The weight files `from_pretrained` loads from `path`, sorted by name.

    Safetensors when there are any (transformers prefers them), else `pytorch_model*.bin`.
    """
    safetensors = sorted(p for p in Path(path).glob("*.safetensors") if p.is_file())
    if safetensors:
        return safetensors
    return sorted(p for p in Path(path).glob("pytorch_model*.bin") if p.is_file())


def _safetensors_parameters(path: Path) -> int:
    # the format: an 8-byte little-endian header length, then a JSON header naming every
    # tensor's shape; reading it is instant where loading the weights takes seconds to minutes
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} has an implausible header length {length}")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a header that is not a JSON object")
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        total += math.prod(int(size) for size in entry["shape"])
    return total


def _bin_parameters(path: Path) -> int:
    # mmap: only the tensor metadata is touched, not the (possibly huge) data
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return sum(tensor.numel() for tensor in state.values() if isinstance(tensor, torch.Tensor))


def parameter_count(path: Path) -> int:
    """Parameters stored in the folder's weight files, without loading the model."""
    files = weight_files(path)
    if not files:
        raise ValueError(f"{path} has no weight files")
    if files[0].suffix == ".safetensors":
        return sum(_safetensors_parameters(file) for file in files)
    return sum(_bin_parameters(file) for file in files)


def _inspect(path: Path) -> BaseModelInfo:
    """The folder's info; raises ValueError/OSError/KeyError/TypeError when it is no model."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    model_type = config["model_type"]
    if not isinstance(model_type, str) or not model_type:
        raise ValueError("config.json has no model_type")
    architectures = config.get("architectures") or [model_type]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError("no tokenizer files")
    return BaseModelInfo(
        name=path.name,
        path=path,
        architecture=str(architectures[0]),
        model_type=model_type,
        parameter_count=parameter_count(path),
    )


def discover_models(root: Path | None = None) -> list[BaseModelInfo]:
    """Every base model folder in `root`, sorted by name.

    Skipped: the certified runs folder, hidden folders (including the demo assets' half-made
    ones), plain files, and folders that are no model (a person sees them missing from the
    list; `load_model` says what is wrong when one is named explicitly).
    """
    root = models_dir(root)
    if not root.is_dir():
        return []
    infos = []
    for path in sorted(root.iterdir()):
        if path.name == CERTIFIED_DIR or path.name.startswith(".") or not path.is_dir():
            continue
        try:
            infos.append(_inspect(path))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            continue
    return infos


def resolve_models(names: Sequence[object] | None, root: Path | None = None) -> list[BaseModelInfo]:
    """The selected models' infos in the requested order.

    Refuses an empty selection ("No base models selected"), duplicates, bad names and names
    not found in `root` (the error lists the available ones).
    """
    found = {info.name: info for info in discover_models(root)}
    selected = validate_base_models(names, available=sorted(found))
    return [found[name] for name in selected]


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence transformers' progress bars for a moment: a worker reports progress as events,
    and tqdm bars on stderr only clutter its log. The previous setting is restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers logs a table of missing or mismatched weights as a warning; the loader
    turns those into one clear error of its own, so the table is only noise on stderr."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)  # type: ignore[no-untyped-call]


def _unloadable(info: BaseModelInfo, error: BaseException) -> InvalidInput:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InvalidInput(
        f"Base model '{info.name}' at {info.path} could not be loaded: {reason}",
        field="baseModels",
    )


def load_tokenizer(info: BaseModelInfo) -> PreTrainedTokenizerBase:
    """The model's tokenizer, right-padded, with a pad token (its eos when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise _unloadable(info, error) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidInput(
                f"Base model '{info.name}' at {info.path} has a tokenizer with neither a pad "
                "nor an eos token; set one in its tokenizer_config.json.",
                field="baseModels",
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    info: BaseModelInfo,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    four_bit: bool = False,
) -> PreTrainedModel:
    """The model on `device`, from local files only, its weights read straight into `dtype`
    (never materialised in another dtype first) and, on a GPU, straight onto the device; with
    `four_bit`, its linear layers in NF4 (bitsandbytes, CUDA only) computing in `dtype`."""
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"dtype": dtype}
    if device.type == "cuda":
        options["device_map"] = {"": device.index or 0}
    if four_bit:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        with quiet_progress(), _quiet_load_report():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                info.path, local_files_only=True, output_loading_info=True, **options
            )
    except torch.cuda.OutOfMemoryError:
        raise  # not a broken model: the person needs a smaller one or a bigger device
    except Exception as error:  # a broken checkpoint fails in many ways, all the person's to fix
        if "ignore_mismatched_sizes" in str(error):  # its "see the report above" is not shown
            error = ValueError("the shapes of its weights do not fit its config.json")
        raise _unloadable(info, error) from error
    model, loading = loaded
    # transformers re-initialises weights that are missing or do not fit the config and only
    # logs it: training such a model would silently start from random weights
    for kind in ("missing_keys", "mismatched_keys", "error_msgs"):
        problems = sorted(str(p) for p in loading.get(kind) or ())
        if problems:
            shown = ", ".join(problems[:3]) + (
                f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            )
            reason = f"its weights do not match its config.json ({kind.replace('_', ' ')}: {shown})"
            raise _unloadable(info, ValueError(reason))
    if "device_map" in options:
        return model  # type: ignore[no-any-return]
    # transformers' typing of `.to` rejects a torch.device it accepts at run time
    return model.to(device)  # type: ignore[arg-type, no-any-return]
