"""Standard Webhooks headers for one attempt: webhook-id, webhook-timestamp, webhook-signature."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from standardwebhooks import Webhook


class WebhookSigner:
    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)

    def headers(self, event_id: str, body: str, now: float) -> dict[str, str]:
        """Signed at the attempt's time (receivers refuse old timestamps); the id never changes."""
        timestamp = math.floor(now)
        signature = self._webhook.sign(event_id, datetime.fromtimestamp(timestamp, tz=UTC), body)
        return {
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
            "content-type": "application/json",
        }
