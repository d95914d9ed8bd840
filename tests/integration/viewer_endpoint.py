"""A stand-in for the gateway's viewer-token endpoint, for testing the bench's load generators.

It records each request's content type and userId and refuses every fifth viewer with a 503, so a test
knows exactly what a generator sent and what it should report.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def recording_server(seen: list[tuple[str, str]]) -> AsyncIterator[str]:
    async def viewer(request: web.Request) -> web.Response:
        user_id = json.loads(await request.read())["userId"]
        seen.append((request.content_type, user_id))
        if len(seen) % 5 == 0:
            return web.json_response({"error": {"code": "no_capacity"}}, status=503)
        return web.json_response({"token": "t", "userId": user_id})

    app = web.Application()
    app.router.add_post("/api/rooms/main/viewer-token", viewer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/api/rooms/main/viewer-token"
    finally:
        await runner.cleanup()
