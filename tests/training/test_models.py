"""Base models: discovery, parameter counts without loading, selection errors, loading."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from services.core.errors import InvalidInput, NotFound
from services.core.layout import CERTIFIED_DIR, models_dir
from services.training.data import Record, format_record, make_batches, tokenize_records
from services.training.demo_assets import DEMO_MODELS
from services.training.models import (
    BaseModelInfo,
    discover_models,
    load_model,
    load_tokenizer,
    parameter_count,
    resolve_models,
    weight_files,
)

CPU = torch.device("cpu")


def link_models(root: Path, demo_models_dir: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in DEMO_MODELS:
        (root / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    return root


def copy_model(demo_models_dir: Path, name: str, target: Path) -> Path:
    shutil.copytree(demo_models_dir / name, target)
    return target


def info_of(root: Path, name: str) -> BaseModelInfo:
    (info,) = [info for info in discover_models(root) if info.name == name]
    return info


def test_discovery_finds_model_folders_and_skips_everything_else(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    root = link_models(tmp_path / "models", demo_models_dir)
    # a finished run's folder, even one that looks like a model
    copy_model(demo_models_dir, "tiny-gpt2", root / CERTIFIED_DIR)
    copy_model(demo_models_dir, "tiny-gpt2", root / ".half-made.tmp")
    (root / "README.md").write_text("not a model")
    bad_json = copy_model(demo_models_dir, "tiny-gpt2", root / "bad-json")
    (bad_json / "config.json").write_text("{broken")
    no_type = copy_model(demo_models_dir, "tiny-gpt2", root / "no-model-type")
    (no_type / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    no_weights = copy_model(demo_models_dir, "tiny-gpt2", root / "no-weights")
    (no_weights / "model.safetensors").unlink()
    no_tokenizer = copy_model(demo_models_dir, "tiny-gpt2", root / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    (no_tokenizer / "tokenizer_config.json").unlink()
    bad_header = copy_model(demo_models_dir, "tiny-gpt2", root / "bad-header")
    (bad_header / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    (root / "empty").mkdir()

    infos = discover_models(root)
    assert [info.name for info in infos] == sorted(DEMO_MODELS)
    by_name = {info.name: info for info in infos}
    assert by_name["tiny-llama"].architecture == "LlamaForCausalLM"
    assert by_name["tiny-llama"].model_type == "llama"
    assert by_name["tiny-gpt2"].architecture == "GPT2LMHeadModel"
    assert by_name["tiny-llama"].path == root / "tiny-llama"  # the link, not its target
    assert by_name["tiny-qwen2"].to_dict() == {
        "name": "tiny-qwen2",
        "architecture": "Qwen2ForCausalLM",
        "model_type": "qwen2",
        "parameter_count": by_name["tiny-qwen2"].parameter_count,
    }


def test_discovery_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert discover_models(tmp_path / "nowhere") == []


def test_models_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELS_DIR", raising=False)
    assert models_dir() == Path("models")
    monkeypatch.setenv("MODELS_DIR", "/srv/models")
    assert models_dir() == Path("/srv/models")


def test_parameter_count_from_headers_equals_the_loaded_models(demo_models_dir: Path) -> None:
    infos = discover_models(demo_models_dir)
    assert len(infos) >= 3
    for info in infos:
        model = load_model(info, CPU)
        assert info.parameter_count == sum(p.numel() for p in model.parameters()), info.name
        assert info.parameter_count > 10_000


def test_parameter_count_of_a_pytorch_bin_checkpoint(tmp_path: Path) -> None:
    torch.save({"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(7)}, tmp_path / "x.bin")
    shutil.move(tmp_path / "x.bin", tmp_path / "pytorch_model.bin")
    assert parameter_count(tmp_path) == 19


def test_weight_files_prefer_safetensors_and_are_sorted(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in weight_files(tmp_path)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_resolve_keeps_the_requested_order(demo_models_dir: Path) -> None:
    infos = resolve_models(["tiny-qwen2", "tiny-gpt2"], demo_models_dir)
    assert [info.name for info in infos] == ["tiny-qwen2", "tiny-gpt2"]


def test_an_unknown_model_lists_the_available_ones(demo_models_dir: Path) -> None:
    with pytest.raises(NotFound) as caught:
        resolve_models(["tiny-llama", "gpt-17"], demo_models_dir)
    assert "gpt-17" in str(caught.value)
    for name in DEMO_MODELS:
        assert name in str(caught.value)
    assert caught.value.field == "baseModels"


@pytest.mark.parametrize("names", [None, []])
def test_no_models_selected(names: list[object] | None, demo_models_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="No base models selected") as caught:
        resolve_models(names, demo_models_dir)
    assert caught.value.field == "baseModels"


def test_a_model_selected_twice_is_refused(demo_models_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="twice"):
        resolve_models(["tiny-gpt2", "tiny-gpt2"], demo_models_dir)


def test_every_demo_model_runs_a_forward_pass_with_a_finite_loss(demo_models_dir: Path) -> None:
    prompt, completion = format_record({"instruction": "What is 2 + 3?", "output": "5"})
    records = [Record(1, prompt, completion), Record(2, "", "The cat sees the moon.")]
    for info in discover_models(demo_models_dir):
        tokenizer = load_tokenizer(info)
        assert tokenizer.pad_token_id is not None
        assert tokenizer.padding_side == "right"
        model = load_model(info, CPU)
        assert next(model.parameters()).dtype == torch.float32
        examples = tokenize_records(records, tokenizer, 128)
        (batch,) = make_batches(examples, 2, tokenizer.pad_token_id, shuffle_seed=None)
        with torch.no_grad():
            output = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
        loss = output.loss.item()
        assert math.isfinite(loss), info.name
        # random init: close to the loss of a uniform guess over the vocabulary
        assert abs(loss - math.log(len(tokenizer))) < 2.0, info.name


def test_a_missing_pad_token_falls_back_to_eos(tmp_path: Path, demo_models_dir: Path) -> None:
    folder = copy_model(demo_models_dir, "tiny-llama", tmp_path / "no-pad")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["pad_token"]
    config_path.write_text(json.dumps(config))
    tokenizer = load_tokenizer(info_of(tmp_path, "no-pad"))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_a_broken_config_is_invalid_input(tmp_path: Path, demo_models_dir: Path) -> None:
    folder = copy_model(demo_models_dir, "tiny-llama", tmp_path / "odd-config")
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    info = info_of(tmp_path, "odd-config")
    with pytest.raises(InvalidInput) as caught:
        load_model(info, CPU)
    assert str(caught.value).startswith(
        f"Base model 'odd-config' at {folder} could not be loaded: "
    )
    assert caught.value.field == "baseModels"


def test_truncated_weights_are_invalid_input(tmp_path: Path, demo_models_dir: Path) -> None:
    folder = copy_model(demo_models_dir, "tiny-gpt2", tmp_path / "torn")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # the header survives, the data does not
    info = info_of(tmp_path, "torn")  # still discovered: only the header is read
    with pytest.raises(InvalidInput, match=r"'torn' .* could not be loaded"):
        load_model(info, CPU)
