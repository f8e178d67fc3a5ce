"""Which offsets are safe to commit: pure bookkeeping over the records a consumer handed out.

Kafka commits are positions, not acknowledgements: committing offset N for a partition says
"everything below N is finished". Records of one partition finish out of order (SMTP sends
run concurrently), so the committable position is just past the longest prefix of handed-out
records that are all done. Offsets are compared in the order they were handed out, not by
arithmetic: a partition's offsets may have gaps (transaction markers, compaction).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Partition:
    """Progress of one partition since it was assigned."""

    # Handed out and not yet released into the committable position, ascending.
    unreleased: deque[int] = field(default_factory=deque)
    # Handed out, not done.
    pending: set[int] = field(default_factory=set)
    # Done, but waiting behind a lower pending offset.
    finished: set[int] = field(default_factory=set)
    highest: int | None = None
    position: int | None = None
    committed: int | None = None


class OffsetTracker(Generic[K]):
    """Per partition: offsets handed out, offsets done, and the highest position safe to commit.

    Keys are whatever identifies a partition (aiokafka's `TopicPartition`, or a
    `(topic, partition)` tuple). Memory is bounded by the number of unreleased records.
    """

    def __init__(self) -> None:
        self._partitions: dict[K, _Partition] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Records handed out and not yet marked done, over all partitions."""
        return self._in_flight

    @property
    def partitions(self) -> frozenset[K]:
        """Partitions with any recorded progress."""
        return frozenset(self._partitions)

    def in_flight_for(self, key: K) -> int:
        """Records of one partition handed out and not yet marked done."""
        state = self._partitions.get(key)
        return len(state.pending) if state else 0

    def handed_out(self, key: K, offset: int) -> None:
        """Record that the record at `offset` was handed to a worker.

        Offsets of one partition must be handed out in increasing order, as Kafka delivers
        them; anything else means the consumer was repositioned without `forget`.
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        state = self._partitions.get(key)
        if state is None:
            state = self._partitions[key] = _Partition()
        if state.highest is not None and offset <= state.highest:
            raise ValueError(
                f"offset {offset} handed out after {state.highest} for the same partition"
            )
        state.highest = offset
        state.unreleased.append(offset)
        state.pending.add(offset)
        self._in_flight += 1

    def mark_done(self, key: K, offset: int) -> bool:
        """Record that the record at `offset` has its final outcome; False if it is not tracked.

        A record of a forgotten (revoked) partition that finishes late is not tracked, nor is
        a record marked done twice: both are ignored.
        """
        state = self._partitions.get(key)
        if state is None or offset not in state.pending:
            return False
        state.pending.remove(offset)
        state.finished.add(offset)
        self._in_flight -= 1
        unreleased = state.unreleased
        while unreleased and unreleased[0] in state.finished:
            released = unreleased.popleft()
            state.finished.remove(released)
            state.position = released + 1
        return True

    def committable(self) -> dict[K, int]:
        """Offsets to commit now: past the contiguous done prefix, for partitions that advanced."""
        return {
            key: state.position
            for key, state in self._partitions.items()
            if state.position is not None
            and (state.committed is None or state.position > state.committed)
        }

    def mark_committed(self, offsets: Mapping[K, int]) -> None:
        """Record a successful commit of `offsets` (as returned by `committable`)."""
        for key, offset in offsets.items():
            state = self._partitions.get(key)
            if state is not None and (state.committed is None or offset > state.committed):
                state.committed = offset

    def forget(self, keys: Iterable[K]) -> None:
        """Drop all progress of these partitions (they were revoked or are being re-read)."""
        for key in keys:
            state = self._partitions.pop(key, None)
            if state is not None:
                self._in_flight -= len(state.pending)


class OffsetGaps(Generic[K]):
    """Holes in the offsets a consumer is handed, read again before they are believed.

    Offsets of a partition may skip for good reasons (transaction markers, compaction), and
    for a bad one: Tansu stores a produce's records after raising the partition's high
    watermark, so while two producers write one partition a fetch can return the later
    producer's batch before the earlier one's is stored. Those records were acknowledged,
    and a later read finds them, but a consumer that moved past them never does (Apache
    Kafka cannot do this: its high watermark passes only records that are stored).

    So at a hole, the records before it are taken and the partition is read again from the
    first missing offset, until a read asked for at least `settle` seconds after the hole was
    first seen still shows it: then it is real.
    """

    def __init__(self, *, settle: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._settle = settle
        self._clock = clock
        self._next: dict[K, int] = {}  # the offset expected next, per partition
        # A hole being read again: its offset, when it was first seen, when last read again.
        self._reread: dict[K, tuple[int, float, float]] = {}

    def take(self, key: K, offsets: Sequence[int]) -> tuple[int, int | None]:
        """Of a partition's fetched `offsets` (ascending), how many to take, and where to
        read again from (None: take them all). A partition neither seen nor `expect`ed
        since `forget` starts wherever its first fetch does."""
        expected = self._next.get(key)
        for index, offset in enumerate(offsets):
            if expected is not None and offset > expected:
                seen = self._reread.get(key)
                now = self._clock()
                first = seen[1] if seen is not None and seen[0] == expected else now
                # Believed only when what shows it came from a read asked for `settle`
                # after the hole was first seen (records wait in the consumer's buffer: the
                # time they are taken says nothing of when they were fetched).
                if seen is None or seen[0] != expected or seen[2] - first < self._settle:
                    self._reread[key] = (expected, first, now)
                    self._next[key] = expected
                    return index, expected
                del self._reread[key]  # read again late enough, still a hole: a real one
            elif expected is not None and offset == expected:
                self._reread.pop(key, None)  # the records came on a read again
            expected = offset + 1
        if expected is not None:
            self._next[key] = expected
        return len(offsets), None

    def knows(self, key: K) -> bool:
        """Whether an offset is expected next for this partition."""
        return key in self._next

    def expect(self, key: K, offset: int) -> None:
        """The partition's next fetch starts at `offset` (where the consumer was put): a
        first fetch that starts later is a hole, too."""
        self._next[key] = offset

    def forget(self, keys: Iterable[K]) -> None:
        """Forget these partitions (revoked, or repositioned: read from wherever next)."""
        for key in keys:
            self._next.pop(key, None)
            self._reread.pop(key, None)
