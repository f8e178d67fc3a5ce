"""Structured JSON logs. Callers pass event ids, reason codes and counts only: never PHI."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as a JSON line."""
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages from libraries may quote message content.
            doc["exc_type"] = record.exc_info[0].__name__
        return orjson.dumps(doc, default=str).decode()


# Libraries whose own loggers would otherwise print whole tracebacks through Python's
# default handler: uvicorn logs "Exception in ASGI application" with the exception's text,
# which a database driver may fill with a value from the failed statement.
_LIBRARY_LOGGERS = ("uvicorn", "mail", "aiokafka")  # aiosmtpd logs as "mail.log"


def configure_logging(level: str = "INFO") -> None:
    """Send eobblast's logs (and those of the servers it runs) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("eobblast")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.propagate = False
        if library.level == logging.NOTSET:
            library.setLevel(logging.WARNING)
