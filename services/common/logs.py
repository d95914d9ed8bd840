"""Logging set up once per process: JSON lines for machines, plain text for a local terminal."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra= fields become keys, so logs stay queryable."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class OfferedProtocolsRedactor(logging.Filter):
    """aiohttp's WebSocket handshake logs the subprotocols a client offered when none is accepted,
    and the IVS Web SDK offers its participant token as one: the token must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Client protocols" in str(record.msg) and isinstance(record.args, tuple) and record.args:
            record.msg = "%s: the client's WebSocket subprotocols were not accepted (not logged: a token)"
            record.args = record.args[:1]
        return True


def protect_websocket_tokens() -> None:
    """Installs OfferedProtocolsRedactor once; every process that serves WebSockets calls it."""
    websocket = logging.getLogger("aiohttp.websocket")
    if not any(isinstance(f, OfferedProtocolsRedactor) for f in websocket.filters):
        websocket.addFilter(OfferedProtocolsRedactor())


def configure_logging(service: str, json_lines: bool, level: str = "INFO") -> None:
    """Replaces the root handlers; call once from a process's composition root."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service:<12} %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every heartbeat; our own middleware logs what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    protect_websocket_tokens()
