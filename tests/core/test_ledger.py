"""Ledger proofs: the signing key's life cycle, signatures, and posting to a ledger."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.core import ledger
from services.core.atomic import json_bytes
from services.core.errors import InvalidInput
from services.core.ledger import (
    PROOF_EVENT,
    build_proof,
    default_key_path,
    load_signing_key,
    post_to_ledger,
    public_key_b64,
    signed_payload,
    verify_proof_signature,
    write_ledger_proof,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path / "state"))
    for name in ("LEDGER_URL", "LEDGER_PRIVATE_KEY_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def _pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _proof(key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    return build_proof(
        run_id="run-20240102-030405",
        dna="dna-v2:" + "ab" * 16,
        immutable_hash="cd" * 32,
        timestamp="2024-01-02T03:04:05+00:00",
        key=key or Ed25519PrivateKey.generate(),
    )


# -- the signing key ---------------------------------------------------------------------


def test_default_key_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = default_key_path()
    assert path == tmp_path / "state" / "ledger" / "ed25519_private_key.pem"
    assert not path.exists()
    first = load_signing_key()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    written = path.read_bytes()
    assert written.startswith(b"-----BEGIN PRIVATE KEY-----")
    second = load_signing_key()
    assert public_key_b64(second) == public_key_b64(first)
    assert path.read_bytes() == written
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_state_dir_defaults_to_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONESEEK_STATE_DIR")
    assert default_key_path() == Path("var") / "ledger" / "ed25519_private_key.pem"


def test_ledger_private_key_path_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Ed25519PrivateKey.generate()
    named = tmp_path / "mine.pem"
    named.write_bytes(_pem(key))
    monkeypatch.setenv("LEDGER_PRIVATE_KEY_PATH", str(named))
    assert public_key_b64(load_signing_key()) == public_key_b64(key)
    assert not default_key_path().exists()


def test_an_explicit_path_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_key, arg_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "env.pem").write_bytes(_pem(env_key))
    (tmp_path / "arg.pem").write_bytes(_pem(arg_key))
    monkeypatch.setenv("LEDGER_PRIVATE_KEY_PATH", str(tmp_path / "env.pem"))
    assert public_key_b64(load_signing_key(tmp_path / "arg.pem")) == public_key_b64(arg_key)


def test_a_named_key_that_does_not_exist_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.pem"
    monkeypatch.setenv("LEDGER_PRIVATE_KEY_PATH", str(missing))
    with pytest.raises(InvalidInput, match="does not exist") as caught:
        load_signing_key()
    assert caught.value.field == "LEDGER_PRIVATE_KEY_PATH"
    assert str(missing) in str(caught.value)
    assert not missing.exists()
    assert not default_key_path().exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key at all", "not a PEM private key"),
        (_pem(ec.generate_private_key(ec.SECP256R1())), "not an Ed25519 key"),
        (
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "encrypted",
        ),
    ],
    ids=["garbage", "ecdsa", "encrypted"],
)
def test_a_named_key_that_is_not_an_ed25519_pem_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, message: str
) -> None:
    named = tmp_path / "bad.pem"
    named.write_bytes(content)
    monkeypatch.setenv("LEDGER_PRIVATE_KEY_PATH", str(named))
    with pytest.raises(InvalidInput, match=message):
        load_signing_key()


def test_a_process_that_loses_the_creation_race_uses_the_winners_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another process publishes its key while this one is still generating: the file must
    # keep the winner's key and both must sign with it.
    winner = Ed25519PrivateKey.generate()
    real_generate = Ed25519PrivateKey.generate

    def generate_after_the_winner() -> Ed25519PrivateKey:
        path = default_key_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_pem(winner))
        return real_generate()

    monkeypatch.setattr(Ed25519PrivateKey, "generate", generate_after_the_winner)
    loaded = load_signing_key()
    assert public_key_b64(loaded) == public_key_b64(winner)
    assert default_key_path().read_bytes() == _pem(winner)
    assert sorted(p.name for p in default_key_path().parent.iterdir()) == [default_key_path().name]


def test_concurrent_first_use_from_threads_ends_with_one_key() -> None:
    barrier = threading.Barrier(8)
    keys: list[str] = []

    def load() -> None:
        barrier.wait()
        keys.append(public_key_b64(load_signing_key()))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8
    assert set(keys) == {public_key_b64(load_signing_key())}
    assert len(list(default_key_path().parent.iterdir())) == 1


def test_concurrent_first_use_from_processes_ends_with_one_key(tmp_path: Path) -> None:
    script = (
        "import time, sys\n"
        "from services.core.ledger import load_signing_key, public_key_b64\n"
        "start = float(sys.argv[1])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "print(public_key_b64(load_signing_key()))\n"
    )
    env = {**os.environ, "ONESEEK_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": "."}
    start = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, start],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert len(list(default_key_path().parent.iterdir())) == 1


# -- signatures --------------------------------------------------------------------------


def test_build_proof_signs_every_field_but_signature_and_ledger() -> None:
    key = Ed25519PrivateKey.generate()
    proof = _proof(key)
    assert list(proof) == [
        "event",
        "run_id",
        "dna",
        "immutable_hash",
        "timestamp",
        "algorithm",
        "signer_public_key",
        "signature",
        "ledger",
    ]
    assert proof["event"] == PROOF_EVENT
    assert proof["algorithm"] == "ed25519"
    assert proof["ledger"] is None
    public_raw = base64.b64decode(proof["signer_public_key"])
    assert len(public_raw) == 32
    payload = signed_payload(proof)
    assert json.loads(payload) == {
        k: v for k, v in proof.items() if k not in ("signature", "ledger")
    }
    assert (
        payload == json.dumps(json.loads(payload), sort_keys=True, separators=(",", ":")).encode()
    )
    key.public_key().verify(base64.b64decode(proof["signature"]), payload)
    assert verify_proof_signature(proof)


@pytest.mark.parametrize(
    "field", ["event", "run_id", "dna", "immutable_hash", "timestamp", "algorithm"]
)
def test_changing_any_signed_field_breaks_the_signature(field: str) -> None:
    proof = _proof()
    proof[field] = proof[field] + "x"
    assert not verify_proof_signature(proof)


def test_the_ledger_receipt_is_outside_the_signature() -> None:
    proof = _proof()
    proof["ledger"] = {"url": "http://ledger/entries", "entry_id": "e1"}
    assert verify_proof_signature(proof)


def test_a_signature_by_another_key_does_not_verify() -> None:
    proof = _proof()
    other = _proof()
    assert not verify_proof_signature({**proof, "signature": other["signature"]})
    assert not verify_proof_signature({**proof, "signer_public_key": other["signer_public_key"]})


@pytest.mark.parametrize(
    "edit",
    [
        {"signature": "!!not base64!!"},
        {"signature": base64.b64encode(b"short").decode()},
        {"signer_public_key": base64.b64encode(b"\x00" * 31).decode()},
        {"signer_public_key": None},
        {"signature": 5},
    ],
)
def test_malformed_keys_and_signatures_do_not_verify(edit: dict[str, Any]) -> None:
    assert not verify_proof_signature({**_proof(), **edit})
    broken = _proof()
    del broken["signature"]
    assert not verify_proof_signature(broken)


# -- posting to a ledger -----------------------------------------------------------------


class FakeLedger:
    """A real HTTP server on 127.0.0.1 that answers POSTs from a script of responses."""

    def __init__(self, responses: list[tuple[int, bytes]], delay: float = 0.0) -> None:
        self.responses = responses
        self.delay = delay
        self.requests: list[tuple[str, dict[str, Any]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.requests.append((self.path, json.loads(body)))
                status, answer = fake.responses[min(len(fake.requests), len(fake.responses)) - 1]
                time.sleep(fake.delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = False  # server_close() then waits for slow handlers

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and left is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,))

    def __enter__(self) -> FakeLedger:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


def test_post_returns_the_receipt_and_sends_the_signed_proof() -> None:
    proof = _proof()
    with FakeLedger([(201, b'{"entry_id": "e1"}')]) as fake:
        receipt = post_to_ledger(proof, fake.url + "/", backoff=0.01)
    assert receipt["entry_id"] == "e1"
    assert receipt["status"] == 201
    assert receipt["url"] == fake.url + "/entries"
    assert receipt["posted_at"]
    [(path, sent)] = fake.requests
    assert path == "/entries"
    assert sent == {k: v for k, v in proof.items() if k != "ledger"}
    assert verify_proof_signature(sent)


def test_post_accepts_id_as_the_entry_id() -> None:
    with FakeLedger([(200, b'{"id": 17}')]) as fake:
        receipt = post_to_ledger(_proof(), fake.url, backoff=0.01)
    assert receipt["entry_id"] == "17"


def test_post_retries_a_server_error_then_succeeds() -> None:
    responses = [(500, b"{}"), (503, b"busy"), (200, b'{"entry_id": "e2"}')]
    with FakeLedger(responses) as fake:
        receipt = post_to_ledger(_proof(), fake.url, attempts=3, backoff=0.01)
    assert receipt["entry_id"] == "e2"
    assert receipt["attempts"] == 3
    assert len(fake.requests) == 3


def test_post_gives_up_after_the_last_server_error() -> None:
    with FakeLedger([(502, b"bad gateway")]) as fake:
        receipt = post_to_ledger(_proof(), fake.url, attempts=2, backoff=0.01)
    assert receipt["entry_id"] is None
    assert receipt["attempts"] == 2
    assert "HTTP 502" in receipt["error"]
    assert len(fake.requests) == 2


def test_post_to_a_closed_port_is_an_error_receipt_not_an_exception(
    closed_port_url: str,
) -> None:
    started = time.monotonic()
    receipt = post_to_ledger(_proof(), closed_port_url, attempts=3, backoff=0.01)
    assert time.monotonic() - started < 5
    assert receipt == {
        "url": closed_port_url + "/entries",
        "entry_id": None,
        "error": receipt["error"],
        "attempts": 3,
    }
    assert "could not reach the ledger" in receipt["error"]


def test_post_that_times_out_is_retried_then_recorded() -> None:
    with FakeLedger([(200, b'{"entry_id": "late"}')], delay=0.4) as fake:
        receipt = post_to_ledger(_proof(), fake.url, attempts=2, timeout=0.1, backoff=0.01)
        assert receipt["entry_id"] is None
        assert receipt["attempts"] == 2
        assert "timed out" in receipt["error"]


@pytest.mark.parametrize("status", [400, 409, 422])
def test_a_client_error_is_not_retried(status: int) -> None:
    with FakeLedger([(status, b'{"error": "duplicate"}')]) as fake:
        receipt = post_to_ledger(_proof(), fake.url, attempts=3, backoff=0.01)
    assert len(fake.requests) == 1
    assert receipt["entry_id"] is None
    assert f"HTTP {status}" in receipt["error"]
    assert "duplicate" in receipt["error"]


@pytest.mark.parametrize("body", [b"<html>ok</html>", b'{"ok": true}', b"[1]", b'{"id": ""}'])
def test_a_success_without_an_entry_id_is_recorded_not_repeated(body: bytes) -> None:
    with FakeLedger([(200, body)]) as fake:
        receipt = post_to_ledger(_proof(), fake.url, attempts=3, backoff=0.01)
    assert len(fake.requests) == 1
    assert receipt["entry_id"] is None
    assert "without an entry_id" in receipt["error"]


@pytest.mark.parametrize("url", ["file:///etc", "ftp://example.org", "ledger.local"])
def test_only_http_ledgers_are_contacted(url: str) -> None:
    receipt = post_to_ledger(_proof(), url, backoff=0.01)
    assert receipt["entry_id"] is None
    assert "http://" in receipt["error"]


def test_credentials_in_the_ledger_url_stay_out_of_the_receipt(closed_port_url: str) -> None:
    url = closed_port_url.replace("http://", "http://user:s3cret@")
    receipt = post_to_ledger(_proof(), url, attempts=1)
    assert "s3cret" not in json.dumps(receipt)
    assert receipt["url"] == closed_port_url + "/entries"


# -- ledger_proof.json -------------------------------------------------------------------


def _write(run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    return write_ledger_proof(
        run_dir,
        run_id="run-20240102-030405",
        dna="dna-v2:" + "ab" * 16,
        immutable_hash="cd" * 32,
        timestamp="2024-01-02T03:04:05+00:00",
        **kwargs,
    )


def test_without_ledger_url_the_ledger_is_null(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    proof = _write(tmp_path, key=key)
    assert proof["ledger"] is None
    assert proof["signer_public_key"] == public_key_b64(key)
    on_disk = (tmp_path / "ledger_proof.json").read_bytes()
    assert on_disk == json_bytes(proof)
    assert verify_proof_signature(json.loads(on_disk))


def test_with_ledger_url_the_receipt_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeLedger([(201, b'{"entry_id": "e9"}')]) as fake:
        monkeypatch.setenv("LEDGER_URL", fake.url)
        proof = _write(tmp_path, key=Ed25519PrivateKey.generate())
    saved = json.loads((tmp_path / "ledger_proof.json").read_bytes())
    assert saved == proof
    assert saved["ledger"]["entry_id"] == "e9"
    assert verify_proof_signature(saved)
    [(_, sent)] = fake.requests
    assert sent["signature"] == saved["signature"]


def test_an_unreachable_ledger_is_recorded_and_the_proof_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port_url: str
) -> None:
    monkeypatch.setattr(ledger, "post_to_ledger", _fast_post)
    monkeypatch.setenv("LEDGER_URL", closed_port_url)
    proof = _write(tmp_path, key=Ed25519PrivateKey.generate())
    assert proof["ledger"]["entry_id"] is None
    assert proof["ledger"]["error"]
    assert json.loads((tmp_path / "ledger_proof.json").read_bytes()) == proof


def _fast_post(proof: dict[str, Any], url: str) -> dict[str, Any]:
    return post_to_ledger(proof, url, attempts=2, backoff=0.01)


def test_an_explicit_empty_ledger_url_overrides_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEDGER_URL", "http://127.0.0.1:9")
    proof = _write(tmp_path, key=Ed25519PrivateKey.generate(), ledger_url="")
    assert proof["ledger"] is None


def test_without_a_key_the_local_default_key_signs(tmp_path: Path) -> None:
    proof = _write(tmp_path)
    assert proof["signer_public_key"] == public_key_b64(load_signing_key())
    assert default_key_path().exists()
