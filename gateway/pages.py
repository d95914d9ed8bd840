"""The pages and their static files, served from the web folder (the SDK included, never a CDN)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path, PurePosixPath

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import ApiError

log = logging.getLogger(__name__)

PAGES = {"/": "index.html", "/broadcast": "broadcast.html", "/watch": "watch.html"}


def page_handler(path: Path) -> Handler:
    async def serve_page(request: web.Request) -> web.StreamResponse:
        # Checked per request: the web folder may be (re)built while the gateway runs.
        if not await asyncio.to_thread(path.is_file):
            raise ApiError(404, "not_found", "This page is not installed.")
        # no-cache: a redeploy must reach open tabs on their next load.
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve_page


def static_file(web_root: Path, relative: str) -> Path | None:
    """The readable file `relative` names inside `web_root` (symlinks resolved), or None.

    Nothing outside the folder is ever returned: not through '..', an absolute path or a symlink.
    """
    if not relative or "\x00" in relative or PurePosixPath(relative).is_absolute():
        return None
    try:
        path = (web_root / relative).resolve()
        readable = path.is_relative_to(web_root) and path.is_file() and os.access(path, os.R_OK)
    except (OSError, ValueError, RuntimeError):  # ValueError: not encodable; RuntimeError: a symlink loop
        return None
    return path if readable else None


def static_handler(web_dir: Path) -> Handler:
    web_root = web_dir.resolve()

    async def serve_static(request: web.Request) -> web.StreamResponse:
        # Checked here rather than left to FileResponse, which answers a missing file with an empty
        # 404 (and a directory with an empty 403) instead of the API's error shape.
        path = await asyncio.to_thread(static_file, web_root, request.match_info["path"])
        if path is None:
            raise ApiError(404, "not_found", "There is no such file.")
        return web.FileResponse(path)

    return serve_static


def add_pages(router: web.UrlDispatcher, web_dir: Path) -> None:
    for route, file_name in PAGES.items():
        router.add_get(route, page_handler(web_dir / file_name))
    router.add_get("/static/{path:.*}", static_handler(web_dir))
    if not web_dir.is_dir():
        log.warning("web folder %s does not exist; /static/ answers 404 until it does", web_dir)
