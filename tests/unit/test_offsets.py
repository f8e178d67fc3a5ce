"""OffsetTracker: the committed position never passes a record that is not done."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from eobblast.streams.offsets import OffsetGaps, OffsetTracker

P0 = ("eob.events", 0)
P1 = ("eob.events", 1)


def tracker_with(key: tuple[str, int], offsets: list[int]) -> OffsetTracker[tuple[str, int]]:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in offsets:
        tracker.handed_out(key, offset)
    return tracker


def test_nothing_is_committable_before_anything_is_done() -> None:
    tracker = tracker_with(P0, [0, 1, 2])
    assert tracker.committable() == {}
    assert tracker.in_flight == 3


def test_commit_stops_before_the_first_record_not_done() -> None:
    tracker = tracker_with(P0, [0, 1, 2, 3])
    tracker.mark_done(P0, 0)
    tracker.mark_done(P0, 2)
    tracker.mark_done(P0, 3)
    assert tracker.committable() == {P0: 1}
    tracker.mark_done(P0, 1)
    assert tracker.committable() == {P0: 4}
    assert tracker.in_flight == 0


def test_done_out_of_order_waits_for_the_head() -> None:
    tracker = tracker_with(P0, [10, 11, 12])
    tracker.mark_done(P0, 12)
    tracker.mark_done(P0, 11)
    assert tracker.committable() == {}
    tracker.mark_done(P0, 10)
    assert tracker.committable() == {P0: 13}


def test_gaps_in_offsets_do_not_block_the_commit() -> None:
    # Offsets skip values on compacted topics and around transaction markers.
    tracker = tracker_with(P0, [5, 7, 20])
    for offset in (20, 7, 5):
        tracker.mark_done(P0, offset)
    assert tracker.committable() == {P0: 21}


def test_only_partitions_that_advanced_since_the_last_commit() -> None:
    tracker = tracker_with(P0, [0, 1])
    tracker.handed_out(P1, 0)
    tracker.mark_done(P0, 0)
    tracker.mark_done(P1, 0)
    first = tracker.committable()
    assert first == {P0: 1, P1: 1}
    tracker.mark_committed(first)
    assert tracker.committable() == {}
    tracker.mark_done(P0, 1)
    assert tracker.committable() == {P0: 2}


def test_a_failed_commit_leaves_the_offsets_committable() -> None:
    tracker = tracker_with(P0, [0])
    tracker.mark_done(P0, 0)
    assert tracker.committable() == {P0: 1}
    # The commit raised: mark_committed was never called.
    assert tracker.committable() == {P0: 1}


def test_an_older_commit_confirmation_does_not_move_back() -> None:
    tracker = tracker_with(P0, [0, 1, 2])
    tracker.mark_done(P0, 0)
    tracker.mark_committed({P0: 1})
    tracker.mark_done(P0, 1)
    tracker.mark_done(P0, 2)
    tracker.mark_committed({P0: 3})
    tracker.mark_committed({P0: 1})
    assert tracker.committable() == {}


def test_forget_drops_a_revoked_partition_and_its_in_flight_records() -> None:
    tracker = tracker_with(P0, [0, 1])
    tracker.handed_out(P1, 0)
    tracker.mark_done(P0, 0)
    tracker.forget([P0])
    assert tracker.in_flight == 1
    assert tracker.partitions == frozenset({P1})
    assert tracker.committable() == {}
    # The record that was in flight when P0 was revoked finishes late: ignored.
    assert tracker.mark_done(P0, 1) is False
    assert tracker.in_flight == 1


def test_a_reassigned_partition_starts_afresh() -> None:
    tracker = tracker_with(P0, [0, 1, 2])
    tracker.forget([P0])
    tracker.handed_out(P0, 1)  # re-delivered from the committed offset
    tracker.mark_done(P0, 1)
    assert tracker.committable() == {P0: 2}


def test_forget_of_unknown_partitions_is_harmless() -> None:
    tracker = tracker_with(P0, [0])
    tracker.forget([P1, ("other", 3)])
    assert tracker.in_flight == 1


def test_marking_twice_or_unknown_offsets_is_ignored() -> None:
    tracker = tracker_with(P0, [0, 1])
    assert tracker.mark_done(P0, 0) is True
    assert tracker.mark_done(P0, 0) is False
    assert tracker.mark_done(P0, 5) is False
    assert tracker.mark_done(P1, 0) is False
    assert tracker.in_flight == 1
    assert tracker.committable() == {P0: 1}


def test_in_flight_per_partition() -> None:
    tracker = tracker_with(P0, [0, 1, 2])
    tracker.handed_out(P1, 7)
    tracker.mark_done(P0, 1)
    assert tracker.in_flight_for(P0) == 2
    assert tracker.in_flight_for(P1) == 1
    assert tracker.in_flight_for(("other", 0)) == 0
    assert tracker.in_flight == 3


@pytest.mark.parametrize("offsets", [[3, 3], [3, 2], [0, 5, 4]])
def test_offsets_must_increase_per_partition(offsets: list[int]) -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    with pytest.raises(ValueError, match="handed out after"):
        for offset in offsets:
            tracker.handed_out(P0, offset)


def test_offsets_may_restart_low_on_another_partition() -> None:
    tracker = tracker_with(P0, [100])
    tracker.handed_out(P1, 0)
    assert tracker.partitions == frozenset({P0, P1})


def test_negative_offsets_are_refused() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    with pytest.raises(ValueError, match="negative"):
        tracker.handed_out(P0, -1)


def test_memory_is_released_as_the_prefix_completes() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in range(10_000):
        tracker.handed_out(P0, offset)
        tracker.mark_done(P0, offset)
    state = tracker._partitions[P0]
    assert not state.unreleased and not state.pending and not state.finished
    assert tracker.committable() == {P0: 10_000}


@st.composite
def handed_and_done(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Increasing offsets with gaps, and the order in which some of them finish."""
    gaps = draw(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=40))
    start = draw(st.integers(min_value=0, max_value=1_000))
    offsets = [start + sum(gaps[:i]) for i in range(len(gaps))]
    done = draw(st.permutations(offsets))
    return offsets, done[: draw(st.integers(min_value=0, max_value=len(done)))]


