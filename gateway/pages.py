"""The pages and their static files, served from the web folder (the SDK included, never a CDN)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

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


def add_pages(router: web.UrlDispatcher, web_dir: Path) -> None:
    for route, file_name in PAGES.items():
        router.add_get(route, page_handler(web_dir / file_name))
    if web_dir.is_dir():
        router.add_static("/static/", web_dir, show_index=False, follow_symlinks=False)
    else:
        log.warning("web folder %s does not exist; /static/ will answer 404", web_dir)
