"""OpenSSF model signatures on a small folder: the key kept like the ledger key, a signature the
stock `model_signing verify key` accepts, and refusals of a changed, added or removed file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.core.errors import InvalidInput
from services.core.ledger import default_key_path, load_signing_key
from services.core.model_signatures import (
    KEY_PATH_ENV,
    MODEL_SIGNING_KEY,
    model_signer,
    verify_signature,
)

STOCK_CLI = Path(sys.executable).with_name("model_signing")


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv(KEY_PATH_ENV, raising=False)
    monkeypatch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)


def _pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _model(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def stock_verify(
    folder: Path, signature: Path, public_key: Path
) -> subprocess.CompletedProcess[str]:
    """The stock command a third party runs, with nothing of ours."""
    return subprocess.run(
        [
            str(STOCK_CLI),
            "verify",
            "key",
            "--signature",
            str(signature),
            "--public_key",
            str(public_key),
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_default_key_is_a_p256_key_made_once_private_beside_the_ledger_key() -> None:
    path = MODEL_SIGNING_KEY.default_path()
    assert path.parent == default_key_path().parent
    first = model_signer()
    assert first.key_path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert model_signer().public_key_pem == first.public_key_pem
    load_signing_key()  # the ledger key lives beside it, unchanged by it
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, default_key_path().name]
    )


def test_a_named_key_is_used_and_no_local_key_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    named = tmp_path / "mine.pem"
    named.write_bytes(_pem(key))
    monkeypatch.setenv(KEY_PATH_ENV, str(named))
    signer = model_signer()
    assert signer.key_path == named
    assert signer.public_key_pem == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert not MODEL_SIGNING_KEY.default_path().exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key", "not a PEM private key"),
        (_pem(Ed25519PrivateKey.generate()), "not an EC key on P-256"),
        (_pem(ec.generate_private_key(ec.SECP256K1())), "curve secp256k1, not an EC key"),
    ],
    ids=["garbage", "ed25519", "secp256k1"],
)
def test_a_named_key_model_signing_cannot_use_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, message: str
) -> None:
    named = tmp_path / "bad.pem"
    named.write_bytes(content)
    monkeypatch.setenv(KEY_PATH_ENV, str(named))
    with pytest.raises(InvalidInput, match=message) as caught:
        model_signer()
    assert caught.value.field == KEY_PATH_ENV


def test_a_named_key_that_does_not_exist_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_PATH_ENV, str(tmp_path / "nope.pem"))
    with pytest.raises(InvalidInput, match=f"does not exist.*unset {KEY_PATH_ENV}"):
        model_signer()
    assert not (tmp_path / "nope.pem").exists()


def test_the_stock_verifier_accepts_a_signed_folder_and_refuses_a_changed_byte(
    tmp_path: Path,
) -> None:
    folder = _model(tmp_path / "adapter")
    signer = model_signer()
    signature, public_key = tmp_path / "adapter.sig", tmp_path / "public.pem"
    public_key.write_bytes(signer.public_key_pem)
    data = signer.sign(folder, signature)
    assert signature.read_bytes() == data
    assert not list(tmp_path.glob("*.tmp"))
    assert verify_signature(folder, signature, public_key) is None
    accepted = stock_verify(folder, signature, public_key)
    assert accepted.returncode == 0, accepted.stderr
    assert "Verification succeeded" in accepted.stdout

    weights = folder / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[100] ^= 0x01
    weights.write_bytes(bytes(raw))
    refused = stock_verify(folder, signature, public_key)
    assert refused.returncode == 1
    assert "adapter_model.safetensors" in refused.stderr
    reason = verify_signature(folder, signature, public_key)
    assert reason is not None and "adapter_model.safetensors" in reason


@pytest.mark.parametrize("change", ["added", "removed"])
def test_an_added_or_removed_file_is_refused(tmp_path: Path, change: str) -> None:
    folder = _model(tmp_path / "adapter")
    signer = model_signer()
    signature, public_key = tmp_path / "adapter.sig", tmp_path / "public.pem"
    public_key.write_bytes(signer.public_key_pem)
    signer.sign(folder, signature)
    if change == "added":
        (folder / "extra.bin").write_bytes(b"x")
    else:
        (folder / "sub" / "tokenizer.json").unlink()
    reason = verify_signature(folder, signature, public_key)
    assert reason is not None and ("extra.bin" in reason or "tokenizer.json" in reason)


def test_another_key_is_refused(tmp_path: Path) -> None:
    folder = _model(tmp_path / "adapter")
    signature = tmp_path / "adapter.sig"
    model_signer().sign(folder, signature)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    public_key = tmp_path / "other.pem"
    public_key.write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    reason = verify_signature(folder, signature, public_key)
    assert reason is not None and "Key mismatch" in reason
    assert stock_verify(folder, signature, public_key).returncode == 1


def test_a_signature_inside_the_folder_signs_all_but_what_it_ignores(tmp_path: Path) -> None:
    """An export's way: the signature and the manifest lie in the signed folder, recorded as
    ignored, so the stock verifier (told nothing) skips them and checks the rest."""
    folder = _model(tmp_path / "export")
    signer = model_signer()
    (folder / "model_signing_public_key.pem").write_bytes(signer.public_key_pem)
    (folder / "oneseek_export.json").write_text("{}")
    signer.sign(folder, folder / "model.sig", ignore=("model.sig", "oneseek_export.json"))
    (folder / "oneseek_export.json").write_text('{"written": "after"}')
    public_key = folder / "model_signing_public_key.pem"
    accepted = stock_verify(folder, folder / "model.sig", public_key)
    assert accepted.returncode == 0, accepted.stderr
    (folder / "adapter_config.json").write_text('{"r": 9}')
    assert stock_verify(folder, folder / "model.sig", public_key).returncode == 1
    assert os.path.exists(folder / "model.sig")
