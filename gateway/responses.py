"""JSON answers encoded with orjson: a viewer token's answer in about a tenth of json.dumps's time."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """web.json_response's answer (application/json; charset=utf-8), encoded by orjson."""
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )
