"""Logs are JSON lines that carry an exception's type, never its text."""

from __future__ import annotations

import logging

import orjson
import pytest

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
