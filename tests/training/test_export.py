"""`oneseek export` for real: tiny models trained for an epoch, exported merged, as an adapter
and as full weights, loaded back with transformers and peft as a user would, verified, tampered
with, and streamed as a tar archive."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from services.api.run_config import config_from_body
from services.core.errors import Conflict, InvalidInput, NotFound
from services.core.ledger import verify_proof_signature
from services.core.verify import verify_export_folder
from services.training import export as export_module
from services.training.data import load_dataset
from services.training.events import EventLog
from services.training.export import archive_chunks, export_model
from services.training.models import resolve_models
from services.training.population import TrainingRun
from services.training.run_folder import RunFolder
from services.training.trained import load_trained, locate

REPO = Path(__file__).resolve().parents[2]
LORA_RUN, FULL_RUN = "run-20260301-000001", "run-20260301-000002"
PROMPT = "### Instruction:\nAdd the two numbers.\n\n### Input:\n12 and 30\n\n### Response:\n"


@dataclass(frozen=True)
class Runs:
    models: Path
    lora: Path
    """tiny-llama and tiny-gpt2, LoRA, one epoch."""
    full: Path
    """tiny-gpt2, full fine-tune, one epoch."""
    exports: Path


def train(models: Path, run_id: str, names: list[str], method: str, **options: Any) -> Path:
    """One epoch of `names` on the sample data, certified in `models`; returns the run folder."""
    config = config_from_body(
        {
            "datasetId": "sample",
            "baseModels": names,
            "epochs": 1,
            "method": method,
            "learningRate": 2e-3,
            "batchSize": 8,
            "maxSeqLength": 64,
            **options,
        }
    )
    folder = RunFolder.create(models, run_id)
    run = TrainingRun(
        config,
        run_id=run_id,
        models=resolve_models(names, models),
        dataset=load_dataset("sample", REPO / "datasets"),
        folder=folder,
        events=EventLog(run_id),
        stop=threading.Event(),
    )
    summary = run.run()
    assert summary.error is None, summary.error
    return folder.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("export")
    models = root / "models"
    models.mkdir()
    for name in ("tiny-llama", "tiny-gpt2"):
        (models / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(root / "var"))  # the signing key lives there
        patch.delenv("LEDGER_URL", raising=False)
        patch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
        lora = train(models, LORA_RUN, ["tiny-llama", "tiny-gpt2"], "lora")
        full = train(models, FULL_RUN, ["tiny-gpt2"], "full")
        exports = root / "exports"
        for model in ("tiny-llama", "tiny-gpt2"):
            export_model(lora, model, exports / f"{model}-merged", merge=True)
        export_model(lora, "tiny-llama", exports / "tiny-llama-adapter", merge=False)
        export_model(full, "tiny-gpt2", exports / "tiny-gpt2-full", merge=True)
        yield Runs(models, lora, full, exports)


def greedy(model: Any, tokenizer: Any, tokens: int = 16) -> list[int]:
    """The model's greedy continuation of PROMPT, `tokens` long (the end of text not allowed
    earlier, so every answer is long enough to compare)."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return [int(t) for t in output[0, ids.shape[1] :]]


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    """The model's next-token logits at every position of PROMPT: a far finer comparison than
    the greedy tokens of a tiny random model, which repeat one token."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float()


def unmerged(runs: Runs, run: Path, model: str) -> tuple[list[int], torch.Tensor]:
    """What the run's adapter on its base (not merged) answers, and its logits: the reference."""
    trained = load_trained(locate(run, model, runs.models), merge=False)
    return greedy(trained.model, trained.tokenizer), logits(trained.model, trained.tokenizer)


