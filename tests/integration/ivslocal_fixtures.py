"""The IVS emulator in-process on a free loopback port, and boto3 clients for it, for integration tests."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import boto3
import pytest_asyncio
from aiohttp import web
from botocore.config import Config

from services.ivslocal.app import create_app
from services.ivslocal.config import Settings
from services.ivslocal.model import IvsState
from services.ivslocal.ratelimit import CallStats


class AsyncIvsClient:
    """A real boto3 ivs-realtime client whose calls run in a worker thread: `await ivs.get_stage(arn=a)`."""

    def __init__(self, client: Any) -> None:
        self.sync = client

    def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        method = getattr(self.sync, name)

        async def call(**kwargs: Any) -> Any:
            return await asyncio.to_thread(method, **kwargs)

        return call


@dataclass
class IvsLocalServer:
    url: str
    state: IvsState
    stats: CallStats
    settings: Settings

    def boto3_client(self, retries: bool = True) -> Any:
        """A blocking boto3 client pointed at the emulator; retries=False makes exactly one attempt."""
        # botocore's retries "max_attempts" counts retries, not attempts; total_max_attempts counts both.
        config = None if retries else Config(retries={"total_max_attempts": 1})
        return _boto3_session().client(
            "ivs-realtime",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=config,
        )

    def client(self, retries: bool = True) -> AsyncIvsClient:
        return AsyncIvsClient(self.boto3_client(retries))


@functools.cache
def _boto3_session() -> boto3.session.Session:
    # One session for the whole run: loading the service model per client is the slow part.
    return boto3.session.Session()


@asynccontextmanager
async def running_ivslocal(
    settings: Settings | None = None, state: IvsState | None = None
) -> AsyncIterator[IvsLocalServer]:
    """Serves the emulator on 127.0.0.1:<free port> for the duration of the block."""
    settings = settings or Settings(port=0)
    state = state if state is not None else IvsState(settings)
    stats = CallStats()
    runner = web.AppRunner(create_app(settings, state, stats=stats))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield IvsLocalServer(url=f"http://{host}:{port}", state=state, stats=stats, settings=settings)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def ivslocal() -> AsyncIterator[IvsLocalServer]:
    """A fresh emulator with default settings (rate limits off); yields its URL, state and stats."""
    async with running_ivslocal() as server:
        yield server
