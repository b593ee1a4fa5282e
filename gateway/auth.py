"""Who may call what (README: REST API).

- admin routes: `Authorization: Bearer $ONESEEK_ADMIN_TOKEN` whenever that token is set, on any
  address. With no admin token set (possible only on loopback: the gateway refuses to start
  elsewhere without one) they are open to local callers.
- the report route: the admin token or `$ONESEEK_REPORT_TOKEN`; open to local callers only when
  neither is set.
- read routes and the websocket: open while the gateway listens on loopback, otherwise the admin
  token (the websocket also takes it as `?token=`, since browsers cannot set its headers).

"Local caller" means more than "the gateway listens on loopback": a request whose access rests
on loopback alone must also carry a loopback Host header, so a web page on another site cannot
reach the gateway by DNS rebinding. Requests that change something (POST) and websockets must
come from the gateway's own origin when a browser says where they come from (`Origin`), so
another site cannot drive or read the gateway through a visitor's browser.
"""

from __future__ import annotations

import enum
from urllib.parse import urlsplit

from aiohttp import web

from gateway.errors import ApiError
from gateway.settings import GatewaySettings, is_loopback
from services.api.runtime import token_matches


class Access(enum.Enum):
    OPEN = "open"
    READ = "read"
    REPORT = "report"
    ADMIN = "admin"


def _host_name(host: str) -> str:
    """The name part of a Host header (`[::1]:3001` -> `::1`, `localhost:3001` -> `localhost`)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _local(request: web.Request, settings: GatewaySettings) -> None:
    if not settings.loopback:
        raise ApiError(401, "Missing bearer token: send 'Authorization: Bearer <admin token>'.")
    host = request.headers.get("Host", "")
    if not is_loopback(_host_name(host)):
        raise ApiError(
            403,
            f"Host {host!r} is not a loopback name, and this gateway only trusts local callers "
            f"without a token: open it as http://127.0.0.1:{settings.port}/ or send the admin "
            "token.",
        )


def _same_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser, or a same-origin GET: nothing to refuse
    if urlsplit(origin).netloc.lower() != request.host.lower():
        raise ApiError(
            403,
            f"Requests from {origin} are refused: this gateway only answers its own page. "
            "Call it from a non-browser client, or open the gateway's page.",
        )


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def offered(request: web.Request, *, query: bool = False) -> str | None:
    """The `Authorization` header, or (for websockets) the `token` query parameter as one."""
    header = request.headers.get("Authorization")
    if header is None and query and "token" in request.query:
        return _bearer(request.query["token"])
    return header


def _require(header: str | None, tokens: list[str], what: str) -> None:
    if header is None:
        raise ApiError(401, f"Missing bearer token: send 'Authorization: Bearer <{what}>'.")
    if not token_matches(header, tokens):
        raise ApiError(
            401,
            f"The bearer token is not valid here: send 'Authorization: Bearer <{what}>' "
            "(the token printed by `oneseek up`, or $ONESEEK_ADMIN_TOKEN).",
        )


def authorize(
    request: web.Request, access: Access, settings: GatewaySettings, *, websocket: bool = False
) -> None:
    """Raises ApiError 401/403 unless the request may use a route of kind `access`."""
    if access is Access.OPEN:
        return
    if request.method == "POST" or websocket:
        _same_origin(request)
    header = offered(request, query=websocket)
    admin = [settings.admin_token] if settings.admin_token else []
    if access is Access.ADMIN:
        if admin:
            _require(header, admin, "admin token")
        else:
            _local(request, settings)
    elif access is Access.REPORT:
        tokens = [*admin, *([settings.report_token] if settings.report_token else [])]
        if tokens:
            _require(header, tokens, "admin or report token")
        else:
            _local(request, settings)
    elif header is not None and admin and token_matches(header, admin):
        return  # a read with the admin token is fine anywhere
    elif settings.loopback:
        _local(request, settings)
    else:
        _require(header, admin, "admin token")
