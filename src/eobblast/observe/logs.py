"""Structured JSON logs. Callers pass event ids, reason codes and counts only: never PHI."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
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


# How often one library message may be repeated. aiokafka logs every failed connection
# attempt (hundreds of lines a second while the broker is down); eobblast's own warning
# about an unreachable broker comes at most this often too.
LIBRARY_LOG_INTERVAL = 30.0


class OncePerInterval(logging.Filter):
    """Let a message through at most once per `interval` s; count what it holds back.

    Messages are told apart by logger, level and format string (not by their arguments,
    which for a connection error hold the attempt's details). The first record after a
    quiet spell carries `suppressed`: how many like it were dropped since the last one.
    """

    MAX_KEYS = 1024

    def __init__(
        self, interval: float = LIBRARY_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        # key -> (when it was last let through, how many were held back since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within the interval."""
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        last, held = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._seen[key] = (last, held + 1)
            return False
        if held:
            record.suppressed = held
        if last is None and len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()  # a flood of distinct messages: start counting afresh
        self._seen[key] = (now, 0)
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send eobblast's logs (and those of the servers it runs) to stderr as JSON lines.

    Library messages are rate-limited (`OncePerInterval`); eobblast's own are not.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("eobblast")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    library_handler = logging.StreamHandler(sys.stderr)
    library_handler.setFormatter(JsonFormatter())
    library_handler.addFilter(OncePerInterval())
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [library_handler]
        library.propagate = False
        if library.level == logging.NOTSET:
            library.setLevel(logging.WARNING)
