"""Demo assets: several tiny architectures, seeded byte for byte, created once, atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from services.training import demo_assets
from services.training.data import format_record
from services.training.demo_assets import DEMO_MODELS, create_demo_assets
from services.training.models import discover_models, load_tokenizer
from services.training.sample_dataset import generate_sample_records, sample_dataset_bytes


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_the_demo_models_cover_several_architectures(demo_models_dir: Path) -> None:
    infos = discover_models(demo_models_dir)
    assert [info.name for info in infos] == sorted(DEMO_MODELS)
    assert len(infos) >= 3
    assert len({info.architecture for info in infos}) >= 2
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"} <= {
        info.architecture for info in infos
    }
    assert not [p for p in demo_models_dir.iterdir() if p.name.startswith(".")]  # no leftovers


def test_each_model_is_tiny_and_matches_its_tokenizer(demo_models_dir: Path) -> None:
    for info in discover_models(demo_models_dir):
        config = json.loads((info.path / "config.json").read_text())
        tokenizer = load_tokenizer(info)
        assert config["vocab_size"] == len(tokenizer), info.name
        assert 500 <= len(tokenizer) <= 1500
        assert config.get("hidden_size", config.get("n_embd")) == 64
        assert config.get("num_hidden_layers", config.get("n_layer")) == 2
        assert config["bos_token_id"] == tokenizer.bos_token_id is not None
        assert config["eos_token_id"] == tokenizer.eos_token_id is not None
        assert config["pad_token_id"] == tokenizer.pad_token_id is not None
        assert tokenizer.unk_token is not None
        assert info.parameter_count < 1_000_000
        # trained on the sample: its text round-trips and takes few tokens
        prompt, completion = format_record(generate_sample_records()[0])
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids).strip() == (prompt + completion).strip()
        assert len(ids) < len(prompt + completion) / 2, info.name


def test_a_second_call_creates_nothing(demo_models_dir: Path) -> None:
    before = file_hashes(demo_models_dir)
    datasets = demo_models_dir.parent / "datasets"
    assert create_demo_assets(demo_models_dir, datasets, log=lambda _: None) == []
    assert file_hashes(demo_models_dir) == before


def test_the_same_seed_gives_identical_files(tmp_path: Path, demo_models_dir: Path) -> None:
    messages: list[str] = []
    with torch.random.fork_rng(devices=[]):
        # a caller's RNG in some other state must neither matter nor be changed
        torch.manual_seed(987_654)
        state = torch.random.get_rng_state()
        created = create_demo_assets(
            tmp_path / "models", tmp_path / "datasets", log=messages.append
        )
        assert torch.equal(torch.random.get_rng_state(), state)
    assert created == [
        tmp_path / "datasets" / "sample.jsonl",
        *(tmp_path / "models" / name for name in DEMO_MODELS),
    ]
    assert len(messages) == len(created)
    fresh = file_hashes(tmp_path / "models")
    assert fresh == file_hashes(demo_models_dir)
    assert any(name.endswith(".safetensors") for name in fresh)
    # different models get different weights (each has its own seed)
    weights = {fresh[f"{name}/model.safetensors"] for name in DEMO_MODELS}
    assert len(weights) == len(DEMO_MODELS)
    assert (tmp_path / "datasets" / "sample.jsonl").read_bytes() == sample_dataset_bytes()


def test_an_existing_dataset_is_left_alone(tmp_path: Path, demo_models_dir: Path) -> None:
    mine = tmp_path / "datasets" / "sample.jsonl"
    mine.parent.mkdir()
    mine.write_text('{"text": "my own"}\n')
    models = tmp_path / "models"
    models.mkdir()
    for name in DEMO_MODELS:
        (models / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    assert create_demo_assets(models, mine.parent, log=lambda _: None) == []
    assert mine.read_text() == '{"text": "my own"}\n'


def test_force_rebuilds_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_assets, "DEMO_SPECS", demo_assets.DEMO_SPECS[:1])
    name = demo_assets.DEMO_SPECS[0].name
    models = tmp_path / "models"
    create_demo_assets(models, tmp_path / "datasets", log=lambda _: None)
    (models / name / "stray.txt").write_text("left by hand")
    created = create_demo_assets(models, tmp_path / "datasets", force=True, log=lambda _: None)
    assert created == [models / name]
    assert not (models / name / "stray.txt").exists()
    assert (models / name / "model.safetensors").is_file()
    assert sorted(p.name for p in models.iterdir()) == [name]


def test_a_failed_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_build(spec: demo_assets.DemoModel, folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_assets, "build_demo_model", half_build)
    models = tmp_path / "models"
    with pytest.raises(RuntimeError, match="disk full"):
        create_demo_assets(models, tmp_path / "datasets", log=lambda _: None)
    assert list(models.iterdir()) == []
