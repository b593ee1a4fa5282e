"""OpenSSF model signatures of a real certified run and its exports: the stock
`model_signing verify key` accepts each adapter and each export as they are and refuses a
changed byte; `oneseek verify` checks the same signatures, pinned by the DNA, and names what
fails (a changed adapter, a missing, swapped or foreign signature, another public key)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.api.run_config import config_from_body
from services.cli import main
from services.core.dna import compute_immutable_hash, sha256_file, write_dna
from services.core.layout import (
    DNA_FILE,
    EXPORT_MANIFEST_FILE,
    EXPORT_SIGNATURE_FILE,
    MODEL_SIGNATURES_DIR,
    MODEL_SIGNING_PUBLIC_KEY_FILE,
)
from services.core.ledger import write_ledger_proof
from services.core.verify import verify_export_folder, verify_run_folder
from services.training.data import load_dataset
from services.training.events import EventLog
from services.training.export import export_model
from services.training.models import resolve_models
from services.training.population import TrainingRun
from services.training.run_folder import RunFolder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STOCK_CLI = Path(sys.executable).with_name("model_signing")
MODELS = ["tiny-llama", "tiny-gpt2"]
RUN_ID = "run-20260501-000001"


@dataclass(frozen=True)
class Signed:
    models: Path
    run_dir: Path
    merged: Path
    """tiny-llama merged into its base."""
    adapter: Path
    """tiny-gpt2's adapter alone."""


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Signed]:
    root = tmp_path_factory.mktemp("model-signing")
    models = root / "models"
    models.mkdir()
    for name in MODELS:
        (models / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    config = config_from_body(
        {
            "datasetId": "sample",
            "baseModels": MODELS,
            "epochs": 1,
            "learningRate": 2e-3,
            "batchSize": 16,
            "maxSeqLength": 48,
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(root / "var"))  # both keys are made there
        patch.delenv("LEDGER_URL", raising=False)
        patch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
        patch.delenv("ONESEEK_MODEL_SIGNING_KEY_PATH", raising=False)
        folder = RunFolder.create(models, RUN_ID)
        summary = TrainingRun(
            config,
            run_id=RUN_ID,
            models=resolve_models(MODELS, models),
            dataset=load_dataset("sample", REPO / "datasets"),
            folder=folder,
            events=EventLog(RUN_ID),
            stop=threading.Event(),
        ).run()
        assert summary.error is None, summary.error
        merged = export_model(folder.path, "tiny-llama", root / "exports" / "merged", merge=True)
        adapter = export_model(folder.path, "tiny-gpt2", root / "exports" / "adapter", merge=False)
        yield Signed(models, folder.path, merged, adapter)


def stock_verify(
    folder: Path, signature: Path, public_key: Path
) -> subprocess.CompletedProcess[str]:
    """`model_signing verify key`, the stock command a third party runs with nothing of ours."""
    command = [str(STOCK_CLI), "verify", "key", "--signature", str(signature)]
    command += ["--public_key", str(public_key), str(folder)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def stock_verify_adapter(run_dir: Path, model: str) -> subprocess.CompletedProcess[str]:
    return stock_verify(
        run_dir / "adapters" / model,
        run_dir / MODEL_SIGNATURES_DIR / f"{model}.sig",
        run_dir / MODEL_SIGNING_PUBLIC_KEY_FILE,
    )


def stock_verify_export(folder: Path) -> subprocess.CompletedProcess[str]:
    return stock_verify(
        folder, folder / EXPORT_SIGNATURE_FILE, folder / MODEL_SIGNING_PUBLIC_KEY_FILE
    )


def flip_a_byte(path: Path, at: int = 200) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture
def run_copy(signed: Signed, tmp_path: Path) -> Path:
    """A copy of the certified run, to break (beside its base models)."""
    models = tmp_path / "models"
    models.mkdir()
    for name in MODELS:
        (models / name).symlink_to(signed.models / name, target_is_directory=True)
    copy = models / "oneseek-certified" / RUN_ID
    shutil.copytree(signed.run_dir, copy)
    return copy


def problems_of(run_dir: Path) -> list[str]:
    report = verify_run_folder(run_dir)
    assert not report.ok
    return report.problems


# ---- the run folder ------------------------------------------------------------------------


def test_the_stock_command_accepts_each_adapter(signed: Signed) -> None:
    for model in MODELS:
        result = stock_verify_adapter(signed.run_dir, model)
        assert result.returncode == 0, result.stderr
        assert "Verification succeeded" in result.stdout


def test_the_dna_pins_each_signature_and_the_public_key(signed: Signed) -> None:
    dna = json.loads((signed.run_dir / DNA_FILE).read_text())
    files = [MODEL_SIGNING_PUBLIC_KEY_FILE, *(f"{MODEL_SIGNATURES_DIR}/{m}.sig" for m in MODELS)]
    assert dna["model_signing"] == {
        name: sha256_file(signed.run_dir / name) for name in sorted(files)
    }
    assert sorted(p.name for p in (signed.run_dir / MODEL_SIGNATURES_DIR).iterdir()) == sorted(
        f"{m}.sig" for m in MODELS
    )
    key = serialization.load_pem_public_key(
        (signed.run_dir / MODEL_SIGNING_PUBLIC_KEY_FILE).read_bytes()
    )
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    report = verify_run_folder(signed.run_dir)
    assert report.ok, report.problems
    assert not any("model signature" in note or "not part of" in note for note in report.notes)


def test_a_changed_byte_is_refused_by_the_stock_command_and_oneseek_verify(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_a_byte(run_copy / "adapters" / "tiny-llama" / "adapter_model.safetensors")
    refused = stock_verify_adapter(run_copy, "tiny-llama")
    assert refused.returncode == 1
    assert "Verification failed" in refused.stderr
    assert "adapter_model.safetensors" in refused.stderr
    assert stock_verify_adapter(run_copy, "tiny-gpt2").returncode == 0  # untouched
    problems = problems_of(run_copy)
    assert any(
        p.startswith(
            f"adapters/tiny-llama/ does not verify against its OpenSSF model signature "
            f"{MODEL_SIGNATURES_DIR}/tiny-llama.sig"
        )
        and "adapter_model.safetensors" in p
        for p in problems
    ), problems
    assert not any("tiny-gpt2" in p for p in problems)
    assert main(["verify", str(run_copy)]) == 1
    assert "OpenSSF model signature" in capsys.readouterr().out


def test_a_missing_signature_is_reported(run_copy: Path) -> None:
    (run_copy / MODEL_SIGNATURES_DIR / "tiny-gpt2.sig").unlink()
    assert problems_of(run_copy) == [
        f"{MODEL_SIGNATURES_DIR}/tiny-gpt2.sig is missing ({DNA_FILE} lists it)."
    ]


def test_another_adapters_signature_is_refused(run_copy: Path) -> None:
    signatures = run_copy / MODEL_SIGNATURES_DIR
    shutil.copyfile(signatures / "tiny-llama.sig", signatures / "tiny-gpt2.sig")
    problems = problems_of(run_copy)
    assert any(p.startswith(f"{MODEL_SIGNATURES_DIR}/tiny-gpt2.sig has changed") for p in problems)
    assert any(p.startswith("adapters/tiny-gpt2/ does not verify") for p in problems), problems
    assert stock_verify_adapter(run_copy, "tiny-gpt2").returncode == 1


def test_another_public_key_or_an_extra_signature_is_refused(run_copy: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    (run_copy / MODEL_SIGNING_PUBLIC_KEY_FILE).write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (run_copy / MODEL_SIGNATURES_DIR / "stray.sig").write_bytes(b"x")
    problems = problems_of(run_copy)
    assert any(p.startswith(f"{MODEL_SIGNING_PUBLIC_KEY_FILE} has changed") for p in problems)
    assert f"{MODEL_SIGNATURES_DIR}/stray.sig is an extra file that {DNA_FILE} does not list." in (
        problems
    )
    for model in MODELS:
        assert any(
            p.startswith(f"adapters/{model}/ does not verify") and "Key mismatch" in p
            for p in problems
        ), problems


def test_a_run_certified_before_model_signing_verifies_with_a_note(
    run_copy: Path, signed: Signed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(signed.models.parent / "var"))
    dna = json.loads((run_copy / DNA_FILE).read_text())
    del dna["model_signing"]
    dna["immutable_hash"] = compute_immutable_hash(dna)
    write_dna(run_copy, dna)
    proof = json.loads((run_copy / "ledger_proof.json").read_text())
    write_ledger_proof(
        run_copy,
        run_id=RUN_ID,
        dna=dna["dna"],
        immutable_hash=dna["immutable_hash"],
        timestamp=proof["timestamp"],
    )
    shutil.rmtree(run_copy / MODEL_SIGNATURES_DIR)
    (run_copy / MODEL_SIGNING_PUBLIC_KEY_FILE).unlink()
    report = verify_run_folder(run_copy)
    assert report.ok, report.problems
    assert any("records no OpenSSF model signatures" in note for note in report.notes)


# ---- exports -------------------------------------------------------------------------------


def test_the_stock_command_accepts_each_export(signed: Signed) -> None:
    for folder in (signed.merged, signed.adapter):
        result = stock_verify_export(folder)
        assert result.returncode == 0, result.stderr
        manifest = json.loads((folder / EXPORT_MANIFEST_FILE).read_text())
        assert {EXPORT_SIGNATURE_FILE, MODEL_SIGNING_PUBLIC_KEY_FILE} <= set(manifest["files"])
        assert (folder / MODEL_SIGNING_PUBLIC_KEY_FILE).read_bytes() == (
            signed.run_dir / MODEL_SIGNING_PUBLIC_KEY_FILE
        ).read_bytes()
        report = verify_export_folder(folder)
        assert report.ok, report.problems
        assert not any("model signature" in note for note in report.notes)
        assert "model_signing verify key" in (folder / "README.md").read_text()


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_a_changed_byte_in_an_export_is_refused_by_both(
    signed: Signed, tmp_path: Path, export: str
) -> None:
    folder = tmp_path / export
    shutil.copytree(getattr(signed, export), folder)
    weights = "model.safetensors" if export == "merged" else "adapter_model.safetensors"
    flip_a_byte(folder / weights)
    refused = stock_verify_export(folder)
    assert refused.returncode == 1 and weights in refused.stderr
    problems = verify_export_folder(folder).problems
    assert any(p.startswith(f"{weights} has changed since it was exported") for p in problems)
    assert any(
        p.startswith(f"{EXPORT_SIGNATURE_FILE}: the OpenSSF model signature does not verify")
        and weights in p
        for p in problems
    ), problems


def test_an_export_without_its_signature_is_refused(signed: Signed, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(signed.adapter, folder)
    (folder / EXPORT_SIGNATURE_FILE).unlink()
    assert verify_export_folder(folder).problems == [
        f"{EXPORT_SIGNATURE_FILE} is missing ({EXPORT_MANIFEST_FILE} lists it)."
    ]
