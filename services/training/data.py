"""Datasets: find and validate `$DATASETS_DIR/<id>.jsonl`, split it, tokenize it, batch it.

A record is an instruction (`instruction`/`question`/`prompt`, optional `input`, and
`output`/`response`/`completion`) or a plain `text`; a bad line is reported with its number.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.core.errors import InvalidInput, NotFound
from services.core.layout import datasets_dir
from services.core.training_config import validate_dataset_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATASET_SUFFIX = ".jsonl"
IGNORE_INDEX = -100
"""Label of a token the loss skips (prompt and padding); the value HF models expect."""

PROMPT_KEYS = ("instruction", "question", "prompt")
COMPLETION_KEYS = ("output", "response", "completion")
RECORD_SHAPES = (
    "a record needs instruction/question/prompt [+ input] with output/response/completion, or text"
)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Record:
    line: int
    """1-based line number in the file."""
    prompt: str
    """The formatted prompt; "" for a plain text record, whose every token is trained."""
    completion: str
    """The part the loss is computed on."""


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    path: Path
    records: int


@dataclass(frozen=True)
class Dataset:
    id: str
    path: Path
    sha256: str
    """Of the file's bytes, as the DNA fingerprint records it."""
    records: tuple[Record, ...]

    def summary(self, train: int, validation: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "sha256": self.sha256,
            "records": len(self.records),
            "train_records": train,
            "validation_records": validation,
        }


class _BadRecord(Exception):
    """What is wrong with one line; `load_dataset` adds the path and line number."""


def _dataset_path(dataset_id: str, root: Path) -> Path:
    return root / f"{dataset_id}{DATASET_SUFFIX}"


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks followed, lies inside `root` (symlinks followed too)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return False


