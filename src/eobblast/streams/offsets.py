"""Which offsets are safe to commit: pure bookkeeping over the records a consumer handed out.

Kafka commits are positions, not acknowledgements: committing offset N for a partition says
"everything below N is finished". Records of one partition finish out of order (SMTP sends
run concurrently), so the committable position is just past the longest prefix of handed-out
records that are all done. Offsets are compared in the order they were handed out, not by
arithmetic: a partition's offsets may have gaps (transaction markers, compaction).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping
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
