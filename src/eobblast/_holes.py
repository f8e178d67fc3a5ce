"""How long a hole in a partition's offsets is read again before it is believed (seconds).

Its own module, importing nothing, so that both the configuration and the Kafka readers
can name it without one pulling in the other.
"""

# Tansu's late batch lands within a millisecond or so.
HOLE_SETTLE = 0.02
# Until a hole is believed its partition is fetched again and again: longer than this holds
# each real hole's partition, and the broker, for nothing.
MAX_HOLE_SETTLE = 1.0