def _dataset_ids(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    ids = []
    for path in root.glob(f"*{DATASET_SUFFIX}"):
        dataset_id = path.name[: -len(DATASET_SUFFIX)]
        try:
            validate_dataset_id(dataset_id)
        except InvalidInput:
            continue  # a name `load_dataset` would refuse is not offered either
        if path.is_file() and _inside(path, root):
            ids.append(dataset_id)
    return sorted(ids)


def list_datasets(root: Path | None = None) -> list[DatasetInfo]:
    """Every loadable `<id>.jsonl` in `root`, sorted by id.

    `records` counts non-blank lines without parsing them: a broken file is still listed
    (so a person can pick it and read what is wrong); it is validated when loaded.
    """
    root = datasets_dir(root)
    infos = []
    for dataset_id in _dataset_ids(root):
        path = _dataset_path(dataset_id, root)
        try:
            data = path.read_bytes()
        except OSError:
            continue
        records = sum(1 for line in data.split(b"\n") if line.strip())
        infos.append(DatasetInfo(id=dataset_id, path=path, records=records))
    return infos


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _BadRecord(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise _BadRecord(f'"{key}" is empty')
    return value


def _only_key(obj: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    present = [key for key in keys if key in obj]
    if len(present) > 1:
        raise _BadRecord(f"has both {' and '.join(present)}; use exactly one of them")
    return present[0] if present else None


def _parse_record(obj: Any) -> tuple[str, str]:
    if not isinstance(obj, Mapping):
        raise _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    prompt_key = _only_key(obj, PROMPT_KEYS)
    completion_key = _only_key(obj, COMPLETION_KEYS)
    if "text" in obj:
        mixed = [key for key in (prompt_key, completion_key) if key] + (
            ["input"] if "input" in obj else []
        )
        if mixed:
            raise _BadRecord(f'has both "text" and {", ".join(mixed)}; use one form or the other')
        return "", _text(obj, "text")
    if prompt_key is None and completion_key is None:
        raise _BadRecord("has none of the record fields")
    if prompt_key is None:
        raise _BadRecord(f'has "{completion_key}" but no instruction/question/prompt')
    if completion_key is None:
        raise _BadRecord(f'has "{prompt_key}" but no output/response/completion')
    instruction = _text(obj, prompt_key)
    completion = _text(obj, completion_key)
    extra = obj.get("input", "")
    if not isinstance(extra, str):
        raise _BadRecord(
            f'"input" must be a string, got {type(extra).__name__} (leave it out for no input)'
        )
    if extra.strip():
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=extra), completion
    return PROMPT_TEMPLATE.format(instruction=instruction), completion


def format_record(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(prompt, completion) of one record in the Alpaca template; ("", text) for a text record.

    The Input block is left out when `input` is absent or blank.
    """
    try:
        return _parse_record(obj)
    except _BadRecord as error:
        raise InvalidInput(f"Record {error} ({RECORD_SHAPES}).", field="datasetId") from None


def _parse_line(raw: bytes) -> tuple[str, str] | None:
    """A line's (prompt, completion), or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _BadRecord(f"is not valid UTF-8 (byte {error.start + 1})") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise _BadRecord(f"is not valid JSON ({error.msg} at column {error.colno})") from None
    return _parse_record(obj)


def load_dataset(dataset_id: str, root: Path | None = None) -> Dataset:
    """Read and validate `<root>/<dataset_id>.jsonl`; every bad line is counted in the error."""
    root = datasets_dir(root)
    dataset_id = validate_dataset_id(dataset_id)
    path = _dataset_path(dataset_id, root)
    if not path.is_file():
        available = ", ".join(_dataset_ids(root)) or "none"
        raise NotFound(
            f"Dataset '{dataset_id}' not found in {root}; available: {available}",
            field="datasetId",
        )
    if not _inside(path, root):
        raise InvalidInput(
            f"Dataset '{dataset_id}' at {path} points to {path.resolve()}, outside {root}; "
            "a dataset file must live inside DATASETS_DIR.",
            field="datasetId",
        )
    try:
        content = path.read_bytes()
    except OSError as error:
        raise InvalidInput(
            f"Dataset '{dataset_id}' at {path} could not be read: {error.strerror}.",
            field="datasetId",
        ) from None
    # a BOM some editors add is not part of line 1's JSON (but is part of the file's hash)
    data = content.removeprefix(b"\xef\xbb\xbf")

    records: list[Record] = []
    bad: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            parsed = _parse_line(raw.removesuffix(b"\r"))
        except _BadRecord as error:
            bad.append(f"{path} line {number}: {error}")
            continue
        if parsed is not None:
            records.append(Record(line=number, prompt=parsed[0], completion=parsed[1]))
    if bad:
        more = f" (and {len(bad) - 1} more bad line{'s' if len(bad) > 2 else ''})"
        raise InvalidInput(
            f"{bad[0]} ({RECORD_SHAPES}){more if len(bad) > 1 else ''}.", field="datasetId"
        )
    if not records:
        raise InvalidInput(f"{path} has no records ({RECORD_SHAPES}).", field="datasetId")
    if len(records) < 2:
        raise InvalidInput(
            f"{path} has 1 record; at least 2 are needed (one to train on, one to validate).",
            field="datasetId",
        )
    return Dataset(
        id=dataset_id,
        path=path,
        sha256=hashlib.sha256(content).hexdigest(),
        records=tuple(records),
    )


def validation_count(total: int, validation_split: float) -> int:
    """Records held out: `round(total * split)`, at least 1, and at least 1 left to train on."""
    return min(max(1, round(total * validation_split)), total - 1)


def split_dataset(
    records: Sequence[Record], validation_split: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded choice of validation records; both keep file order."""
    if isinstance(validation_split, bool) or not (
        isinstance(validation_split, (int, float))
        and math.isfinite(validation_split)
        and 0 < validation_split < 1
    ):
        raise InvalidInput(
            f"validationSplit must be a number strictly between 0 and 1, got {validation_split!r}.",
            field="validationSplit",
        )
    if len(records) < 2:
        raise InvalidInput(
            f"A dataset needs at least 2 records to split (one to train on, one to validate), "
            f"got {len(records)}.",
            field="datasetId",
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: validation_count(len(records), validation_split)])
    train = [record for index, record in enumerate(records) if index not in held_out]
    validation = [record for index, record in enumerate(records) if index in held_out]
    return train, validation


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """`IGNORE_INDEX` on the prompt (and bos) tokens, the token id on trained tokens."""


def _fit(head: list[int], prompt: list[int], target: list[int], limit: int) -> TokenizedExample:
    """Truncate head + prompt + target to `limit` tokens, keeping at least one target token."""
    if len(head) + len(prompt) + len(target) > limit and target:
        if len(head) + len(prompt) < limit:
            target = target[: limit - len(head) - len(prompt)]  # keep the start
        else:
            # the prompt alone fills the window: keeping the start would train on nothing, so
            # keep the prompt's end (nearest the answer) and give the answer up to half the window
            room = limit - len(head)
            target = target[: max(1, min(len(target), room // 2))]
            keep = room - len(target)
            prompt = prompt[len(prompt) - keep :] if keep > 0 else []
    ids = (head + prompt + target)[:limit]
    masked = len(head) + len(prompt)
    labels = [IGNORE_INDEX] * min(masked, len(ids)) + ids[masked:]
    return TokenizedExample(input_ids=tuple(ids), labels=tuple(labels))


def tokenize_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> list[TokenizedExample]:
    """[bos] + prompt + completion + [eos], cut to `max_seq_length`; the loss sees completion + eos.

    Records that do not fit keep their start, or the end of the prompt when the prompt alone
    would fill the window.
    """
    if max_seq_length < 2:
        raise InvalidInput(
            f"maxSeqLength must be at least 2 (a prompt token and a trained token), "
            f"got {max_seq_length}.",
            field="maxSeqLength",
        )
    if not records:
        return []
    # one batched call per side: the fast tokenizer parallelises it, a Python loop does not
    prompts = tokenizer(
        [record.prompt for record in records], add_special_tokens=False, verbose=False
    )["input_ids"]
    completions = tokenizer(
        [record.completion for record in records], add_special_tokens=False, verbose=False
    )["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [] if bos is None else [int(bos)]
    tail = [] if eos is None else [int(eos)]
    return [
        _fit(head, list(prompt), list(completion) + tail, max_seq_length)
        for prompt, completion in zip(prompts, completions, strict=True)
    ]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    tokens: int
    """Non-pad tokens in the batch: `attention_mask.sum()`."""
    target_tokens: int
    """Tokens the loss counts: `(labels[:, 1:] != -100).sum()` (the model shifts labels by one)."""


def _collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.int64)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.int64)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        tokens=int(attention_mask.sum()),
        target_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
    )


def make_batches(
    examples: Sequence[TokenizedExample],
    batch_size: int,
    pad_token_id: int,
    *,
    shuffle_seed: int | None,
) -> list[Batch]:
    """Batches of `batch_size` (the last may be smaller), right-padded to their longest example.

    `shuffle_seed` None keeps file order (validation); a seed gives a fixed permutation.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput(
            f"batchSize must be a whole number of at least 1, got {batch_size!r}.",
            field="batchSize",
        )
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [
        _collate([examples[index] for index in order[start : start + batch_size]], pad_token_id)
        for start in range(0, len(order), batch_size)
    ]