def pristine(runs: Runs, name: str, tmp_path: Path) -> Path:
    """A copy of one of the module's exports, to change at will."""
    copy = tmp_path / name
    shutil.copytree(runs.exports / name, copy)
    return copy


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---- what an export loads as ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_a_merged_export_answers_as_the_adapter_on_its_base(runs: Runs, model: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs.exports / f"{model}-merged"
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.float32
    assert not any("lora" in name for name in loaded.state_dict())
    base = AutoModelForCausalLM.from_pretrained(runs.models / model, local_files_only=True)
    changed = [
        name
        for name, tensor in loaded.state_dict().items()
        if not torch.equal(tensor, base.state_dict()[name])
    ]
    assert changed, "the merged weights are the base's: the adapter was not merged"
    tokens, reference = unmerged(runs, runs.lora, model)
    assert greedy(loaded, tokenizer) == tokens
    merged = logits(loaded, tokenizer)
    # float rounding apart, the merged weights compute what the adapter on its base computes,
    # and that is not what the base alone computes
    assert torch.allclose(merged, reference, rtol=0, atol=1e-4)
    assert not torch.allclose(logits(base, tokenizer), reference, rtol=0, atol=1e-3)


def test_an_adapter_export_loads_with_peft_on_the_base(
    runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs.exports / "tiny-llama-adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert {"adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    expected, reference = unmerged(runs, runs.lora, "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)

    base = AutoModelForCausalLM.from_pretrained(runs.models / "tiny-llama", local_files_only=True)
    attached = PeftModel.from_pretrained(base, out)
    assert greedy(attached, tokenizer) == expected
    assert torch.equal(logits(attached, tokenizer), reference)  # the same computation exactly

    # as the model card says: from the folder that holds the base, the export loads alone
    monkeypatch.chdir(runs.models)
    alone = AutoPeftModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert greedy(alone, tokenizer) == expected
    assert greedy(AutoModelForCausalLM.from_pretrained(out), tokenizer) == expected


def test_a_full_run_exports_its_weights_byte_for_byte(runs: Runs) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs.exports / "tiny-gpt2-full"
    trained = runs.full / "adapters" / "tiny-gpt2"
    for path in trained.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    reference = load_trained(locate(runs.full, "tiny-gpt2", runs.models))
    assert greedy(loaded, tokenizer) == greedy(reference.model, reference.tokenizer)
    assert torch.equal(logits(loaded, tokenizer), logits(reference.model, reference.tokenizer))
    manifest = json.loads((out / "oneseek_export.json").read_text())
    assert manifest["method"] == "full" and manifest["merged"] is True
    assert set(manifest["certified_files"]) == {p.name for p in trained.iterdir()}


# ---- the model card and the manifest ------------------------------------------------------------


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert isinstance(meta, dict)
    return meta


@pytest.mark.parametrize(
    ("name", "library", "tags"),
    [
        ("tiny-llama-merged", "transformers", {"oneseek", "fine-tuned", "lora", "merged"}),
        ("tiny-llama-adapter", "peft", {"oneseek", "fine-tuned", "lora"}),
        ("tiny-gpt2-full", "transformers", {"oneseek", "fine-tuned", "full-fine-tune"}),
    ],
)
def test_the_model_card_says_what_was_trained_how(
    runs: Runs, name: str, library: str, tags: set[str]
) -> None:
    out = runs.exports / name
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    model = name.rsplit("-", 1)[0]
    assert meta["base_model"] == model and meta["library_name"] == library
    assert meta["pipeline_tag"] == "text-generation" and meta["datasets"] == ["sample"]
    assert tags <= set(meta["tags"])
    dna = json.loads((out / "oneseek_dna.json").read_text())
    results = json.loads((runs.lora if "full" not in name else runs.full).joinpath(
        "training_results.json").read_text())  # fmt: skip
    assert dna["dna"] in card and dna["immutable_hash"] in card
    assert "oneseek verify" in card
    best = results["best_epochs"][model]
    assert f"{results['final_val_losses'][model]:.4f}" in card
    assert f"| best (these weights) | {best['epoch']} | {best['val_loss']:.4f} |" in card
    adjustment = results["weight_adjustments"][0]
    assert f"{results['history'][0]['weights'][model]:.3f}" in card
    assert f"{adjustment['applied_lrs'][model]:.3g}" in card
    for setting in ("| learning rate | 0.002", "| batch size | 8 |", "| seed | 42 |"):
        assert setting in card
    assert ("LoRA (rank 8, alpha 16" in card) == ("full" not in name)


def test_the_manifest_lists_and_signs_every_file(runs: Runs) -> None:
    out = runs.exports / "tiny-llama-merged"
    manifest = json.loads((out / "oneseek_export.json").read_text())
    proof = json.loads((out / "ledger_proof.json").read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != "oneseek_export.json")
    assert sorted(manifest["files"]) == files
    assert {"README.md", "model.safetensors", "config.json", "oneseek_dna.json"} <= set(files)
    assert (out / "oneseek_dna.json").read_bytes() == (runs.lora / "oneseek_dna.json").read_bytes()
    assert (manifest["run_id"], manifest["model"], manifest["merged"]) == (
        LORA_RUN,
        "tiny-llama",
        True,
    )
    assert manifest["dna"] == proof["dna"] and manifest["immutable_hash"] == proof["immutable_hash"]
    assert verify_proof_signature(manifest)
    assert manifest["signer_public_key"] == proof["signer_public_key"]  # the same key
    assert set(manifest["certified_files"]) == {"tokenizer.json", "tokenizer_config.json"}


# ---- verifying an export ------------------------------------------------------------------------


def test_an_untouched_export_verifies(runs: Runs) -> None:
    for name in ("tiny-llama-merged", "tiny-llama-adapter", "tiny-gpt2-full"):
        report = verify_export_folder(runs.exports / name)
        assert report.ok, report.problems
    adapter = verify_export_folder(runs.exports / "tiny-llama-adapter", models_root=runs.models)
    assert adapter.ok and not any("not part of" in note for note in adapter.notes)


def edit_readme(out: Path) -> str:
    card = out / "README.md"
    card.write_text(card.read_text().replace("fine-tuned", "fine-tuned (better!)", 1))
    return "README.md has changed"


def flip_weights(out: Path) -> str:
    flip_a_byte(out / "model.safetensors")
    return "model.safetensors has changed"


def add_a_file(out: Path) -> str:
    (out / "notes.txt").write_text("extra")
    return "notes.txt is an extra file"


def remove_the_tokenizer(out: Path) -> str:
    (out / "tokenizer.json").unlink()
    return "tokenizer.json is missing"


def resign_nothing(out: Path) -> str:
    path = out / "oneseek_export.json"
    manifest = json.loads(path.read_text())
    manifest["model"] = "tiny-gpt2"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return "the signature is not valid"


@pytest.mark.parametrize(
    "tamper", [edit_readme, flip_weights, add_a_file, remove_the_tokenizer, resign_nothing]
)
def test_a_changed_export_does_not_verify_and_says_what_changed(
    runs: Runs, tmp_path: Path, tamper: Any
) -> None:
    out = pristine(runs, "tiny-llama-merged", tmp_path)
    expected = tamper(out)
    report = verify_export_folder(out)
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems


def test_the_export_must_carry_its_own_runs_certificate(runs: Runs, tmp_path: Path) -> None:
    """Another run's DNA in place of the export's: the file hash, and the manifest's run, DNA
    and certified files against it, all fail."""
    out = pristine(runs, "tiny-llama-adapter", tmp_path)
    shutil.copyfile(runs.full / "oneseek_dna.json", out / "oneseek_dna.json")
    problems = " ".join(verify_export_folder(out).problems)
    assert "oneseek_dna.json has changed" in problems
    assert "run_id" in problems and "differs from oneseek_dna.json's" in problems
    assert "ledger_proof.json" in problems  # the proof is for the other DNA


def test_a_trusted_key_must_have_signed_the_export(runs: Runs) -> None:
    out = runs.exports / "tiny-llama-merged"
    signer = json.loads((out / "oneseek_export.json").read_text())["signer_public_key"]
    assert verify_export_folder(out, trusted_public_key=signer).ok
    other = "A" * 43 + "="
    problems = verify_export_folder(out, trusted_public_key=other).problems
    assert any(p.startswith("oneseek_export.json was signed by key") for p in problems)


# ---- what is refused ----------------------------------------------------------------------------


def test_a_tampered_run_is_not_exported(runs: Runs, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("tiny-llama", "tiny-gpt2"):
        (models / name).symlink_to(runs.models / name)
    run = models / "oneseek-certified" / LORA_RUN
    shutil.copytree(runs.lora, run)
    flip_a_byte(run / "adapters" / "tiny-llama" / "adapter_model.safetensors")
    for merge in (True, False):
        out = tmp_path / f"out-{merge}"
        with pytest.raises(Conflict, match=LORA_RUN) as refused:
            export_model(run, "tiny-llama", out, merge=merge)
        assert "adapter_model.safetensors" in refused.value.message
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no staging left


def test_bad_inputs_name_their_field(runs: Runs, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="'nope' is not one of") as unknown:
        export_model(runs.lora, "nope", tmp_path / "a", merge=True)
    assert unknown.value.field == "model"
    with pytest.raises(InvalidInput) as invalid:
        export_model(runs.lora, "../tiny-llama", tmp_path / "a", merge=True)
    assert invalid.value.field == "model"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not empty") as taken:
        export_model(runs.lora, "tiny-llama", full, merge=True)
    assert taken.value.field == "out" and (full / "keep.txt").read_text() == "mine"
    with pytest.raises(InvalidInput, match="inside the run folder") as inside:
        export_model(runs.lora, "tiny-llama", runs.lora / "export", merge=True)
    assert inside.value.field == "out" and not (runs.lora / "export").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInput, match="not a folder") as a_file:
        export_model(runs.lora, "tiny-llama", tmp_path / "file", merge=False)
    assert a_file.value.field == "out"


def test_an_empty_out_folder_is_used(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    export_model(runs.lora, "tiny-gpt2", out, merge=False)
    assert verify_export_folder(out).ok


def test_a_failed_export_leaves_nothing(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: Any, **kwargs: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "model_card", full_disk)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="No space left on device"):
        export_model(runs.lora, "tiny-llama", out, merge=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_merging_a_4bit_run_needs_a_gpu(runs: Runs, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-llama").symlink_to(runs.models / "tiny-llama")
    run = models / "oneseek-certified" / LORA_RUN
    shutil.copytree(runs.lora, run)
    results = json.loads((run / "training_results.json").read_text())
    results["config"]["quantization"] = "4bit"
    (run / "training_results.json").write_text(json.dumps(results))
    with pytest.raises(Conflict, match="CUDA") as refused:
        export_model(run, "tiny-llama", tmp_path / "out", merge=True)
    assert "4-bit" in refused.value.message and not (tmp_path / "out").exists()


# ---- the folder as a tar stream -----------------------------------------------------------------


def test_archive_chunks_untar_to_the_same_files(runs: Runs, tmp_path: Path) -> None:
    folder = runs.exports / "tiny-llama-adapter"
    chunks = archive_chunks(folder, chunk_size=4096)
    first = next(chunks)  # made as it is read: the first chunk comes before the rest exists
    rest = list(chunks)
    assert len(first) == 4096 and all(len(c) == 4096 for c in rest[:-1]) and len(rest[-1]) > 0
    data = first + b"".join(rest)
    assert len(data) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path, filter="data")
    assert names[0] == folder.name and all(n.startswith(folder.name) for n in names)
    copy = tmp_path / folder.name
    originals = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == originals
    for path in originals:
        if (folder / path).is_file():
            assert (copy / path).read_bytes() == (folder / path).read_bytes()
    assert verify_export_folder(copy).ok
    one = b"".join(archive_chunks(folder))  # the default: 1 MiB chunks, the same bytes
    assert one == data


def test_archive_chunks_refuse_links_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        archive_chunks(tmp_path / "nope")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "link").symlink_to("/etc/hostname")
    with pytest.raises(InvalidInput, match="symlink"):
        b"".join(archive_chunks(folder))


def test_another_signing_key_signs_the_export_and_verify_says_so(
    runs: Runs, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = tmp_path / "key.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out = tmp_path / "out"
    export_model(runs.lora, "tiny-gpt2", out, merge=False, key_path=key)
    report = verify_export_folder(out)
    assert report.ok and any("two signers" in note for note in report.notes)
    proof_signer = json.loads((out / "ledger_proof.json").read_text())["signer_public_key"]
    problems = verify_export_folder(out, trusted_public_key=proof_signer).problems
    assert problems == [
        f"oneseek_export.json was signed by key "
        f"{json.loads((out / 'oneseek_export.json').read_text())['signer_public_key']!r}, not by "
        f"the trusted key {proof_signer!r}."
    ]
