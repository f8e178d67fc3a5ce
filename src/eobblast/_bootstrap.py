"""A Kafka bootstrap list, `"h1:9092,h2:9092"`, read into (host, port) pairs.

Its own module, importing nothing, so that the configuration can check the list without
pulling in the Kafka client.
"""


def parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    """`"h1:9092,h2:9092"` as `[(host, port), ...]`; IPv6 hosts in brackets. ValueError
    naming the entry that is not host:port."""
    hosts: list[tuple[str, int]] = []
    for part in bootstrap.split(","):
        item = part.strip()
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bootstrap entry {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    return hosts
