"""The path of one EOB: validate, gate, render, sign, deliver, record the outcome."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from eobblast.config import Config
from eobblast.errors import ConfigError, DeliveryError, Outcome, ReasonCode
from eobblast.events import EobIssued, Rejection, validate_event
from eobblast.observe import metrics
from eobblast.protect.dkim import DkimSigner, load_signer
from eobblast.render import Renderer
from eobblast.transport import Transport

log = logging.getLogger("eobblast.pipeline")


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """The final status of one event, as recorded in status events, metrics and summaries."""

    event_id: str | None
    outcome: Outcome
    reason: ReasonCode
    latency: float
    smtp_code: int | None = None
    enhanced_status: str | None = None
    tls_version: str | None = None
    field: str | None = None


class SignerStore:
    """DKIM signers per sending domain, loaded once from the key directory."""

    def __init__(self, key_dir: Path, selector: str, *, ed25519: bool) -> None:
        self._key_dir = key_dir
        self._selector = selector
        self._ed25519 = ed25519
        self._signers: dict[str, DkimSigner | None] = {}

    def get(self, domain: str) -> DkimSigner | None:
        """The signer for a domain, or None when it has no key (such mail is never sent)."""
        if domain not in self._signers:
            try:
                signer: DkimSigner | None = load_signer(
                    self._key_dir, domain, self._selector, ed25519=self._ed25519
                )
            except ConfigError:
                log.error("no DKIM key for sending domain", extra={"domain": domain})
                signer = None
            self._signers[domain] = signer
        return self._signers[domain]


class Pipeline:
    """Turns serialised events into delivered, signed messages, one outcome per event."""

    def __init__(
        self, config: Config, transport: Transport, *, signers: SignerStore | None = None
    ) -> None:
        self._config = config
        self._transport = transport
        self._renderer = Renderer(from_local_part=config.pipeline.from_local_part)
        self._signers = signers or SignerStore(
            config.dkim.key_dir, config.dkim.selector, ed25519=config.dkim.ed25519
        )
        self._allow_test_domains = config.pipeline.allow_test_domains

    async def process(self, raw: bytes) -> EventOutcome:
        """Carry one event as far as it may go; never raises for bad input or failed delivery."""
        start = time.perf_counter()
        checked = self.validate(raw, start)
        if isinstance(checked, EventOutcome):
            outcome = checked
        else:
            outcome = await self.deliver(checked, start)
        self.observe(outcome)
        return outcome

    @staticmethod
    def observe(outcome: EventOutcome) -> None:
        """Count a final outcome in the metrics."""
        metrics.EVENTS.labels(outcome.outcome, outcome.reason).inc()
        metrics.STAGE["total"].observe(outcome.latency)

    def validate(self, raw: bytes, start: float) -> EobIssued | EventOutcome:
        """The validated event, or its REJECTED outcome (reason code, field, event id)."""
        event = validate_event(raw, allow_test_domains=self._allow_test_domains)
        t_valid = time.perf_counter()
        metrics.STAGE["validate"].observe(t_valid - start)
        if isinstance(event, Rejection):
            log.info(
                "event rejected",
                extra={"event_id": event.event_id, "reason": event.reason, "field": event.field},
            )
            return EventOutcome(
                event.event_id,
                Outcome.REJECTED,
                event.reason,
                t_valid - start,
                field=event.field,
            )
        return event

    async def deliver(self, event: EobIssued, start: float) -> EventOutcome:
        """Gate, render, sign and deliver a validated event; never raises."""
        try:
            return await self._send(event, start, time.perf_counter())
        except Exception:
            # A bug must not stop the run or lose the event: it is recorded as failed.
            log.exception("internal error while processing an event")
            return EventOutcome(
                event.event_id,
                Outcome.FAILED,
                ReasonCode.INTERNAL_ERROR,
                time.perf_counter() - start,
            )

    async def _send(self, event: EobIssued, start: float, t_valid: float) -> EventOutcome:
        event_id = event.event_id
        if not event.member.consent.electronic_delivery:
            log.info("event held", extra={"event_id": event_id, "reason": ReasonCode.NO_CONSENT})
            return EventOutcome(
                event_id, Outcome.HELD, ReasonCode.NO_CONSENT, time.perf_counter() - start
            )
        signer = self._signers.get(event.payer.sending_domain)
        if signer is None:
            return EventOutcome(
                event_id, Outcome.FAILED, ReasonCode.NO_SIGNING_KEY, time.perf_counter() - start
            )
        message = self._renderer.render(event, now=dt.datetime.now(dt.UTC))
        t_render = time.perf_counter()
        metrics.STAGE["render"].observe(t_render - t_valid)
        data = message.to_bytes(signer.sign(message.headers, message.body))
        t_sign = time.perf_counter()
        metrics.STAGE["sign"].observe(t_sign - t_render)
        try:
            reply = await self._transport.deliver(message.mail_from, message.rcpt_to, data)
        except DeliveryError as exc:
            now = time.perf_counter()
            metrics.STAGE["deliver"].observe(now - t_sign)
            outcome = Outcome.FAILED if exc.permanent else Outcome.DEFERRED
            log.info(
                "delivery did not succeed",
                extra={
                    "event_id": event_id,
                    "outcome": outcome,
                    "reason": exc.reason,
                    "smtp_code": exc.smtp_code,
                },
            )
            return EventOutcome(
                event_id,
                outcome,
                exc.reason,
                now - start,
                smtp_code=exc.smtp_code,
                enhanced_status=(exc.detail.partition(" ")[2] or None) if exc.smtp_code else None,
            )
        now = time.perf_counter()
        metrics.STAGE["deliver"].observe(now - t_sign)
        log.debug("delivered", extra={"event_id": event_id, "tls": reply.tls_version})
        return EventOutcome(
            event_id,
            Outcome.DELIVERED,
            ReasonCode.DELIVERED,
            now - start,
            smtp_code=reply.code,
            enhanced_status=reply.enhanced,
            tls_version=reply.tls_version,
        )
