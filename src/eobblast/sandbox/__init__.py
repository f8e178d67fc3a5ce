"""Local MX servers that behave like real receivers, for the demo, tests and benchmarks."""

from eobblast.sandbox.ca import (
    TestPki,
    certificate_dns_names,
    certificate_verifies,
    make_test_pki,
)
from eobblast.sandbox.server import (
    Behaviour,
    Received,
    Sandbox,
    SandboxDomain,
    default_sandbox_domains,
    delivery_status_notification,
    rcpt_reply,
    received_header,
    recipient_behaviour,
    sandbox_config_from_toml,
)

__all__ = [
    "Behaviour",
    "Received",
    "Sandbox",
    "SandboxDomain",
    "TestPki",
    "certificate_dns_names",
    "certificate_verifies",
    "default_sandbox_domains",
    "delivery_status_notification",
    "make_test_pki",
    "rcpt_reply",
    "received_header",
    "recipient_behaviour",
    "sandbox_config_from_toml",
]
