"""The admin page: `gateway/static/index.html` at `/`, the rest of `gateway/static/` under
`/static/`, the ES module of the training config at `/static/trainingConfig.js`, and the
security headers every response carries.

The page's policy allows scripts and styles only from the gateway itself (no inline script),
connections only back to it (REST and the websocket), and no framing by other sites.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

from services.core.training_config import MODEL_NAME_RE, NAME_RULE, get_config

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        # the page styles itself through CSSOM (element.style.setProperty), which CSP allows
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

_MISSING_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>OneSeek</title></head>
<body><h1>OneSeek gateway</h1>
<p>The admin page is not installed (gateway/static/index.html is missing).
The API answers under <a href="/api/openapi.json">/api/openapi.json</a>.</p></body></html>
"""


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: on every answer, pages, static files, JSON and errors alike."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    if request.path.startswith("/api/"):
        headers.setdefault("Cache-Control", "no-store")
    elif request.path.startswith("/static/"):
        # revalidate every time (a 304 when unchanged): a new deployment's scripts are seen at
        # once, never mixed with an old cached index or module
        headers.setdefault("Cache-Control", "no-cache")


def training_config_module(static_dir: Path) -> str:
    """`/static/trainingConfig.js`: Python's TRAINING_CONFIG, and generateRunId() and
    validateBaseModels() bound to it, as one self-contained ES module (config_rules.js plus the
    config), for the page and for Node tools (save it and import it)."""
    rules = (static_dir / "config_rules.js").read_text(encoding="utf-8")
    config = json.dumps(get_config(), indent=2)
    return (
        f"{rules}\n// ---- bound to this gateway's config (services/core/training_config.py) ----\n"
        f"export const TRAINING_CONFIG = deepFreeze({config});\n"
        f"export const MODEL_NAME_PATTERN = {json.dumps(MODEL_NAME_RE.pattern)};\n"
        "export const { generateRunId, validateBaseModels } = makeRules(\n"
        f"  TRAINING_CONFIG, MODEL_NAME_PATTERN, {json.dumps(NAME_RULE)});\n"
    )


async def index_page(request: web.Request, static_dir: Path) -> web.StreamResponse:
    """`/` (a route of the gateway's list): index.html, revalidated every time, so a new page
    version is seen at once."""
    index, headers = static_dir / "index.html", {"Cache-Control": "no-cache"}
    if index.is_file():
        return web.FileResponse(index, headers=headers)
    return web.Response(body=_MISSING_PAGE, content_type="text/html", headers=headers)


def static_routes(static_dir: Path) -> list[web.AbstractRouteDef]:
    """The page's files under /static/, undocumented in the API."""
    routes: list[web.AbstractRouteDef] = []
    if (static_dir / "config_rules.js").is_file():
        module = training_config_module(static_dir).encode()

        async def config_module(request: web.Request) -> web.StreamResponse:
            return web.Response(body=module, content_type="text/javascript", charset="utf-8")

        # before the static folder, which would otherwise answer 404 for it
        routes.append(web.get("/static/trainingConfig.js", config_module))
    if static_dir.is_dir():
        routes.append(web.static("/static/", static_dir, follow_symlinks=False))
    return routes
