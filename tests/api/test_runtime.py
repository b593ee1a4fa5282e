"""What the servers and clients share: token checks, TLS settings from flags and environment, and
the error answer that names its field in trailing metadata (over a real in-process server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st

from services.api.runtime import (
    FIELD_METADATA_KEY,
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    abort,
    client_tls_ca,
    server_tls,
    token_matches,
)
from services.core.errors import InvalidInput

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


@given(st.text(min_size=1), st.text(min_size=1))
def test_a_token_matches_only_itself(token: str, offered: str) -> None:
    assert token_matches(f"Bearer {token}", [token])
    assert token_matches(f"Bearer {offered}", [token]) == (offered == token)
    assert not token_matches(token, [token])  # no scheme
    assert not token_matches(f"Bearer {token}", [None, ""])


@pytest.fixture
def no_tls_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_tls_env")
def test_tls_comes_from_flags_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(PEM)
    key.write_bytes(KEY)
    assert server_tls() is None and client_tls_ca() is None  # plaintext by default
    tls = server_tls(str(cert), str(key))
    assert tls is not None and tls.certificate_chain == PEM and tls.private_key == KEY
    monkeypatch.setenv(TLS_CERT_ENV, str(cert))
    monkeypatch.setenv(TLS_KEY_ENV, str(key))
    monkeypatch.setenv(TLS_CA_ENV, str(cert))
    assert server_tls() == tls
    assert client_tls_ca() == PEM
    other = tmp_path / "other.pem"
    other.write_bytes(PEM.replace(b"MIIB", b"MIIC"))
    assert client_tls_ca(str(other)) != PEM  # the flag wins over the environment


@pytest.mark.usefixtures("no_tls_env")
@pytest.mark.parametrize(
    ("cert", "key", "words"),
    [
        ("c.pem", None, "--tls-key (ONESEEK_TLS_KEY) is missing"),
        (None, "k.pem", "--tls-cert (ONESEEK_TLS_CERT) is missing"),
        ("missing.pem", "k.pem", "cannot read the certificate"),
        ("c.pem", "plain.txt", "not a PEM file"),
        ("c.pem", ".", "cannot read the private key"),
    ],
)
def test_half_or_broken_tls_is_refused(
    tmp_path: Path, cert: str | None, key: str | None, words: str
) -> None:
    (tmp_path / "c.pem").write_bytes(PEM)
    (tmp_path / "k.pem").write_bytes(KEY)
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(InvalidInput) as caught:
        server_tls(str(tmp_path / cert) if cert else None, str(tmp_path / key) if key else None)
    assert words in caught.value.message
    assert (caught.value.field or "").startswith("--tls-")


@pytest.fixture
async def refusing_server() -> AsyncIterator[str]:
    """A server whose one method refuses with the field taken from the request's text."""

    async def refuse(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "bad", request.decode() or None)

    handler = grpc.method_handlers_generic_handler(
        "test.Refuser",
        {"Refuse": grpc.unary_unary_rpc_method_handler(refuse)},
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.mark.parametrize(
    ("field", "sent"),
    [
        ("baseModels", "baseModels"),
        ("", None),
        ("caf\u00e9", None),  # a caller's non-ASCII key: metadata cannot carry it
        ("a\nb", None),
        ("x" * 300, None),
    ],
)
async def test_abort_names_the_field_in_trailing_metadata(
    refusing_server: str, field: str, sent: str | None
) -> None:
    async with aio.insecure_channel(refusing_server) as channel:
        call = channel.unary_unary("/test.Refuser/Refuse")  # type: ignore[call-arg]
        with pytest.raises(aio.AioRpcError) as caught:
            await call(field.encode(), timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == "bad"
    trailing: dict[str, Any] = dict(list(error.trailing_metadata() or ()))  # type: ignore[arg-type]
    assert trailing.get(FIELD_METADATA_KEY) == sent
