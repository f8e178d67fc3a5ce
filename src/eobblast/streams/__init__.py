"""Kafka: consumers and producers, commit discipline, broker reachability, embedded broker.

Only this package imports aiokafka (through `eobblast.streams.kafka`).
"""

from eobblast.streams.broker import EmbeddedBroker, resolve_tansu_binary
from eobblast.streams.kafka import (
    BrokerUnavailable,
    KafkaSecurity,
    RebalanceListener,
    TopicCreationFailed,
    TopicPartition,
    backoff_delay,
    create_topics,
    kafka_security,
    make_consumer,
    make_producer,
    probe_broker,
    unprotected_brokers,
    wait_for_broker,
)
from eobblast.streams.offsets import OffsetTracker

__all__ = [
    "BrokerUnavailable",
    "EmbeddedBroker",
    "KafkaSecurity",
    "OffsetTracker",
    "RebalanceListener",
    "TopicCreationFailed",
    "TopicPartition",
    "backoff_delay",
    "create_topics",
    "kafka_security",
    "make_consumer",
    "make_producer",
    "probe_broker",
    "resolve_tansu_binary",
    "unprotected_brokers",
    "wait_for_broker",
]