@given(handed_and_done())
def test_committed_position_is_the_end_of_the_done_prefix(
    case: tuple[list[int], list[int]],
) -> None:
    offsets, done = case
    tracker = tracker_with(P0, offsets)
    for offset in done:
        tracker.mark_done(P0, offset)
    finished = set(done)
    prefix = 0
    while prefix < len(offsets) and offsets[prefix] in finished:
        prefix += 1
    expected = {P0: offsets[prefix - 1] + 1} if prefix else {}
    assert tracker.committable() == expected
    assert tracker.in_flight == len(offsets) - len(done)


class TrackerMachine(RuleBasedStateMachine):
    """Random interleavings of hand-out, done, commit and revoke over two partitions."""

    handed = Bundle("handed")

    def __init__(self) -> None:
        super().__init__()
        self.tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
        self.next_offset = {P0: 0, P1: 0}
        self.not_done: dict[tuple[str, int], set[int]] = {P0: set(), P1: set()}
        self.committed: dict[tuple[str, int], int] = {}

    @rule(target=handed, key=st.sampled_from([P0, P1]), gap=st.integers(min_value=1, max_value=3))
    def hand_out(self, key: tuple[str, int], gap: int) -> tuple[tuple[str, int], int]:
        offset = self.next_offset[key] + gap - 1
        self.next_offset[key] = offset + 1
        self.tracker.handed_out(key, offset)
        self.not_done[key].add(offset)
        return key, offset

    @rule(item=consumes(handed))
    def finish(self, item: tuple[tuple[str, int], int]) -> None:
        key, offset = item
        expected = offset in self.not_done[key]
        assert self.tracker.mark_done(key, offset) is expected
        self.not_done[key].discard(offset)

    @rule()
    def commit(self) -> None:
        offsets = self.tracker.committable()
        for key, offset in offsets.items():
            # Never past a record that is not done, never backwards.
            assert all(offset <= pending for pending in self.not_done[key])
            assert offset > self.committed.get(key, -1)
            self.committed[key] = offset
        self.tracker.mark_committed(offsets)
        assert self.tracker.committable() == {}

    @precondition(lambda self: any(self.not_done.values()) or self.committed)
    @rule(key=st.sampled_from([P0, P1]))
    def revoke(self, key: tuple[str, int]) -> None:
        self.tracker.forget([key])
        self.not_done[key] = set()
        # The group resumes from the committed offset; re-delivery starts there.
        self.next_offset[key] = self.committed.get(key, 0)
        self.committed.pop(key, None)

    @invariant()
    def counts_match(self) -> None:
        assert self.tracker.in_flight == sum(len(v) for v in self.not_done.values())

    @invariant()
    def committable_never_passes_a_pending_record(self) -> None:
        for key, offset in self.tracker.committable().items():
            assert all(offset <= pending for pending in self.not_done[key])


TrackerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60)
test_tracker_state_machine = TrackerMachine.TestCase


