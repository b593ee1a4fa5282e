"""Lower precision on the CPU, end to end: bf16 LoRA and bf16 full fine-tuning train, certify,
and pass `oneseek verify`; the memory options reach the run's records; losses stay fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.api.run_config import build_config
from services.cli import main
from services.training.data import load_dataset, split_dataset
from services.training.member import PopulationMember, cpu_placement, fp32_loss
from services.training.models import resolve_models
from tests.conftest import REPO, IsolatedEnv


def certified(models_dir: Path) -> list[Path]:
    return sorted((models_dir / "oneseek-certified").iterdir())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_on_the_cpu_trains_certifies_and_verifies(
    isolated_env: IsolatedEnv, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    args = ["train", "--models", "tiny-llama,tiny-qwen2", "--dataset", "sample", "--quiet"]
    args += ["--epochs", "2", "--precision", "bf16", "--method", method]
    args += ["--gradient-checkpointing"]
    assert main(args) == 0
    (run_dir,) = certified(isolated_env.models_dir)
    results = json.loads((run_dir / "training_results.json").read_text())
    assert results["config"]["precision"] == "bf16"
    assert results["config"]["gradient_checkpointing"] is True
    assert [(p["model"], p["device"], p["precision"]) for p in results["placement"]] == [
        ("tiny-llama", "cpu", "bf16"),
        ("tiny-qwen2", "cpu", "bf16"),
    ]
    assert all(p["estimated_bytes"] > 0 for p in results["placement"])
    dna = json.loads((run_dir / "oneseek_dna.json").read_text())
    assert dna["training_config"]["precision"] == "bf16"
    losses = results["final_val_losses"]
    assert all(isinstance(v, float) and 0 < v < 20 for v in losses.values())
    capsys.readouterr()
    assert main(["verify", str(run_dir)]) == 0
    assert "verified" in capsys.readouterr().out


def test_bf16_lora_on_the_mid_model_learns(mid_model_dir: Path) -> None:
    """The ~30M-parameter Llama: its frozen base in bf16, its adapters and their optimizer
    state in fp32, and a validation loss that falls."""
    config = build_config(
        {
            "dataset_id": "sample",
            "base_models": ["mid-llama"],
            "precision": "bf16",
            "max_seq_length": 48,
            "learning_rate": 2e-3,
        }
    )
    (info,) = resolve_models(["mid-llama"], mid_model_dir)
    records = load_dataset("sample", REPO / "datasets").records
    train, validation = split_dataset(records[:96], 0.25, 0)
    member = PopulationMember(config, info, train, validation, cpu_placement("bf16"))
    frozen = {p.dtype for p in member.model.parameters() if not p.requires_grad}
    trainable = [p for p in member.model.parameters() if p.requires_grad]
    assert frozen == {torch.bfloat16}
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    before = member.validate()
    member.train_epoch(1, lambda: False, lambda step: None)
    member.train_epoch(2, lambda: False, lambda step: None)
    state = member.optimizer.state[trainable[0]]
    assert state["exp_avg"].dtype == torch.float32
    assert member.validate() < before


def test_the_loss_is_computed_from_fp32_logits() -> None:
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, 4, 5, -100, -100]])
    expected = torch.nn.functional.cross_entropy(
        logits.float()[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    loss = fp32_loss(logits, labels)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected)


def test_a_member_placed_with_auto_resolves_it_where_it_runs(demo_models_dir: Path) -> None:
    """A cluster's GPU is known only to the actor on it; on a CPU, auto is fp32."""
    from services.api import training_pb2

    config = build_config({"dataset_id": "sample", "base_models": ["tiny-llama"]})
    (info,) = resolve_models(["tiny-llama"], demo_models_dir)
    records = load_dataset("sample", REPO / "datasets").records
    placement = training_pb2.Placement(device="cpu", precision=training_pb2.PRECISION_AUTO)
    member = PopulationMember(config, info, records[:8], records[8:10], placement)
    assert member.numerics.precision == "fp32"
