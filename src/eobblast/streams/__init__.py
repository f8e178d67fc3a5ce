"""Kafka: consumers and producers, commit discipline, broker reachability, embedded broker.

Only this package imports aiokafka (through `eobblast.streams.kafka`).
"""

from eobblast.streams.broker import EmbeddedBroker, resolve_tansu_binary
from eobblast.streams.kafka import (
    BrokerUnavailable,
    RebalanceListener,
    TopicCreationFailed,
    TopicPartition,
    backoff_delay,
    create_topics,
    make_consumer,
    make_producer,
    probe_broker,
    wait_for_broker,
)
from eobblast.streams.offsets import OffsetTracker

__all__ = [
    "BrokerUnavailable",
    "EmbeddedBroker",
    "OffsetTracker",
    "RebalanceListener",
    "TopicCreationFailed",
    "TopicPartition",
    "backoff_delay",
    "create_topics",
    "make_consumer",
    "make_producer",
    "probe_broker",
    "resolve_tansu_binary",
    "wait_for_broker",
]
