"""Exporting and trying runs trained on a GPU: a bf16 LoRA run merged on the CPU in float32, a
4-bit (QLoRA) run merged into its dequantized base, and `oneseek generate` on the run's GPU.
They skip without CUDA (the 4-bit one also without bitsandbytes); on a GPU machine run
`HF_HUB_OFFLINE=1 pytest tests/gpu -v -s`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.cli import main
from services.core.verify import verify_export_folder
from services.training.export import export_model
from services.training.trained import load_trained, locate
from tests.training.test_export import PROMPT, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("gpu-export")
    models = root / "models"
    models.mkdir()
    (models / "tiny-llama").symlink_to(demo_models_dir / "tiny-llama", target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(root / "var"))
        patch.delenv("LEDGER_URL", raising=False)
        patch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
        yield models


def logits(model: Any, tokenizer: Any, device: torch.device) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(device)
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float().cpu()


def test_a_gpu_run_merges_on_the_cpu_in_float32(models: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train(models, "run-20260401-000001", ["tiny-llama"], "lora")
    results = json.loads((run / "training_results.json").read_text())
    assert results["placement"][0]["device"].startswith("cuda")
    out = tmp_path / "merged"
    export_model(run, "tiny-llama", out, merge=True)
    assert verify_export_folder(out).ok
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert merged.dtype == torch.float32
    cpu = torch.device("cpu")
    reference = load_trained(locate(run, "tiny-llama"), merge=False, device=cpu, precision="fp32")
    assert torch.allclose(
        logits(merged, tokenizer, cpu), logits(reference.model, tokenizer, cpu), atol=1e-4, rtol=0
    )

    # generate on the GPU the run trained on, through the command line
    assert main(["generate", str(run), "--max-new-tokens", "8", "The"]) == 0


def test_a_4bit_run_merges_into_its_dequantized_base(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train(models, "run-20260401-000002", ["tiny-llama"], "lora", quantization="4bit")
    out = tmp_path / "merged"
    export_model(run, "tiny-llama", out, merge=True)
    assert verify_export_folder(out).ok
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert merged.dtype == torch.float32
    # what it was trained as: the NF4 base with the adapter, computing in bf16 on the GPU
    trained = load_trained(locate(run, "tiny-llama"), merge=True)
    assert not trained.merged  # a 4-bit base cannot take the merge in place
    expected = logits(trained.model, tokenizer, trained.device)
    actual = logits(merged, tokenizer, torch.device("cpu"))
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    print(f"4-bit merge: largest logit difference {error:.4g} of {scale:.4g}")
    assert error < 0.02 * scale  # bf16 compute on one side, float32 on the other

    adapter = tmp_path / "adapter"
    export_model(run, "tiny-llama", adapter, merge=False)
    assert verify_export_folder(adapter).ok
    card = (adapter / "README.md").read_text()
    assert "qlora" in card and "BitsAndBytesConfig" in card
