"""The baselines: what a bare aiohttp server does with the same work and nothing else.

    python bench/bare_servers.py --port P --json FILE

- `GET /json`: the JSON document in FILE, encoded per request with `web.json_response`;
- `POST /report`: reads the JSON body and answers `{"success": true, "seq": n}`;
- `GET /ws`: a websocket that gets a hello, then every broadcast;
- `POST /broadcast?seq=N&size=B`: sends one B-byte epoch_end-like text message to every
  websocket with the textbook loop (`for ws in clients: await ws.send_str(text)`), answering
  the monotonic time the broadcast started.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aiohttp import web


def make_app(document: object) -> web.Application:
    clients: set[web.WebSocketResponse] = set()
    seq = 0

    async def json_doc(request: web.Request) -> web.StreamResponse:
        return web.json_response(document)

    async def report(request: web.Request) -> web.StreamResponse:
        nonlocal seq
        await request.json()
        seq += 1
        return web.json_response({"success": True, "seq": seq})

    async def socket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"type": "hello"}))
        clients.add(ws)
        try:
            async for _message in ws:
                pass
        finally:
            clients.discard(ws)
        return ws

    async def broadcast(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        number = int(request.query["seq"])
        size = int(request.query.get("size", "600"))
        kind = request.query.get("type", "epoch_end")
        head = json.dumps({"type": kind, "seq": number, "pad": ""})
        text = head[:-2] + "x" * max(0, size - len(head)) + '"}'
        for ws in list(clients):
            await ws.send_str(text)
        return web.json_response({"started": started, "clients": len(clients)})

    app = web.Application()
    app.add_routes(
        [
            web.get("/json", json_doc),
            web.post("/report", report),
            web.get("/ws", socket),
            web.post("/broadcast", broadcast),
        ]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    document = json.loads(Path(args.json).read_text())
    web.run_app(make_app(document), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
