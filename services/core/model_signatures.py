"""OpenSSF model signatures (the `model-signing` package): a folder's files hashed (sha256,
file by file) into a manifest, signed inside a DSSE envelope with an EC key, so anyone checks
a trained model with the stock `model_signing verify key` and nothing of ours.

They stand beside the run's Ed25519 proof, not instead of it: model-signing takes no Ed25519
key, so its key is a P-256 one kept like the ledger key (services/core/keys.py), and the run's
DNA pins the signatures and the public key, so the proof covers them too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from services.core.atomic import TEMP_SUFFIX, fsync_dir
from services.core.keys import KeySpec

KEY_PATH_ENV = "ONESEEK_MODEL_SIGNING_KEY_PATH"
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
"""The curves model-signing 1.x signs with; a key made here is P-256."""


def _supported(key: PrivateKeyTypes) -> bool:
    return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in CURVES


def _described(key: PrivateKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on the curve {key.curve.name}"
    return f"a {type(key).__name__.lstrip('_')}"


MODEL_SIGNING_KEY = KeySpec(
    env=KEY_PATH_ENV,
    filename="ecdsa_p256_private_key.pem",
    kind="an EC key on P-256 (or P-384, P-521)",
    signer="the model signer",
    why="OpenSSF model signatures take EC keys, not Ed25519",
    make="openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256",
    generate=lambda: ec.generate_private_key(ec.SECP256R1()),
    accepts=_supported,
    describe=_described,
)


@dataclass(frozen=True)
class ModelSigner:
    """The model-signing key: where its PEM is (model-signing reads the key from a file) and
    its public half, as the PEM a verifier is given."""

    key_path: Path
    public_key_pem: bytes

    def sign(self, folder: Path, signature: Path, *, ignore: Sequence[str] = ()) -> bytes:
        """Sign every file of `folder` (but the relative paths `ignore`, which the signature
        records so the stock verifier skips them too) into the Sigstore bundle `signature`,
        written atomically; returns its bytes."""
        from model_signing import hashing, signing

        folder, signature = Path(folder), Path(signature)
        staged = signature.with_name(signature.name + TEMP_SUFFIX)
        # model-signing's Config constructors carry no annotations
        config = signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
            private_key=self.key_path
        )
        if ignore:
            hashing_config = hashing.Config()  # type: ignore[no-untyped-call]
            config.set_hashing_config(hashing_config.set_ignored_paths(paths=list(ignore)))
        try:
            config.sign(folder, staged)
            with open(staged, "rb") as handle:
                os.fsync(handle.fileno())
                data = handle.read()
            os.replace(staged, signature)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        fsync_dir(signature.parent)
        return data


def model_signer(path: Path | None = None) -> ModelSigner:
    """The model-signing key: `path`, else $ONESEEK_MODEL_SIGNING_KEY_PATH, else a local P-256
    key made once in `<state>/ledger/` (mode 0600)."""
    key, where = MODEL_SIGNING_KEY.load(path)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ModelSigner(key_path=where, public_key_pem=pem)


def verify_signature(folder: Path, signature: Path, public_key: Path) -> str | None:
    """None when the OpenSSF signature `signature` holds for `folder` and the PEM public key
    `public_key`, as `model_signing verify key` checks it; else model-signing's reason."""
    from model_signing import verifying

    try:
        config = verifying.Config().use_elliptic_key_verifier(  # type: ignore[no-untyped-call]
            public_key=Path(public_key)
        )
        config.verify(Path(folder), Path(signature))
    except Exception as error:  # it raises ValueError, InvalidSignature, protobuf errors...
        return str(error) or type(error).__name__
    return None