def test_a_hole_is_read_again_until_it_is_old_enough_to_believe() -> None:
    now = [0.0]
    gaps: OffsetGaps[tuple[str, int]] = OffsetGaps(settle=1.0, clock=lambda: now[0])
    assert gaps.take(P0, [10, 11, 12]) == (3, None)  # a first fetch starts anywhere
    # 13-14 skipped (a batch the broker had not stored yet): nothing of 15 on is taken,
    # and the partition is read again from 13.
    assert gaps.take(P0, [15, 16]) == (0, 13)
    assert gaps.take(P0, [13, 14, 15, 16]) == (4, None)  # they came: nothing lost
    # Within a fetch, too: the records before the hole are taken.
    assert gaps.take(P0, [17, 18, 21, 22]) == (2, 19)
    # Still a hole: read again while the reads asked for are younger than `settle`...
    now[0] = 0.5
    assert gaps.take(P0, [21, 22]) == (0, 19)
    now[0] = 1.0
    assert gaps.take(P0, [21, 22]) == (0, 19)  # what shows it was asked for at 0.5
    # ... and believed once a read asked for `settle` after it was first seen shows it
    # still (a transaction marker, compaction).
    assert gaps.take(P0, [21, 22]) == (2, None)
    # Records taken long after they were fetched say nothing of when: a hole first seen
    # at 1.0 and shown again at 5.0 by a read asked for at 1.0 is read once more.
    assert gaps.take(P0, [23, 30]) == (1, 24)
    now[0] = 5.0
    assert gaps.take(P0, [30]) == (0, 24)
    assert gaps.take(P0, [30]) == (1, None)
    # Offsets from before (a seek back after a failure) are taken as they come.
    assert gaps.take(P0, [25, 26]) == (2, None)
    assert gaps.take(P0, []) == (0, None)
    assert gaps.take(P0, [27]) == (1, None)


def test_a_hole_is_read_again_at_least_once_even_without_a_settle_time() -> None:
    gaps: OffsetGaps[tuple[str, int]] = OffsetGaps(settle=0.0, clock=lambda: 7.0)
    gaps.expect(P0, 0)
    assert gaps.take(P0, [2]) == (0, 0)
    assert gaps.take(P0, [2]) == (1, None)


def test_partitions_are_separate_and_a_forgotten_one_starts_anywhere() -> None:
    gaps: OffsetGaps[tuple[str, int]] = OffsetGaps(settle=0.0)
    assert gaps.take(P0, [0, 1]) == (2, None)
    assert gaps.take(P1, [100]) == (1, None)
    assert gaps.take(P0, [5]) == (0, 2)
    assert gaps.take(P1, [101]) == (1, None)
    # Revoked and given back after another member read on: no hole to read again.
    gaps.forget([P0])
    assert not gaps.knows(P0)
    assert gaps.take(P0, [500, 501]) == (2, None)
    assert gaps.take(P0, [505]) == (0, 502)
    # Told where the next fetch starts, a first fetch that starts later is a hole.
    gaps.forget([P0])
    gaps.expect(P0, 600)
    assert gaps.take(P0, [603]) == (0, 600)


@given(
    st.lists(st.booleans(), min_size=1, max_size=60),
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=30),
    st.sets(st.integers(min_value=0, max_value=120)),
)
@settings(max_examples=200, deadline=None)
def test_a_reader_that_rereads_holes_gets_every_record_a_late_broker_stored(
    late: list[bool], sizes: list[int], missing: set[int]
) -> None:
    # A partition whose batches may reach the broker's store late (a fetch that could have
    # served one finds it missing once; it lands right after), and whose offsets also
    # have real holes (`missing`: transaction markers). A reader that re-reads each hole
    # until it is `settle` old gets every record, in order, and believes every real hole.
    batches, start = [], 0
    for size in sizes:
        batch = [o for o in range(start, start + size) if o not in missing]
        start += size
        if batch:
            batches.append(batch)
    records = [offset for batch in batches for offset in batch]
    stored_late = [late[i % len(late)] for i in range(len(batches))]
    now = [0.0]
    gaps: OffsetGaps[tuple[str, int]] = OffsetGaps(settle=0.05, clock=lambda: now[0])
    gaps.expect(P0, 0)  # where the reader starts: a first fetch that skips is a hole too
    position, looks = 0, 0
    got: list[int] = []
    while got != records and looks < 50 * (len(records) + 10):
        looks += 1
        now[0] += 0.01  # each fetch takes a while
        served = []
        for index, batch in enumerate(batches):
            if batch[-1] < position:
                continue
            if stored_late[index]:
                stored_late[index] = False  # missing from this fetch, stored by the next
                continue
            served += [offset for offset in batch if offset >= position]
        count, again = gaps.take(P0, served)
        got += served[:count]
        if again is not None:
            position = again
        elif count:
            position = served[count - 1] + 1
    assert got == records
