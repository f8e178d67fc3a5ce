"""`eobblast dlq`: what it selects, what it refuses to replay, and its errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.errors import RequestTimedOutError  # type: ignore[import-untyped]
from click.testing import CliRunner

from eobblast import dlq as dlq_module
from eobblast.cli import _dlq_selection, main
from eobblast.config import load_config
from eobblast.dlq import (
    Parked,
    ReplayAudit,
    ReplayReport,
    Selection,
    _checked,
    _parked,
    refusal_check,
)
from eobblast.errors import ReasonCode
from eobblast.events.status import SourcePosition, dead_letter, without_original
from eobblast.events.synthetic import generate_events
from eobblast.observe.audit import AuditAction, AuditError, AuditTrail, member_ref, open_audit
from eobblast.protect.services import hold_secrets, portal_secrets
from eobblast.streams.kafka import (
    PLAINTEXT,
    BrokerUnavailable,
    KafkaError,
    MessageSizeTooLargeError,
    TopicRecord,
)


def parked(
    offset: int, reason: ReasonCode, event_id: str | None, value: bytes, key: bytes | None
) -> Parked:
    source = SourcePosition(topic="eob.events", partition=0, offset=offset)
    letter = dead_letter(value, key, reason=reason, field=None, event_id=event_id, source=source)
    return Parked(0, offset, letter)


def letter_record(offset: int, letter: Any) -> TopicRecord:
    """A record of the DLQ holding `letter`."""
    return TopicRecord(0, offset, b"M1", letter.model_dump_json(by_alias=True).encode(), 0)


def test_a_selection_matches_every_criterion_given() -> None:
    a = parked(1, ReasonCode.INVALID_ADDRESS, "ev-a", b"{}", b"M1")
    b = parked(2, ReasonCode.INVALID_ADDRESS, "ev-b", b"{}", b"M2")
    c = parked(3, ReasonCode.INVALID_JSON, None, b"x", b"M3")
    assert [p in Selection() for p in (a, b, c)] == [True, True, True]
    by_reason = Selection(reasons=frozenset({"invalid_address"}))
    assert [p in by_reason for p in (a, b, c)] == [True, True, False]
    both = Selection(reasons=frozenset({"invalid_address"}), event_ids=frozenset({"ev-b"}))
    assert [p in both for p in (a, b, c)] == [False, True, False]
    at = Selection(positions=frozenset({"0:3"}))
    assert [p in at for p in (a, b, c)] == [False, False, True]
    unreadable = Parked(0, 9, None)
    assert unreadable.reason == "unreadable" and unreadable in Selection(
        reasons=frozenset({"unreadable"})
    )


def test_only_whole_originals_with_their_key_are_replayable() -> None:
    assert parked(1, ReasonCode.INVALID_JSON, None, b"x", b"M1").not_replayable() is None
    big = b"x" * (256 * 1024 + 1)
    assert parked(2, ReasonCode.EVENT_TOO_LARGE, None, big, b"M1").not_replayable() == (
        "original_truncated"
    )
    # A letter its topic refused whole went out without the original: not a prefix of it.
    whole = parked(8, ReasonCode.INVALID_JSON, None, b"x" * 1000, b"M1").letter
    assert whole is not None
    cut = without_original(whole)
    assert (cut.original_base64, cut.original_size, cut.truncated) == ("", 1000, True)
    assert cut.original_sha256 == whole.original_sha256
    assert Parked(0, 8, cut).not_replayable() == "original_not_kept"
    # An empty original has nothing to leave out: the same letter.
    empty = parked(9, ReasonCode.EMPTY_VALUE, None, b"", b"M1").letter
    assert empty is not None and without_original(empty) is empty
    assert parked(3, ReasonCode.MISSING_KEY, "e", b"{}", b"").not_replayable() == "key_missing"
    assert parked(4, ReasonCode.MISSING_KEY, "e", b"{}", None).not_replayable() == "key_missing"
    long_key = b"M" * 2000
    assert parked(5, ReasonCode.INVALID_JSON, None, b"x", long_key).not_replayable() == (
        "key_truncated"
    )
    assert Parked(0, 6, None).not_replayable() == "unreadable"
    assert parked(7, ReasonCode.EMPTY_VALUE, None, b"", b"M1").not_replayable() == (
        "original_empty"
    )


def test_an_original_the_workers_would_refuse_again_is_not_replayable() -> None:
    [raw] = generate_events(1, seed=7, domains=["mail.example.test"], weights=None)
    strict = refusal_check(allow_test_domains=False)
    lenient = refusal_check(allow_test_domains=True)
    assert (strict(raw), lenient(raw)) == ("invalid_address", None)
    parked_test_domain = parked(1, ReasonCode.INVALID_ADDRESS, "ev-a", raw, b"M1")
    still = _checked(parked_test_domain, strict)
    assert (still.not_replayable(), still.refused_now) == ("still_refused", "invalid_address")
    assert still.summary()["refused_now"] == "invalid_address"
    fixed = _checked(parked_test_domain, lenient)
    assert (fixed.not_replayable(), fixed.refused_now) == (None, None)
    # The reason it gets now, which need not be the one it was parked for.
    bad_json = _checked(parked(2, ReasonCode.UNSUPPORTED_SCHEMA, None, b"{", b"M1"), lenient)
    assert bad_json.refused_now == "invalid_json"
    # What cannot be sent anyway is not checked: its cause stays the reason it is skipped.
    cut = _checked(parked(3, ReasonCode.INVALID_JSON, None, b"x", b"M" * 2000), lenient)
    assert (cut.not_replayable(), cut.refused_now) == ("key_truncated", None)
    assert _checked(Parked(0, 4, None), lenient).not_replayable() == "unreadable"


def test_a_damaged_dead_letter_is_unreadable_not_a_crash() -> None:
    good = parked(1, ReasonCode.INVALID_JSON, None, b"x", b"M1").letter
    assert good is not None
    for damage in ({"original_base64": "not base64!"}, {"key_base64": "%%%"}):
        value = good.model_copy(update=damage).model_dump_json(by_alias=True).encode()
        record = TopicRecord(0, 5, b"M1", value, 0)
        unreadable = _parked(record, "eob.events")
        assert unreadable.letter is None and unreadable.reason == "unreadable"
    assert _parked(TopicRecord(0, 6, None, b"{not json", 0), "eob.events").reason == "unreadable"
    assert _parked(letter_record(7, good), "eob.events").letter


def test_a_dead_letter_read_from_another_topic_is_never_replayable() -> None:
    # A verification result the workers could not read is parked on the same DLQ; an
    # original that happens to be a valid eob.issued/v1 event (published to the wrong
    # topic) would otherwise pass the check and go to the input topic.
    [raw] = generate_events(1, seed=8, domains=["mail.example.test"], weights=None)
    results = SourcePosition(topic="eob.address-verification.results", partition=2, offset=9)
    letter = dead_letter(
        raw, b"M1", reason=ReasonCode.UNSUPPORTED_SCHEMA, field="schema", event_id=None,
        source=results,
    )  # fmt: skip
    lenient = refusal_check(allow_test_domains=True)
    assert lenient(raw) is None
    elsewhere = _checked(_parked(letter_record(3, letter), "eob.events"), lenient)
    assert (elsewhere.not_replayable(), elsewhere.refused_now) == ("other_topic", None)
    row = elsewhere.summary()
    assert row["source"] == "eob.address-verification.results/2/9"
    assert (row["replayable"], row["reason"], row["field"]) == (
        False,
        "unsupported_schema",
        "schema",
    )
    # Read against the topic it came from, the same letter would be replayable.
    assert _parked(letter_record(3, letter), results.topic).not_replayable() is None


def test_a_summary_holds_neither_the_original_nor_the_key() -> None:
    row = parked(1, ReasonCode.INVALID_ADDRESS, "ev-a", b'{"name": "Jane Roe"}', b"M-777").summary()
    text = repr(row)
    assert "Jane" not in text and "M-777" not in text
    assert "SmFuZSBSb2U" not in text and "TS03Nzc" not in text  # nor in base64
    assert row["event_id"] == "ev-a" and row["reason"] == "invalid_address"
    assert dt.datetime.fromisoformat(row["rejected_at"]).tzinfo is not None
    # Every row has the same keys, an unreadable record's as nulls.
    assert Parked(0, 9, None).summary().keys() == row.keys()


def _config(tmp_path: Path, port: int, *, audit_key: bool = True) -> Path:
    """A configuration with its audit trail and member-reference key (made, unless not
    `audit_key`, as the workers' first start would) under `tmp_path`."""
    path = tmp_path / "eobblast.toml"
    path.write_text(
        f'[kafka]\nbootstrap = "127.0.0.1:{port}"\n[portal]\n'
        f'audit_url = "sqlite:///{tmp_path / "audit.db"}"\n'
        f'audit_key_file = "{tmp_path / "keys" / "audit.key"}"\n'
        f'escrow_url = "sqlite:///{tmp_path / "escrow.db"}"\n'
        f'key_dir = "{tmp_path / "keys"}"\n'
    )
    if audit_key:
        asyncio.run(hold_secrets(portal_secrets(load_config(path))[1:], create=True))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_replay_wants_a_selection_and_positions_are_checked(tmp_path: Path) -> None:
    config = str(_config(tmp_path, _closed_port()))
    runner = CliRunner()
    nothing = runner.invoke(main, ["dlq", "replay", "--config", config])
    assert nothing.exit_code == 2
    # Nothing was given: "not both" would say something the operator did not do.
    assert nothing.output.endswith(
        "Error: name what to replay (--reason, --event-id, --at), or say --all\n"
    )
    for wrong in ("three", "1:²", "1", "a:b"):
        bad = runner.invoke(main, ["dlq", "replay", "--config", config, "--at", wrong])
        assert bad.exit_code == 2 and "PARTITION:OFFSET" in bad.output, wrong
    both = runner.invoke(main, ["dlq", "replay", "--config", config, "--all", "--at", "0:1"])
    assert both.exit_code == 2
    assert " ".join(both.output.split()).endswith(
        "Error: --all replays every dead letter: give it alone, or name what to replay"
        " (--reason, --event-id, --at) without it"
    )
    for wrong in ("Jane Roe", "jane@example.com", "-x", "a" * 65):
        bad = runner.invoke(main, ["dlq", "replay", "--config", config, "--all", "--actor", wrong])
        assert bad.exit_code == 2 and "--actor" in bad.output, wrong
    reason = runner.invoke(main, ["dlq", "list", "--config", config, "--reason", "nonsense"])
    assert reason.exit_code == 2


@pytest.mark.parametrize("command", [["list"], ["replay", "--all"]])
def test_an_unreachable_broker_is_a_clear_error(tmp_path: Path, command: list[str]) -> None:
    port = _closed_port()
    result = CliRunner().invoke(main, ["dlq", *command, "--config", str(_config(tmp_path, port))])
    assert result.exit_code == 1, result.output
    assert f"Kafka at 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output and "internal_error" not in result.output


def test_a_replay_without_the_member_reference_key_sends_nothing(tmp_path: Path) -> None:
    # It could not be recorded in the audit trail: refused before Kafka is asked anything.
    config = _config(tmp_path, _closed_port(), audit_key=False)
    result = CliRunner().invoke(main, ["dlq", "replay", "--config", str(config), "--all"])
    assert result.exit_code == 1, result.output
    assert "member-reference key" in result.output and "Kafka at" not in result.output
    # Told to copy the workers' key, not to make one (which would name members apart).
    assert "copy it from a worker host" in result.output
    assert "keys secrets" not in result.output and "--dry-run" in result.output
    assert not (tmp_path / "keys" / "audit.key").exists()
    # A dry run sends nothing, so records nothing and needs no key.
    dry = CliRunner().invoke(main, ["dlq", "replay", "--config", str(config), "--all", "--dry-run"])
    assert "member-reference key" not in dry.output and "Kafka at" in dry.output


def test_positions_are_compared_as_numbers() -> None:
    assert _dlq_selection((), (), ("0:03", "002:10")).positions == {"0:3", "2:10"}


class _Producer:
    """A producer whose sends end as `outcomes` says, by send: "ok", "refused" (the record,
    at send), "timeout" (after it was sent); `stop` raises `stop_error` if set."""

    def __init__(self, outcomes: list[str], stop_error: BaseException | None = None) -> None:
        self.outcomes = outcomes
        self.stop_error = stop_error
        self.sent: list[bytes] = []

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
        outcome = self.outcomes[len(self.sent)]
        self.sent.append(value)
        if outcome == "refused":
            raise MessageSizeTooLargeError("too large")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if outcome == "timeout":
            future.set_exception(RequestTimedOutError())
        else:
            future.set_result(None)
        return future

    async def stop(self) -> None:
        if self.stop_error is not None:
            raise self.stop_error


def _replay_against(
    monkeypatch: pytest.MonkeyPatch,
    producer: _Producer,
    *,
    second_read_fails_after: int = 99,
    offset_step: int = 1,
    audit: ReplayAudit | None = None,
) -> dlq_module.ReplayReport:
    """`replay --all` of six replayable dead letters (members M0..M5; the last without an
    event id), with `producer` and a DLQ read that fails in the sending phase after
    `second_read_fails_after` records; recorded in `audit`, if given."""
    letters = [
        letter_record(
            i,
            parked(
                i, ReasonCode.INVALID_ADDRESS, f"ev-{i}" if i < 5 else None, b"{}", f"M{i}".encode()
            ).letter,
        )
        for i in range(0, 6 * offset_step, offset_step)
    ]
    reads = 0

    async def read_to_end(*_: Any, **__: Any) -> AsyncIterator[TopicRecord]:
        nonlocal reads
        reads += 1
        for count, record in enumerate(letters):
            if reads == 2 and count == second_read_fails_after:
                raise BrokerUnavailable("sent nothing of the DLQ for 30 s")
            yield record

    async def started(*_: Any) -> None:
        return None

    monkeypatch.setattr(dlq_module, "read_to_end", read_to_end)
    monkeypatch.setattr(dlq_module, "make_producer", lambda *_, **__: producer)
    monkeypatch.setattr(dlq_module, "start_or_unavailable", started)
    return asyncio.run(
        dlq_module.replay("b:1", "dlq", "eob.events", Selection(), security=PLAINTEXT, audit=audit)
    )


KEY = b"r" * 32


def _trail(path: Path) -> AuditTrail:
    return asyncio.run(open_audit(f"sqlite:///{path}"))


def test_a_replay_records_who_replayed_what_the_broker_took(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trail = _trail(tmp_path / "audit.db")
    audit = ReplayAudit(trail, KEY, "ops-jane")
    # Two sends time out: only the four the broker took are recorded, before the error.
    producer = _Producer(["ok", "timeout", "ok", "ok", "timeout", "ok"])
    with pytest.raises(dlq_module.ReplayInterrupted):
        _replay_against(monkeypatch, producer, audit=audit)
    records = asyncio.run(trail.records())
    assert [(r.event_id, r.item_id) for r in records] == [
        ("ev-0", "0:0"),
        ("ev-2", "0:2"),
        ("ev-3", "0:3"),
        ("dlq:0:5", "0:5"),  # a letter without an event id: named by its position
    ]
    assert {(r.action, r.actor, r.reason) for r in records} == {
        (AuditAction.DLQ_REPLAYED, "ops-jane", "invalid_address")
    }
    assert [r.member_ref for r in records] == [member_ref(KEY, f"M{i}") for i in (0, 2, 3, 5)]
    assert "M0" not in repr(records)
    # A dry run sends nothing and records nothing.
    asyncio.run(
        dlq_module.replay(
            "b:1", "dlq", "eob.events", Selection(), security=PLAINTEXT, audit=audit, dry_run=True
        )
    )
    assert len(asyncio.run(trail.records())) == 4
    asyncio.run(trail.close())


class _RefusingTrail(AuditTrail):
    async def append(self, record: Any) -> None:
        raise AuditError("audit database unavailable")

    async def records(self, event_id: str | None = None, since: Any = None) -> list[Any]:
        return []

    async def close(self) -> None:
        return None


def test_a_replay_the_trail_refuses_says_what_was_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    audit = ReplayAudit(_RefusingTrail(), KEY, "ops-jane")
    with pytest.raises(dlq_module.ReplayNotAudited) as refused:
        _replay_against(monkeypatch, _Producer(["ok"] * 6), audit=audit)
    assert refused.value.report.as_dict()["replayed"] == 6
    assert str(refused.value) == "AuditError"


def test_a_replay_counts_only_what_the_broker_acknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two sends time out after going out: the rest are still waited for and counted.
    producer = _Producer(["ok", "timeout", "ok", "ok", "timeout", "ok"])
    with pytest.raises(dlq_module.ReplayInterrupted) as stopped:
        _replay_against(monkeypatch, producer)
    assert len(producer.sent) == 6
    counts = stopped.value.report.as_dict()
    assert (counts["replayed"], counts["not_acknowledged"]) == (4, 2)
    assert str(stopped.value) == "RequestTimedOutError"

    # Records refused for themselves are skipped and the others go: no interruption.
    report = _replay_against(
        monkeypatch, _Producer(["ok", "ok", "refused", "ok", "ok", "refused"]), offset_step=4
    )
    assert report.as_dict()["replayed"] == 4
    assert report.as_dict()["refused_by_broker_at"] == ["0:8", "0:20"]  # in offset order
    assert report.skipped == {"refused_by_broker": 2}

    # The DLQ read stalls after three: those three were acknowledged, three never sent.
    with pytest.raises(dlq_module.ReplayInterrupted) as stalled:
        _replay_against(monkeypatch, _Producer(["ok"] * 6), second_read_fails_after=3)
    counts = stalled.value.report.as_dict()
    assert (counts["replayed"], counts["not_acknowledged"]) == (3, 3)
    assert str(stalled.value) == "sent nothing of the DLQ for 30 s"

    # Everything acknowledged, then the producer's stop fails: the counts still come out.
    with pytest.raises(dlq_module.ReplayInterrupted) as at_stop:
        _replay_against(monkeypatch, _Producer(["ok"] * 6, stop_error=KafkaError()))
    counts = at_stop.value.report.as_dict()
    assert (counts["replayed"], counts["not_acknowledged"]) == (6, 0)


def test_the_readme_shows_the_replay_counts_as_the_command_prints_them() -> None:
    # It once said `replayed` by reason and `skipped` by cause: they are totals, with the
    # breakdowns in keys of their own, and a script reading the README would break.
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [row] = [line for line in readme.splitlines() if line.startswith("| `eobblast dlq replay")]
    [shown] = [
        example for example in re.findall(r"`(\{.*?\})`", row) if example.startswith('{"dry_run"')
    ]
    example = orjson.loads(shown)
    report = ReplayReport(
        replayed=Counter({"invalid_address": 4}),
        skipped=Counter({"still_refused": 1, "other_topic": 1}),
        still_refused=Counter({"missing_field": 1}),
    )
    printed = {"dry_run": False, "interrupted": False, **report.as_dict()}
    assert list(example) == list(printed)
    assert example == printed
