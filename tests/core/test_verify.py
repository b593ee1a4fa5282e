"""`verify_run_folder` on a realistic run folder built without training, then tampered with."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.core.atomic import json_bytes, write_json_atomic
from services.core.dna import (
    build_dna,
    compute_dna_string,
    compute_immutable_hash,
    model_fingerprint,
    sha256_file,
    write_dna,
)
from services.core.ledger import build_proof, load_signing_key, public_key_b64, write_ledger_proof
from services.core.verify import VerifyReport, verify_run_folder

RUN_ID = "run-20240102-030405"
MODELS = {"tiny-gpt2": "GPT2LMHeadModel", "tiny-llama": "LlamaForCausalLM"}
ADAPTER_FILES = (
    "adapters/tiny-gpt2/adapter_config.json",
    "adapters/tiny-gpt2/adapter_model.safetensors",
    "adapters/tiny-gpt2/README.md",
    "adapters/tiny-llama/adapter_config.json",
    "adapters/tiny-llama/adapter_model.safetensors",
)
JSON_FILES = (
    "live_metrics.json",
    "training_results.json",
    "oneseek_dna.json",
    "ledger_proof.json",
)


@dataclass
class RunFolder:
    run_dir: Path
    models_root: Path
    key: Ed25519PrivateKey

    def verify(self, **kwargs: Any) -> VerifyReport:
        return verify_run_folder(self.run_dir, **kwargs)

    def read(self, name: str) -> Any:
        return json.loads((self.run_dir / name).read_bytes())

    def rewrite(self, name: str, doc: Any) -> None:
        """Re-serialise as oneseek would, so only hashes and signatures can tell."""
        write_json_atomic(self.run_dir / name, doc)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunFolder:
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("LEDGER_URL", raising=False)
    monkeypatch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
    rng = random.Random(1234)
    models_root = tmp_path / "models"
    base_models = []
    for index, (name, architecture) in enumerate(MODELS.items()):
        folder = models_root / name
        config = {"architectures": [architecture], "n_layer": 2, "vocab_size": 64}
        _write(folder / "config.json", json.dumps(config).encode())
        weights = "model.safetensors" if index == 0 else "pytorch_model.bin"
        _write(folder / weights, rng.randbytes(4096))
        _write(folder / "tokenizer.json", b'{"model": {}}')
        base_models.append(model_fingerprint(name, folder, architecture))

    run_dir = models_root / "oneseek-certified" / RUN_ID
    for relpath in ADAPTER_FILES:
        if relpath.endswith(".json"):
            _write(run_dir / relpath, json.dumps({"r": 8, "lora_alpha": 16}).encode())
        else:
            _write(run_dir / relpath, rng.randbytes(rng.randint(300, 3000)))
    final_weights = {"tiny-gpt2": 1.1785113019775793, "tiny-llama": 0.8214886980224206}
    history = [
        {"epoch": 1, "val_loss": {"tiny-gpt2": 3.91, "tiny-llama": 4.02}, "total_loss": 3.965},
        {"epoch": 2, "val_loss": {"tiny-gpt2": 3.52, "tiny-llama": 3.77}, "total_loss": 3.6225},
    ]
    write_json_atomic(
        run_dir / "live_metrics.json",
        {"run_id": RUN_ID, "epoch": 2, "weights": final_weights, **history[-1]},
    )
    write_json_atomic(
        run_dir / "training_results.json",
        {"run_id": RUN_ID, "history": history, "stop_reason": "max_epochs", "duration_s": 12.5},
    )
    doc = build_dna(
        run_id=RUN_ID,
        created_at="2024-01-02T03:04:30+00:00",
        base_models=base_models,
        dataset={"id": "sample", "sha256": "0" * 63 + "1", "records": 40, "validation": 4},
        run_dir=run_dir,
        final_weights=final_weights,
        training_config={"epochs": 2, "learning_rate": 0.0001, "lora": {"r": 8}},
    )
    write_dna(run_dir, doc)
    key_path = tmp_path / "signer.pem"
    key = load_signing_key(_make_key(key_path))
    write_ledger_proof(
        run_dir,
        run_id=RUN_ID,
        dna=doc["dna"],
        immutable_hash=doc["immutable_hash"],
        timestamp="2024-01-02T03:04:31+00:00",
        key=key,
    )
    return RunFolder(run_dir=run_dir, models_root=models_root, key=key)


def _make_key(path: Path) -> Path:
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _problems_text(report: VerifyReport) -> str:
    return "\n".join(report.problems)


def test_an_untouched_run_folder_is_verified(run: RunFolder) -> None:
    report = run.verify()
    assert report.ok, report.problems
    assert report.problems == []
    # The base models sit next to oneseek-certified/, so their hashes were checked too.
    assert not any("not present" in note for note in report.notes)
    assert any("not posted to a ledger" in note for note in report.notes)


def test_the_trusted_signer_is_verified(run: RunFolder) -> None:
    report = run.verify(trusted_public_key=public_key_b64(run.key))
    assert report.ok, report.problems
    assert not any("trusted key" in note for note in report.notes)


def _offsets(size: int) -> list[int]:
    sampled = set(range(0, size, max(1, size // 12)))
    return sorted(sampled | {0, 1, size // 2, size - 2, size - 1})


@pytest.mark.parametrize("relpath", JSON_FILES + ADAPTER_FILES)
@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_flipping_any_byte_of_any_file_fails(run: RunFolder, relpath: str, mask: int) -> None:
    path = run.run_dir / relpath
    original = path.read_bytes()
    for offset in _offsets(len(original)):
        flipped = bytearray(original)
        flipped[offset] ^= mask
        path.write_bytes(bytes(flipped))
        report = run.verify()
        assert not report.ok, f"flip of byte {offset} in {relpath} went unnoticed"
        assert path.name in _problems_text(report), report.problems
    path.write_bytes(original)
    assert run.verify().ok


@pytest.mark.parametrize("name", JSON_FILES)
def test_whitespace_edits_are_caught(run: RunFolder, name: str) -> None:
    path = run.run_dir / name
    path.write_bytes(path.read_bytes().rstrip(b"\n") + b" \n")
    report = run.verify()
    assert f"{name} is not in the form oneseek writes (edited by hand?)." in report.problems


def test_a_json_file_with_nan_is_not_in_oneseek_form(run: RunFolder) -> None:
    path = run.run_dir / "live_metrics.json"
    path.write_bytes(path.read_bytes().replace(b"3.52", b"NaN"))
    assert "live_metrics.json is not in the form oneseek writes (edited by hand?)." in (
        run.verify().problems
    )


def test_an_edited_metrics_file_fails_on_its_hash(run: RunFolder) -> None:
    results = run.read("training_results.json")
    results["stop_reason"] = "auto_stop"
    run.rewrite("training_results.json", results)
    report = run.verify()
    assert len(report.problems) == 1
    assert report.problems[0].startswith("training_results.json has changed since the run")


def test_an_edited_dna_field_fails_on_immutable_hash_and_dna(run: RunFolder) -> None:
    dna = run.read("oneseek_dna.json")
    dna["final_weights"]["tiny-gpt2"] = 1.5
    run.rewrite("oneseek_dna.json", dna)
    problems = _problems_text(run.verify())
    assert "oneseek_dna.json: immutable_hash" in problems
    assert "oneseek_dna.json: dna" in problems


def test_an_edited_proof_field_fails_on_the_signature(run: RunFolder) -> None:
    proof = run.read("ledger_proof.json")
    proof["timestamp"] = "2030-01-01T00:00:00+00:00"
    run.rewrite("ledger_proof.json", proof)
    report = run.verify()
    assert report.problems == [
        "ledger_proof.json: the signature is not valid for its content and signer_public_key "
        "(the proof was changed after it was signed)."
    ]


def _forge_dna(run: RunFolder) -> dict[str, Any]:
    """An attacker who understands the format: edit the DNA and recompute both hashes."""
    dna: dict[str, Any] = run.read("oneseek_dna.json")
    dna["dataset"]["sha256"] = "f" * 64
    dna["dna"] = compute_dna_string(dna)
    dna["immutable_hash"] = compute_immutable_hash(dna)
    run.rewrite("oneseek_dna.json", dna)
    return dna


def test_a_consistently_forged_dna_no_longer_matches_the_signed_proof(run: RunFolder) -> None:
    _forge_dna(run)
    problems = _problems_text(run.verify())
    assert "ledger_proof.json: dna" in problems
    assert "ledger_proof.json: immutable_hash" in problems
    assert "oneseek_dna.json: immutable_hash" not in problems


def test_a_forgery_re_signed_with_another_key_is_caught_only_by_the_trusted_key(
    run: RunFolder,
) -> None:
    dna = _forge_dna(run)
    attacker = Ed25519PrivateKey.generate()
    forged = build_proof(
        run_id=RUN_ID,
        dna=dna["dna"],
        immutable_hash=dna["immutable_hash"],
        timestamp="2024-01-02T03:04:31+00:00",
        key=attacker,
    )
    run.rewrite("ledger_proof.json", forged)

    # Without a trusted key the folder is self-consistent: the signature only shows integrity,
    # and the report says so.
    untrusted = run.verify()
    assert untrusted.ok, untrusted.problems
    assert any(public_key_b64(attacker) in note for note in untrusted.notes)

    trusted = run.verify(trusted_public_key=public_key_b64(run.key))
    assert trusted.problems == [
        f"ledger_proof.json was signed by key {public_key_b64(attacker)!r}, not by the trusted "
        f"key {public_key_b64(run.key)!r}."
    ]


def test_a_swapped_signature_and_key_from_another_signer_fails(run: RunFolder) -> None:
    proof = run.read("ledger_proof.json")
    other = build_proof(
        run_id="run-20990101-000000",
        dna=proof["dna"],
        immutable_hash=proof["immutable_hash"],
        timestamp=proof["timestamp"],
        key=Ed25519PrivateKey.generate(),
    )
    proof["signature"] = other["signature"]
    proof["signer_public_key"] = other["signer_public_key"]
    run.rewrite("ledger_proof.json", proof)
    assert "the signature is not valid" in _problems_text(run.verify())


def test_a_malformed_trusted_key_is_a_problem(run: RunFolder) -> None:
    report = run.verify(trusted_public_key="not-a-key")
    assert report.problems == [
        "The trusted public key 'not-a-key' is not a base64 raw Ed25519 key (32 bytes)."
    ]


def test_a_missing_adapter_file_is_named(run: RunFolder) -> None:
    (run.run_dir / "adapters/tiny-llama/adapter_model.safetensors").unlink()
    assert run.verify().problems == [
        "adapters/tiny-llama/adapter_model.safetensors is missing (oneseek_dna.json lists it)."
    ]


@pytest.mark.parametrize(
    "relpath", ["adapters/tiny-gpt2/extra.bin", "adapters/tiny-gpt2/sub/x", "adapters/new/a"]
)
def test_an_extra_adapter_file_is_named(run: RunFolder, relpath: str) -> None:
    _write(run.run_dir / relpath, b"extra")
    assert run.verify().problems == [
        f"{relpath} is an extra file that oneseek_dna.json does not list."
    ]


def test_a_changed_adapter_file_is_named_with_both_hashes(run: RunFolder) -> None:
    path = run.run_dir / "adapters/tiny-gpt2/adapter_config.json"
    recorded = sha256_file(path)
    path.write_bytes(b'{"r": 64}')
    [problem] = run.verify().problems
    assert problem.startswith("adapters/tiny-gpt2/adapter_config.json has changed")
    assert recorded in problem
    assert sha256_file(path) in problem


def test_a_symlink_in_adapters_is_a_problem(run: RunFolder, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    (run.run_dir / "adapters/tiny-gpt2/link.bin").symlink_to(outside)
    problems = _problems_text(run.verify())
    assert "link.bin is a symlink" in problems


@pytest.mark.parametrize("name", [*JSON_FILES, "adapters"])
def test_a_missing_required_file_is_named(run: RunFolder, name: str) -> None:
    path = run.run_dir / name
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    report = run.verify()
    assert not report.ok
    expected = (
        "adapters/ is missing (or is not a real folder)."
        if name == "adapters"
        else (f"{name} is missing.")
    )
    assert expected in report.problems


def test_a_renamed_run_folder_is_a_problem(run: RunFolder) -> None:
    renamed = run.run_dir.with_name("run-20240102-030406")
    run.run_dir.rename(renamed)
    report = verify_run_folder(renamed)
    assert report.problems == [
        f"oneseek_dna.json is for run {RUN_ID!r} but the folder is named 'run-20240102-030406'."
    ]


def test_a_changed_base_model_is_a_problem(run: RunFolder) -> None:
    weights = run.models_root / "tiny-llama" / "pytorch_model.bin"
    weights.write_bytes(b"different weights")
    (run.models_root / "tiny-gpt2" / "config.json").write_bytes(b"{}")
    (run.models_root / "tiny-gpt2" / "model-2.safetensors").write_bytes(b"new")
    problems = run.verify().problems
    assert any(
        p.startswith("base model tiny-llama:") and "pytorch_model.bin differs" in p
        for p in problems
    ), problems
    assert any(p.startswith("base model tiny-gpt2:") and "config.json" in p for p in problems)
    assert any(
        "model-2.safetensors is a weight file the run was not trained on" in p for p in problems
    )


def test_a_removed_base_model_weight_file_is_a_problem(run: RunFolder) -> None:
    (run.models_root / "tiny-gpt2" / "model.safetensors").unlink()
    assert any("model.safetensors is missing" in p for p in run.verify().problems)


def test_base_models_elsewhere_are_noted_not_failed(run: RunFolder, tmp_path: Path) -> None:
    copy = tmp_path / "copied" / RUN_ID
    shutil.copytree(run.run_dir, copy)
    report = verify_run_folder(copy)
    assert report.ok, report.problems
    for name in MODELS:
        assert f"base model {name} not present; its hashes were not checked." in report.notes
    # ...and pointing at where they live checks them again.
    (run.models_root / "tiny-gpt2" / "config.json").write_bytes(b"{}")
    assert not verify_run_folder(copy, models_root=run.models_root).ok


def test_a_base_model_name_cannot_point_outside_models_root(run: RunFolder) -> None:
    dna = run.read("oneseek_dna.json")
    dna["base_models"][0]["name"] = "../../etc"
    run.rewrite("oneseek_dna.json", dna)
    problems = run.verify().problems
    assert "oneseek_dna.json lists a base model with an unusable name '../../etc'." in problems


def test_an_extra_file_in_the_run_folder_is_only_a_note(run: RunFolder) -> None:
    (run.run_dir / "notes.txt").write_text("hello")
    report = run.verify()
    assert report.ok
    assert "notes.txt is in the run folder but is not part of the certified run." in report.notes


def test_a_recorded_ledger_receipt_is_noted(run: RunFolder) -> None:
    proof = run.read("ledger_proof.json")
    proof["ledger"] = {"url": "http://ledger/entries", "entry_id": "e1", "status": 201}
    run.rewrite("ledger_proof.json", proof)
    report = run.verify()
    assert report.ok, report.problems
    assert any("Ledger entry e1" in note for note in report.notes)


def test_a_folder_that_does_not_exist_is_a_problem(tmp_path: Path) -> None:
    report = verify_run_folder(tmp_path / RUN_ID)
    assert not report.ok
    assert "does not exist" in report.problems[0]


def test_the_report_is_built_from_the_on_disk_form(run: RunFolder) -> None:
    # Guard for the fixture itself: every JSON file is exactly what json_bytes writes.
    for name in JSON_FILES:
        path = run.run_dir / name
        assert path.read_bytes() == json_bytes(json.loads(path.read_bytes()))
