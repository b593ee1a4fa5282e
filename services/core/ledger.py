"""Ledger proofs: sign a run's DNA with Ed25519 and post the signed proof to a ledger.

The proof in `ledger_proof.json` verifies offline; the ledger receipt is a convenience
recorded next to it and never fails a run.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from services.core.atomic import canonical_json, write_json_atomic
from services.core.keys import KeySpec
from services.core.layout import PROOF_FILE

PROOF_EVENT = "dna_v2_training_completed"
ALGORITHM = "ed25519"
KEY_PATH_ENV = "LEDGER_PRIVATE_KEY_PATH"
LEDGER_URL_ENV = "LEDGER_URL"
# Fields the signature does not cover: itself, and the receipt that only exists after posting.
UNSIGNED_FIELDS = ("signature", "ledger")

_MAX_BODY = 1 << 20


LEDGER_KEY = KeySpec(
    env=KEY_PATH_ENV,
    filename="ed25519_private_key.pem",
    kind="an Ed25519 key",
    signer="the ledger signer",
    why="proofs are signed with Ed25519",
    make="openssl genpkey -algorithm ed25519",
    generate=lambda: Ed25519PrivateKey.generate(),
    accepts=lambda key: isinstance(key, Ed25519PrivateKey),
)


def default_key_path() -> Path:
    return LEDGER_KEY.default_path()


def load_signing_key(path: Path | None = None) -> Ed25519PrivateKey:
    """The signing key: `path`, else $LEDGER_PRIVATE_KEY_PATH, else a local key made once.

    A key that was named must exist; only the default local key is ever created.
    """
    key, _ = LEDGER_KEY.load(path)
    assert isinstance(key, Ed25519PrivateKey)  # LEDGER_KEY accepts nothing else
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key in standard base64."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def build_proof(
    *, run_id: str, dna: str, immutable_hash: str, timestamp: str, key: Ed25519PrivateKey
) -> dict[str, Any]:
    proof: dict[str, Any] = {
        "event": PROOF_EVENT,
        "run_id": run_id,
        "dna": dna,
        "immutable_hash": immutable_hash,
        "timestamp": timestamp,
        "algorithm": ALGORITHM,
        "signer_public_key": public_key_b64(key),
        "signature": None,
        "ledger": None,
    }
    proof["signature"] = base64.b64encode(key.sign(signed_payload(proof))).decode("ascii")
    return proof


def signed_payload(proof: Mapping[str, Any]) -> bytes:
    """The bytes the signature covers: canonical JSON of every field but signature and ledger."""
    return canonical_json({k: v for k, v in proof.items() if k not in UNSIGNED_FIELDS})


def verify_proof_signature(proof: Mapping[str, Any]) -> bool:
    """True when `signature` is a valid Ed25519 signature by `signer_public_key`.

    This says the proof is intact, not who signed it: compare `signer_public_key` with a
    key you trust for that.
    """
    if proof.get("algorithm") != ALGORITHM:
        return False
    try:
        public_raw = _b64decode(proof["signer_public_key"])
        signature = _b64decode(proof["signature"])
        public = Ed25519PublicKey.from_public_bytes(public_raw)
        public.verify(signature, signed_payload(proof))
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return False
    return True


def post_to_ledger(
    proof: Mapping[str, Any],
    url: str,
    *,
    attempts: int = 3,
    timeout: float = 5.0,
    backoff: float = 0.5,
) -> dict[str, Any]:
    """POST the signed proof to `<url>/entries` and return the receipt to record.

    Network trouble (refused, timeout, 5xx) is retried with exponential backoff, then
    recorded as an error receipt: a ledger outage must not fail a finished run. A 4xx is
    the ledger refusing this proof, so it is not retried; neither is a 2xx without an entry
    id, since the ledger did accept the request and repeating it could add a second entry.
    """
    target = f"{url.rstrip('/')}/entries"
    endpoint = _without_credentials(target)
    if not target.lower().startswith(("http://", "https://")):
        # urllib would also open file:// and ftp:// URLs; a ledger is an HTTP service.
        return _failed(endpoint, f"{LEDGER_URL_ENV} must start with http:// or https://", 0)
    body = canonical_json({k: v for k, v in proof.items() if k != "ledger"})
    attempts = max(1, attempts)
    error = "not attempted"
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            time.sleep(backoff * 2 ** (attempt - 2))
        request = urllib.request.Request(
            target,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status = int(response.status)
                raw = response.read(_MAX_BODY)
        except urllib.error.HTTPError as http_error:
            with contextlib.closing(http_error):
                detail = _snippet(http_error.read(500))
            error = f"HTTP {http_error.code} from the ledger: {detail}".rstrip(": ")
            if http_error.code < 500:
                return _failed(endpoint, error, attempt)
            continue
        except ValueError as bad_url:
            return _failed(endpoint, f"{LEDGER_URL_ENV} is not a usable URL: {bad_url}", attempt)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as net_error:
            reason = getattr(net_error, "reason", None) or net_error
            error = f"could not reach the ledger: {reason}"
            continue
        entry_id = _entry_id(raw)
        if entry_id is None:
            return _failed(
                endpoint,
                f"HTTP {status} from the ledger without an entry_id in its JSON body: "
                f"{_snippet(raw)}",
                attempt,
            )
        return {
            "url": endpoint,
            "entry_id": entry_id,
            "status": status,
            "posted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "attempts": attempt,
        }
    return _failed(endpoint, error, attempts)


def write_ledger_proof(
    run_dir: Path,
    *,
    run_id: str,
    dna: str,
    immutable_hash: str,
    timestamp: str,
    key: Ed25519PrivateKey | None = None,
    ledger_url: str | None = None,
) -> dict[str, Any]:
    """Sign the proof, post it when a ledger is configured, write `ledger_proof.json`."""
    signing_key = key if key is not None else load_signing_key()
    proof = build_proof(
        run_id=run_id, dna=dna, immutable_hash=immutable_hash, timestamp=timestamp, key=signing_key
    )
    url = os.environ.get(LEDGER_URL_ENV, "") if ledger_url is None else ledger_url
    if url.strip():
        proof["ledger"] = post_to_ledger(proof, url.strip())
    write_json_atomic(Path(run_dir) / PROOF_FILE, proof)
    return proof


def _b64decode(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected a base64 string")
    return base64.b64decode(value.encode("ascii"), validate=True)


def _entry_id(raw: bytes) -> str | None:
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, dict):
        return None
    entry_id = parsed.get("entry_id", parsed.get("id"))
    if entry_id is None or isinstance(entry_id, (dict, list, bool)) or entry_id == "":
        return None
    return str(entry_id)


def _without_credentials(url: str) -> str:
    # The receipt is written into the run folder; a user:password in LEDGER_URL must not be.
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _snippet(raw: bytes) -> str:
    return raw[:200].decode("utf-8", errors="replace").strip()


def _failed(url: str, error: str, attempts: int) -> dict[str, Any]:
    return {"url": url, "entry_id": None, "error": error, "attempts": attempts}
