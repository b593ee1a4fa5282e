"""The admin page: `gateway/static/index.html` at `/`, the rest of `gateway/static/` under
`/static/`, and the security headers every response carries.

The page's policy allows scripts and styles only from the gateway itself (no inline script),
connections only back to it (REST and the websocket), and no framing by other sites.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

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


def page_routes(static_dir: Path) -> list[web.AbstractRouteDef]:
    index = static_dir / "index.html"

    async def page(request: web.Request) -> web.StreamResponse:
        # a new page version must be seen at once: revalidate every time
        headers = {"Cache-Control": "no-cache"}
        if index.is_file():
            return web.FileResponse(index, headers=headers)
        return web.Response(body=_MISSING_PAGE, content_type="text/html", headers=headers)

    routes: list[web.AbstractRouteDef] = [web.get("/", page)]
    if static_dir.is_dir():
        routes.append(web.static("/static/", static_dir, follow_symlinks=False))
    return routes
