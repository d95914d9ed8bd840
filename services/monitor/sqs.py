"""The SQS queue that EventBridge fills with IVS events: long-poll receive and batch delete, off the loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import Unavailable
from services.common.ivs_calls import error_code

MAX_MESSAGES = 10  # SQS's maximum per ReceiveMessage and per DeleteMessageBatch


def make_sqs_client(region: str, endpoint_url: str | None, local_credentials: bool) -> Any:
    config = Config(retries={"total_max_attempts": 3, "mode": "standard"}, read_timeout=30)
    kwargs: dict[str, Any] = {"region_name": region, "config": config}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if local_credentials:
        kwargs["aws_access_key_id"] = "local"
        kwargs["aws_secret_access_key"] = "local"  # noqa: S105 - not a secret: a local queue's dummy
    return boto3.session.Session().client("sqs", **kwargs)


def _operation(fn: Any) -> str:
    return "".join(part.title() for part in getattr(fn, "__name__", "call").split("_"))


@dataclass(frozen=True)
class QueueMessage:
    receipt_handle: str
    body: str


class SqsQueue:
    """boto3 SQS calls in their own small pool, so a 20 s long poll never holds an IVS worker."""

    def __init__(self, client: Any, queue_url: str, wait_seconds: int) -> None:
        self._client = client
        self._queue_url = queue_url
        self._wait_seconds = wait_seconds
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sqs")

    async def receive(self) -> list[QueueMessage]:
        response = await self._run(
            self._client.receive_message,
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=MAX_MESSAGES,
            WaitTimeSeconds=self._wait_seconds,
        )
        return [
            QueueMessage(str(m["ReceiptHandle"]), str(m.get("Body", "")))
            for m in response.get("Messages", [])
        ]

    async def delete(self, receipt_handles: list[str]) -> int:
        """Deletes the messages; returns how many SQS did not delete (they come back as duplicates)."""
        failed = 0
        for start in range(0, len(receipt_handles), MAX_MESSAGES):
            chunk = receipt_handles[start : start + MAX_MESSAGES]
            response = await self._run(
                self._client.delete_message_batch,
                QueueUrl=self._queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": handle} for i, handle in enumerate(chunk)],
            )
            failed += len(response.get("Failed", []))
        return failed

    async def _run(self, fn: Any, **kwargs: Any) -> Any:
        """Every failure comes out as Unavailable, with the error's code and never the queue's URL."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(**kwargs))
        except ClientError as error:
            raise Unavailable(f"SQS {_operation(fn)} failed: {error_code(error) or 'error'}") from error
        except BotoCoreError as error:
            raise Unavailable(f"SQS {_operation(fn)} failed: {type(error).__name__}") from error

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
