"""The secure portal: members pick up escrowed EOBs after an identity check."""

from eobblast.portal.app import (
    PortalServer,
    Rate,
    create_app,
    csrf_secret_from,
    purge_and_record,
    serve_portal,
)

__all__ = [
    "PortalServer",
    "Rate",
    "create_app",
    "csrf_secret_from",
    "purge_and_record",
    "serve_portal",
]
