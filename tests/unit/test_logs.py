"""Logs are JSON lines that carry an exception's type, never its text."""

from __future__ import annotations

import logging

import orjson
import pytest

from eobblast.observe.logs import OncePerInterval
from tests.conftest import service_logging

SECRET = "Jane Q. Member, 12 Elm St"


@pytest.mark.parametrize("logger", ["eobblast.worker", "uvicorn.error", "mail.log", "aiokafka"])
def test_an_exception_is_logged_by_type_only(
    logger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Our own loggers and those of the servers we run (uvicorn, aiosmtpd's "mail.log",
    # aiokafka) would otherwise print a traceback with the exception's text.
    with service_logging():
        try:
            raise RuntimeError(f"row for {SECRET} could not be read")
        except RuntimeError:
            logging.getLogger(logger).exception("something failed")
    err = capsys.readouterr().err
    (line,) = [orjson.loads(text) for text in err.splitlines()]
    assert line["logger"] == logger and line["exc_type"] == "RuntimeError"
    assert SECRET not in err and "Traceback" not in err


def test_a_repeated_library_message_is_let_through_once_per_interval() -> None:
    # aiokafka logs each failed connection attempt: hundreds of lines a second while the
    # broker is down. One line per interval stays, with the count of those held back.
    now = [0.0]
    limit = OncePerInterval(30.0, clock=lambda: now[0])
    logger = logging.getLogger("aiokafka.conn")

    def passes(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord | None:
        record = logger.makeRecord(logger.name, level, __file__, 1, msg, args, None)
        return record if limit.filter(record) else None

    first = passes("Unable connect to node with id %s: %s", 0, "refused")
    assert first is not None and not hasattr(first, "suppressed")
    for attempt in range(500):
        now[0] += 0.05
        assert passes("Unable connect to node with id %s: %s", 0, f"try {attempt}") is None
    # Another message, or the same one at another level, is not held back by the first.
    assert passes("Unable to update metadata from %s", [0]) is not None
    assert passes("Unable connect to node with id %s: %s", 0, "x", level=logging.WARNING)
    now[0] = 30.0
    again = passes("Unable connect to node with id %s: %s", 0, "refused")
    assert again is not None and getattr(again, "suppressed", None) == 500
    now[0] = 60.0
    quiet = passes("Unable connect to node with id %s: %s", 0, "refused")
    assert quiet is not None and not hasattr(quiet, "suppressed")


def test_service_logging_rate_limits_libraries_but_not_eobblast(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with service_logging():
        for _ in range(50):
            logging.getLogger("aiokafka.conn").error("Unable connect to node with id %s", 0)
            logging.getLogger("eobblast.worker").warning("event parked")
    lines = [orjson.loads(text) for text in capsys.readouterr().err.splitlines()]
    assert [line["logger"] for line in lines].count("aiokafka.conn") == 1
    assert [line["logger"] for line in lines].count("eobblast.worker") == 50
