"""eobblast: a Kafka-fed bulk email pipeline for Explanation-of-Benefits notices."""

__version__ = "0.1.0"
