"""Observability: Prometheus metrics and PHI-free structured logs."""
