"""Who may call what: the access rules of each kind of route, the loopback rule, and the
refusal to start on a public address without a token."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.auth import Access, authorize
from gateway.errors import ApiError
from gateway.settings import GatewaySettings, is_loopback
from services.cli import main as oneseek

ADMIN, REPORT = "a-token", "r-token"


def request(method: str = "GET", host: str = "127.0.0.1:3001", **headers: str) -> object:
    return make_mocked_request(method, "/api/x", headers={"Host": host, **headers})


def status_of(settings: GatewaySettings, access: Access, **kwargs: str) -> int:
    host = kwargs.pop("host", "127.0.0.1:3001")
    method = kwargs.pop("method", "GET")
    headers = {k.replace("_", "-"): v for k, v in kwargs.items()}
    try:
        authorize(request(method, host, **headers), access, settings)  # type: ignore[arg-type]
    except ApiError as error:
        return error.status
    return 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


LOCAL = GatewaySettings(host="127.0.0.1", admin_token=ADMIN, report_token=REPORT)
PUBLIC = GatewaySettings(host="0.0.0.0", admin_token=ADMIN, report_token=REPORT)
OPEN_LOCAL = GatewaySettings(host="127.0.0.1")
GOOD = {"Authorization": f"Bearer {ADMIN}"}
REPORTER = {"Authorization": f"Bearer {REPORT}"}
WRONG = {"Authorization": "Bearer nope"}


@pytest.mark.parametrize(
    ("settings", "access", "headers", "status"),
    [
        (LOCAL, Access.ADMIN, {}, 401),
        (LOCAL, Access.ADMIN, WRONG, 401),
        (LOCAL, Access.ADMIN, REPORTER, 401),
        (LOCAL, Access.ADMIN, GOOD, 200),
        (LOCAL, Access.REPORT, {}, 401),
        (LOCAL, Access.REPORT, REPORTER, 200),
        (LOCAL, Access.REPORT, GOOD, 200),
        (LOCAL, Access.READ, {}, 200),
        (LOCAL, Access.READ, WRONG, 200),
        (PUBLIC, Access.READ, {}, 401),
        (PUBLIC, Access.READ, WRONG, 401),
        (PUBLIC, Access.READ, REPORTER, 401),
        (PUBLIC, Access.READ, GOOD, 200),
        (PUBLIC, Access.ADMIN, GOOD, 200),
        (PUBLIC, Access.OPEN, {}, 200),
        (OPEN_LOCAL, Access.ADMIN, {}, 200),
        (OPEN_LOCAL, Access.REPORT, {}, 200),
    ],
)
def test_access_rules(
    settings: GatewaySettings, access: Access, headers: dict[str, str], status: int
) -> None:
    assert status_of(settings, access, **headers) == status


def test_loopback_trust_needs_a_loopback_host_header() -> None:
    for access in (Access.READ, Access.ADMIN):
        assert status_of(OPEN_LOCAL, access, host="rebound.example:3001") == 403
        assert status_of(OPEN_LOCAL, access, host="[::1]:3001") == 200
    assert status_of(LOCAL, Access.READ, host="rebound.example", **GOOD) == 200


def test_cross_origin_posts_are_refused() -> None:
    origin = {"Origin": "https://evil.example"}
    assert status_of(LOCAL, Access.ADMIN, method="POST", **origin, **GOOD) == 403
    same = {"Origin": "http://127.0.0.1:3001"}
    assert status_of(LOCAL, Access.ADMIN, method="POST", **same, **GOOD) == 200
    # a GET from another origin cannot read the answer anyway (no CORS): not refused
    assert status_of(LOCAL, Access.READ, **origin) == 200


def test_startup_refuses_a_public_address_without_a_token() -> None:
    assert GatewaySettings(host="0.0.0.0").startup_problem() is not None
    assert GatewaySettings(host="0.0.0.0", admin_token="t").startup_problem() is None
    assert GatewaySettings(host="127.0.0.1").startup_problem() is None


def test_cli_exits_2_on_a_public_address_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ONESEEK_ADMIN_TOKEN", raising=False)
    assert oneseek(["gateway", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "ONESEEK_ADMIN_TOKEN" in capsys.readouterr().err


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONESEEK_GATEWAY_HOST", "0.0.0.0")
    monkeypatch.setenv("ONESEEK_GATEWAY_PORT", "4000")
    monkeypatch.setenv("ONESEEK_TRAINING_ADDR", "t:1")
    monkeypatch.setenv("ONESEEK_METRICS_ADDR", "m:2")
    monkeypatch.setenv("ONESEEK_ADMIN_TOKEN", "x")
    settings = GatewaySettings.from_env()
    assert (settings.host, settings.port) == ("0.0.0.0", 4000)
    assert (settings.training_addr, settings.metrics_addr, settings.admin_token) == (
        "t:1",
        "m:2",
        "x",
    )
    flagged = GatewaySettings.from_env(host="127.0.0.1", port=5000)
    assert (flagged.host, flagged.port) == ("127.0.0.1", 5000)
    monkeypatch.setenv("ONESEEK_GATEWAY_PORT", "http")
    with pytest.raises(ValueError, match="ONESEEK_GATEWAY_PORT"):
        GatewaySettings.from_env()
