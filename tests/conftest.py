"""Shared fixtures: a valid event and helpers to spoil it."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import orjson
import pytest

from eobblast.events.synthetic import Mix, generate_events

# Kafka fixtures (a session broker, topic factory) for every test module that names them.
pytest_plugins = ["tests.kafka_fixtures"]

CLEAN = Mix(no_consent=0, invalid_address=0, malformed=0, unknown_user=0, busy_mailbox=0, gone=0)


@pytest.fixture
def event_doc() -> dict[str, Any]:
    """One valid eob.issued/v1 event as a mapping."""
    raw = next(
        generate_events(1, seed=7, mix=CLEAN, now=dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC))
    )
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


def spoiled(doc: dict[str, Any], path: str, value: Any) -> bytes:
    """The event with `path` (dotted, list indices allowed) set to value, or deleted if ...."""
    out = copy.deepcopy(doc)
    node: Any = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is Ellipsis:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return orjson.dumps(out)
