"""Demo assets: tiny seeded base models of several architectures, and the sample dataset.

The machines that build and test this project cannot download weights; these folders load
through the same `AutoModelForCausalLM` / `AutoTokenizer` code as real checkpoints.
"""

from __future__ import annotations

import os
import shutil
import string
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.core.atomic import replace_dir_atomic
from services.core.layout import datasets_dir, models_dir
from services.training.data import format_record
from services.training.models import quiet_progress
from services.training.sample_dataset import (
    SAMPLE_DATASET_ID,
    generate_sample_records,
    write_sample_dataset,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

MAX_POSITIONS = 512
# Qwen2's published pre-tokenizer pattern (letters, single digits, punctuation, whitespace)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class DemoModel:
    """How one demo model is built: its architecture and its own tokenizer."""

    name: str
    architecture: str
    byte_level: bool
    """ByteLevel BPE (GPT-2 / Qwen style) or Metaspace BPE (SentencePiece / Llama style)."""
    vocab_size: int
    bos: str
    eos: str
    pad: str
    unk: str
    size: str = "tiny"
    """tiny (0.1–0.3M parameters: tests and demos) or mid (~30M: the benchmarks, where a
    training step is real work)."""

    @property
    def seed(self) -> int:
        # from the name, not the position: adding a model never changes the others' weights
        return zlib.crc32(self.name.encode())


DEMO_SPECS: tuple[DemoModel, ...] = (
    DemoModel("tiny-llama", "LlamaForCausalLM", False, 800, "<s>", "</s>", "<pad>", "<unk>"),
    DemoModel(
        "tiny-qwen2",
        "Qwen2ForCausalLM",
        True,
        1200,
        "<|im_start|>",
        "<|endoftext|>",
        "<|pad|>",
        "<|unk|>",
    ),
    DemoModel(
        "tiny-gpt2",
        "GPT2LMHeadModel",
        True,
        600,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
        "<|endoftext|>",
    ),
    DemoModel("tiny-mistral", "MistralForCausalLM", False, 1000, "<s>", "</s>", "<pad>", "<unk>"),
    DemoModel(
        "mid-llama", "LlamaForCausalLM", False, 4000, "<s>", "</s>", "<pad>", "<unk>", size="mid"
    ),
)
SIZES = ("tiny", "mid", "all")
DEMO_MODELS: tuple[str, ...] = tuple(spec.name for spec in DEMO_SPECS if spec.size == "tiny")
"""The models `oneseek demo-assets` makes by default."""


def _training_text() -> Iterator[str]:
    # the generator, not the file on disk: a person's edits to sample.jsonl must not change
    # the demo models
    for record in generate_sample_records():
        prompt, completion = format_record(record)
        yield prompt + completion


def _special_tokens(spec: DemoModel) -> list[str]:
    return list(dict.fromkeys((spec.unk, spec.bos, spec.eos, spec.pad)))


def train_tokenizer(spec: DemoModel) -> Tokenizer:
    """A BPE tokenizer trained on the sample dataset's formatted text."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if spec.byte_level:
        tokenizer = Tokenizer(models.BPE())
        if spec.architecture == "Qwen2ForCausalLM":
            # AutoTokenizer loads a qwen2 folder as Qwen2Tokenizer, which imposes these steps;
            # training with them too keeps the merges useful (digits are always single tokens)
            tokenizer.normalizer = normalizers.NFC()
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=spec.unk))
        # Metaspace only splits on spaces; newlines get their own pieces so the template's
        # "### Response:" is the same token wherever it appears
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
                pre_tokenizers.Metaspace(prepend_scheme="first"),
            ]
        )
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
        # every printable ASCII character, so text beyond the sample's rarely hits <unk>
        alphabet = [*string.printable.strip(), "\n", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=_special_tokens(spec),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    return tokenizer


def _wrap(spec: DemoModel, tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
    )


def _config(spec: DemoModel, vocab_size: int, ids: dict[str, int]) -> PretrainedConfig:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    decoder: dict[str, Any] = {
        **common,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_POSITIONS,
        "attention_dropout": 0.0,
    }
    if spec.size == "mid":  # 8 layers 512 wide: about 30M parameters
        mid = {**decoder, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8}
        return LlamaConfig(**mid, intermediate_size=1536, num_key_value_heads=8)
    if spec.architecture == "LlamaForCausalLM":
        return LlamaConfig(**decoder, intermediate_size=192, num_key_value_heads=4)
    if spec.architecture == "Qwen2ForCausalLM":
        # tied embeddings and grouped-query attention: the variants real Qwen2 models use
        return Qwen2Config(
            **decoder, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True
        )
    if spec.architecture == "MistralForCausalLM":
        return MistralConfig(
            **decoder, intermediate_size=256, num_key_value_heads=2, sliding_window=256
        )
    if spec.architecture == "GPT2LMHeadModel":
        return GPT2Config(
            **common,
            n_positions=MAX_POSITIONS,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    raise ValueError(f"No demo config for {spec.architecture}")


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise ValueError(f"{token!r} is not one token")
    return token_id


def build_demo_model(spec: DemoModel, folder: Path) -> None:
    """Write `spec`'s tokenizer and randomly initialised model into the empty `folder`."""
    from transformers import AutoModelForCausalLM

    tokenizer = _wrap(spec, train_tokenizer(spec))
    ids = {
        role: _token_id(tokenizer, token)
        for role, token in (("bos", spec.bos), ("eos", spec.eos), ("pad", spec.pad))
    }
    config = _config(spec, len(tokenizer), ids)
    # fork_rng: seeding here must not change the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    if type(model).__name__ != spec.architecture:
        raise ValueError(f"{spec.name}: built {type(model).__name__}, not {spec.architecture}")
    with quiet_progress():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # transformers writes the weights 0600; give every file the mode the umask gives config.json
    mode = (folder / "config.json").stat().st_mode & 0o777
    for file in folder.iterdir():
        file.chmod(mode)


def create_demo_assets(
    models_root: Path | None = None,
    datasets_root: Path | None = None,
    *,
    force: bool = False,
    size: str = "tiny",
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Create each missing demo model folder (all of them with `force`) and the sample dataset
    when it is missing; return what was written.

    A model is built in a hidden temporary folder next to its target and renamed into place
    when complete, so a half-made model folder never appears under its name.
    """
    models_root, datasets_root = models_dir(models_root), datasets_dir(datasets_root)
    created: list[Path] = []

    dataset = datasets_root / f"{SAMPLE_DATASET_ID}.jsonl"
    if not dataset.exists():
        write_sample_dataset(dataset)
        log(f"wrote the sample dataset to {dataset}")
        created.append(dataset)

    models_root.mkdir(parents=True, exist_ok=True)
    for spec in DEMO_SPECS:
        if size != "all" and spec.size != size:
            continue
        target = models_root / spec.name
        if (target.exists() or target.is_symlink()) and not force:
            continue
        # hidden, so discover_models never offers it; mkdir (unlike mkdtemp) honours the umask
        staged = models_root / f".{spec.name}.{os.getpid()}.tmp"
        shutil.rmtree(staged, ignore_errors=True)  # left by a crashed process with our pid
        staged.mkdir()
        try:
            build_demo_model(spec, staged)
            if target.is_symlink() and not target.exists():
                target.unlink()  # a dangling link cannot be renamed aside like a folder
            replace_dir_atomic(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log(f"created demo model {spec.name} ({spec.architecture}) in {target}")
        created.append(target)
    return created
