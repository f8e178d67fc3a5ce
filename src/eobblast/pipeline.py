"""The path of one EOB: validate, gate, render, sign, deliver, record the outcome."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from prometheus_client import Counter

from eobblast.bounces.category import BounceCategory
from eobblast.bounces.service import (
    BounceOutcome,
    BounceService,
    Held,
    Resend,
    SendPermitted,
    Settled,
)
from eobblast.bounces.store import STORE_ERRORS
from eobblast.config import Config
from eobblast.errors import ConfigError, DeliveryError, Outcome, ReasonCode, StoreUnavailable
from eobblast.events import EobIssued, Rejection, validate_event
from eobblast.observe import metrics
from eobblast.observe.audit import AuditAction
from eobblast.protect.dkim import DkimSigner, load_signer
from eobblast.protect.escrow import PORTAL_ID_DIGITS, EscrowItem, escrow_eob, last4_digits
from eobblast.protect.mta_sts import StsMode
from eobblast.protect.policy import (
    Decision,
    PolicyReason,
    Preference,
    ProtectionLevel,
    RecipientFacts,
    choose_protection,
)
from eobblast.protect.services import ProtectionServices
from eobblast.protect.smime import SmimeError, smime_message
from eobblast.render import RenderedMessage, Renderer
from eobblast.shaping import ShapingDeferred
from eobblast.streams.kafka import backoff_delay
from eobblast.transport import Transport
from eobblast.transport.pool import SmtpReplyError

log = logging.getLogger("eobblast.pipeline")

T = TypeVar("T")


async def until_written(
    write: Callable[[], Awaitable[T]],
    *,
    what: str,
    event_id: str,
    retries: Counter,
    give_up: Callable[[], bool] = lambda: False,
) -> T:
    """Run a store write until it lands, with backoff, however long its store is away
    (STORE_ERRORS; anything else is raised); its result. Each failure counts in `retries`,
    and every tenth is logged. After a failure, `give_up()` true raises
    StoreUnavailable(what)."""
    attempt = 0
    while True:
        try:
            return await write()
        except STORE_ERRORS as exc:
            if give_up():
                raise StoreUnavailable(what) from None
            attempt += 1
            retries.inc()
            if attempt % 10 == 1:
                log.error(
                    "not written to the %s yet: %s; trying again",
                    what,
                    type(exc).__name__,
                    extra={"event_id": event_id, "attempt": attempt},
                )
            await asyncio.sleep(backoff_delay(attempt, base=0.5, cap=10.0))


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
    protection: str | None = None
    protection_reason: str | None = None
    retry_at: dt.datetime | None = None
    bounce_category: str | None = None


def bounce_event_outcome(decided: BounceOutcome, latency: float) -> EventOutcome:
    """The status of a notice as the bounce service decided it (held, deferred, paper ...)."""
    return EventOutcome(
        decided.event_id,
        decided.outcome,
        ReasonCode(decided.reason),
        latency,
        retry_at=decided.retry_at,
        bounce_category=decided.category,
    )


# A sending domain whose key could not be loaded is looked for again after this many seconds,
# so a key added (or mended) while the workers run is used without a restart.
MISSING_KEY_RETRY = 60.0
# Domains remembered as keyless at most: an input naming ever new domains cannot grow it.
MISSING_KEYS_KEPT = 1024


class SignerStore:
    """DKIM signers per sending domain, loaded from the key directory when first needed.

    A domain without a usable key gets None (its mail is never sent unsigned), logged with
    the cause once per `MISSING_KEY_RETRY`, after which the directory is read again.
    """

    def __init__(
        self,
        key_dir: Path,
        selector: str,
        *,
        ed25519: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key_dir = key_dir
        self._selector = selector
        self._ed25519 = ed25519
        self._clock = clock
        self._signers: dict[str, DkimSigner] = {}
        self._missing: dict[str, float] = {}  # domain -> when to look for its key again

    def get(self, domain: str) -> DkimSigner | None:
        """The signer for a domain, or None when it has no usable key."""
        signer = self._signers.get(domain)
        if signer is not None:
            return signer
        now = self._clock()
        if now < self._missing.get(domain, now):
            return None
        try:
            signer = load_signer(self._key_dir, domain, self._selector, ed25519=self._ed25519)
        except ConfigError as exc:
            # The cause names the key file (domain and selector), never an event's content.
            log.error(
                "no DKIM key for sending domain",
                extra={"domain": domain, "cause": exc.detail, "retry_in_s": MISSING_KEY_RETRY},
            )
            self._missing.pop(domain, None)  # kept in order of retry time
            if len(self._missing) >= MISSING_KEYS_KEPT:
                del self._missing[next(iter(self._missing))]  # the one due soonest
            self._missing[domain] = now + MISSING_KEY_RETRY
            return None
        self._missing.pop(domain, None)
        self._signers[domain] = signer
        return signer


class Pipeline:
    """Turns serialised events into delivered, signed messages, one outcome per event."""

    def __init__(
        self,
        config: Config,
        transport: Transport,
        *,
        signers: SignerStore | None = None,
        protection: ProtectionServices | None = None,
        actor: str = "eobblast",
        bounces: BounceService | None = None,
    ) -> None:
        self._config = config
        self._bounces = bounces
        self._transport = transport
        self._protection = protection or ProtectionServices.policy_only(config)
        self._actor = actor
        self._renderer = Renderer(from_local_part=config.pipeline.from_local_part)
        self._signers = signers or SignerStore(
            config.dkim.key_dir, config.dkim.selector, ed25519=config.dkim.ed25519
        )
        self._allow_test_domains = config.pipeline.allow_test_domains
        # First sends the receiver took whose delivery the bounce store has not recorded
        # yet, by event id, with the address they went to: an attempt run again (the worker
        # gave the first up as stuck while the store was away) records the delivery instead
        # of sending a second copy. Oldest first; bounded (an attempt cut short for good,
        # its partition gone elsewhere, leaves its entry behind).
        self._sent_unrecorded: OrderedDict[str, tuple[EventOutcome, str]] = OrderedDict()

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
        """Count a final outcome in the metrics; a rejection is logged here, with the reason
        it is counted and parked under (a record without a key may also fail validation)."""
        metrics.EVENTS.labels(outcome.outcome, outcome.reason).inc()
        metrics.STAGE["total"].observe(outcome.latency)
        if outcome.outcome is Outcome.REJECTED:
            log.info(
                "event rejected",
                extra={
                    "event_id": outcome.event_id,
                    "reason": outcome.reason,
                    "field": outcome.field,
                },
            )

    def validate(self, raw: bytes, start: float) -> EobIssued | EventOutcome:
        """The validated event, or its REJECTED outcome (reason code, field, event id)."""
        event = validate_event(raw, allow_test_domains=self._allow_test_domains)
        t_valid = time.perf_counter()
        metrics.STAGE["validate"].observe(t_valid - start)
        if isinstance(event, Rejection):
            return EventOutcome(
                event.event_id,
                Outcome.REJECTED,
                event.reason,
                t_valid - start,
                field=event.field,
            )
        return event

    @staticmethod
    def withheld(event: EobIssued, start: float) -> EventOutcome | None:
        """The event's HELD outcome when its member has not consented to e-delivery: no
        email is sent to them, whatever else the event says (`record_withheld` audits it)."""
        if event.member.consent.electronic_delivery:
            return None
        log.info("event held", extra={"event_id": event.event_id, "reason": ReasonCode.NO_CONSENT})
        return EventOutcome(
            event.event_id, Outcome.HELD, ReasonCode.NO_CONSENT, time.perf_counter() - start
        )

    async def record_withheld(self, event: EobIssued) -> None:
        """Audit a notice held for want of e-delivery consent (`held`, `no_consent`): the
        trail says what became of every notice, sent or not."""
        await self._audit(
            event.event_id, AuditAction.HELD, event.member.id, reason=ReasonCode.NO_CONSENT
        )

    async def deliver(
        self,
        event: EobIssued,
        start: float,
        *,
        raw: bytes = b"",
        resend: Resend | None = None,
    ) -> EventOutcome:
        """Gate, render, sign and deliver a validated event.

        Raises only StoreUnavailable, when the bounce gate cannot be reached: nothing was
        decided or sent, and the caller tries again later. Anything else ends as an outcome.
        `raw` is the event as consumed (kept by the bounce service for a hold or a retry);
        `resend` is the bounce service's permission for a retry or a release, in place of
        the gate's. An event this pipeline already sent, whose delivery the bounce store
        has not recorded yet (an attempt given up as stuck), is only recorded.
        """
        try:
            sent = self._sent_unrecorded.get(event.event_id) if resend is None else None
            if sent is not None:
                return await self._record_sent_again(event.event_id, sent, event.member.id)
            outcome = await self._send(event, start, time.perf_counter(), raw, resend)
        except StoreUnavailable:
            raise
        except Exception:
            # A bug must not stop the run or lose the event: it is recorded as failed.
            log.exception("internal error while processing an event")
            outcome = EventOutcome(
                event.event_id,
                Outcome.FAILED,
                ReasonCode.INTERNAL_ERROR,
                time.perf_counter() - start,
            )
        if outcome.reason in _NOTHING_SENT and resend is None and self._bounces is not None:
            await self._not_sent(event)
        return outcome

    async def _not_sent(self, event: EobIssued) -> None:
        """A first send that failed before a message went out: the bounce service forgets
        the notice (see `BounceService.on_not_sent`), however long its store is away."""
        bounces = self._bounces
        assert bounces is not None
        try:
            await until_written(
                lambda: bounces.on_not_sent(event.event_id, event.member.id),
                what="bounce store",
                event_id=event.event_id,
                retries=metrics.DELIVERY_RECORD_RETRIES,
            )
        except Exception as exc:
            # The failed outcome stands; the notice stays "sending" in the store. By type
            # only: a driver's message can quote the row it choked on.
            log.error(
                "bounce store not told of a notice not sent: %s",
                type(exc).__name__,
                extra={"event_id": event.event_id},
            )

    async def _send(
        self,
        event: EobIssued,
        start: float,
        t_valid: float,
        raw: bytes,
        resend: Resend | None,
    ) -> EventOutcome:
        event_id = event.event_id
        withheld = self.withheld(event, start)
        if withheld is not None:
            await self.record_withheld(event)
            return withheld
        signer = self._signers.get(event.payer.sending_domain)
        if signer is None:
            return EventOutcome(
                event_id, Outcome.FAILED, ReasonCode.NO_SIGNING_KEY, time.perf_counter() - start
            )
        if self._bounces is not None:
            # Verify-before-resend: only the bounce service's permission sends, and only to
            # the address it names (a verified address may have replaced the event's).
            to = event.member.email
            if resend is not None:
                to = resend.to
            else:
                try:
                    gate = await self._bounces.gate(event_id, event.member.id, to, raw)
                except STORE_ERRORS as exc:
                    # Its transaction rolled back: nothing decided, nothing to undo. A store
                    # outage (or a lock held too long) is waited out, not a failed notice.
                    raise StoreUnavailable("bounce store") from exc
                match gate:
                    case Held():
                        log.info("event held", extra={"event_id": event_id, "reason": gate.reason})
                        return bounce_event_outcome(gate.outcome, time.perf_counter() - start)
                    case Settled(outcome=settled):
                        return bounce_event_outcome(settled, time.perf_counter() - start)
                    case SendPermitted():
                        to = gate.to
            if to != event.member.email:
                member = event.member.model_copy(update={"email": to})
                event = event.model_copy(update={"member": member})
        services = self._protection
        now = dt.datetime.now(dt.UTC)
        recipient = RecipientFacts.for_member(
            event.member.email, event.member.smime_certificate, Preference(event.member.preference)
        )
        facts = services.tls.facts(recipient.domain, now)
        if not facts.mta_sts_enforce:
            # A fetched `enforce` policy counts as the configured list does.
            policy = await self._transport.mta_sts_policy(recipient.domain)
            if policy is not None and policy.mode is StsMode.ENFORCE:
                facts = replace(facts, mta_sts_enforce=True)
        decision = choose_protection(recipient, facts, services.org, now)
        timing = _Timing(start, t_valid)
        if decision.level is ProtectionLevel.PORTAL:
            return await self._send_portal(event, signer, decision.reason, timing, raw)
        message = self._renderer.render(event, now=now)
        if decision.level is ProtectionLevel.SMIME:
            assert recipient.certificate is not None  # the policy chose S/MIME because of it
            try:
                message = smime_message(message, recipient.certificate)
            except SmimeError:
                log.error("S/MIME encryption failed", extra={"event_id": event_id})
                return timing.outcome(
                    event_id, Outcome.FAILED, ReasonCode.SMIME_FAILED, protection=decision
                )
        timing.rendered()
        outcome = await self._deliver(
            event, signer, message, decision, timing, verified=True, raw=raw
        )
        if outcome.outcome is Outcome.DELIVERED:
            return outcome
        if _portal_instead(outcome.reason, verified=True):
            # Never again in plaintext: this EOB goes as a notice with a pickup link, and
            # the domain is portal-only for a while; not for a dropped line, though, which
            # one network blip can cause (it would send every EOB of, say, gmail.com to
            # the portal for hours).
            if outcome.reason is not ReasonCode.CONNECTION_LOST:
                services.tls.record_failure(recipient.domain, dt.datetime.now(dt.UTC))
            log.info(
                "TLS failed at delivery; protected again as a portal notice",
                extra={"event_id": event_id, "reason": outcome.reason},
            )
            return await self._send_portal(
                event, signer, PolicyReason.TLS_FAILED_AT_DELIVERY, timing, raw
            )
        return outcome

    async def _send_portal(
        self,
        event: EobIssued,
        signer: DkimSigner,
        reason: PolicyReason,
        timing: _Timing,
        raw: bytes,
    ) -> EventOutcome:
        services = self._protection
        decision = Decision(ProtectionLevel.PORTAL, reason)
        event_id = event.event_id
        if services.escrow is None or services.audit is None:
            return timing.outcome(
                event_id, Outcome.FAILED, ReasonCode.PORTAL_UNAVAILABLE, protection=decision
            )
        if (
            event.member.date_of_birth is None
            or len(last4_digits(event.member.id)) < PORTAL_ID_DIGITS
        ):
            # The pickup page confirms identity with the date of birth and the member id's
            # last four digits: without both, a notice nobody could open (or anybody guess).
            return timing.outcome(
                event_id, Outcome.FAILED, ReasonCode.NO_PORTAL_IDENTITY, protection=decision
            )
        now = dt.datetime.now(dt.UTC)
        expires = now + services.item_ttl
        try:
            token = await self._escrow(event, services, expires, reason, now)
        except STORE_ERRORS as exc:
            # Nothing sent. Tried again by the worker: the next try finds the notice
            # "sending" with no lease (a first send is not leased) and routes it afresh, or,
            # without the bounce service, escrows it afresh.
            raise StoreUnavailable("escrow store") from exc
        notice = self._renderer.render_notice(
            event, link=services.portal_base_url + token, expires=expires.date(), now=now
        )
        timing.rendered()
        # The notice carries no PHI: it may travel over whatever TLS the receiver offers.
        return await self._deliver(event, signer, notice, decision, timing, verified=False, raw=raw)

    async def _deliver(
        self,
        event: EobIssued,
        signer: DkimSigner,
        message: RenderedMessage,
        decision: Decision,
        timing: _Timing,
        *,
        verified: bool,
        raw: bytes,
    ) -> EventOutcome:
        event_id = event.event_id
        data = message.to_bytes(signer.sign(message.headers, message.body))
        timing.signed()
        try:
            # With verify-before-resend, the envelope sender is the event's VERP address:
            # asynchronous bounces come back to the bounce listener, mapped to this event.
            mail_from = (
                message.mail_from if self._bounces is None else self._bounces.return_path(event_id)
            )
            reply = await self._transport.deliver(
                mail_from,
                message.rcpt_to,
                data,
                verified_tls=verified,
                # Notices and EOBs may use different IP pools (traffic classes in config).
                traffic_class="eob" if verified else "portal_notice",
            )
        except DeliveryError as exc:
            timing.delivered()
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
            failed = timing.outcome(
                event_id,
                outcome,
                exc.reason,
                protection=decision,
                smtp_code=exc.smtp_code,
                enhanced_status=(exc.detail.partition(" ")[2] or None) if exc.smtp_code else None,
            )
            if isinstance(exc, ShapingDeferred):
                # eobblast held it back itself (no budget, IPs paused): not a bounce.
                failed = replace(failed, retry_at=dt.datetime.fromtimestamp(exc.retry_at, dt.UTC))
                if self._bounces is None:
                    return failed
                return await self._postpone(event, message.rcpt_to, raw, failed)
            if self._bounces is None or _portal_instead(exc.reason, verified=verified):
                return failed  # not a bounce: _send protects it again as a portal notice
            return await self._bounce(event, message.rcpt_to, raw, exc, failed)
        timing.delivered()
        # Its latency ends at the receiver's acceptance, not after the records below.
        delivered = timing.outcome(
            event_id,
            Outcome.DELIVERED,
            ReasonCode.DELIVERED,
            protection=decision,
            smtp_code=reply.code,
            enhanced_status=reply.enhanced,
            tls_version=reply.tls_version,
        )
        if self._bounces is not None:
            self._remember_sent(event_id, delivered, message.rcpt_to)
            await self._record_delivery(event_id, message.rcpt_to, event.member.id)
            self._sent_unrecorded.pop(event_id, None)
        if reply.tls_verified and reply.tls_version is not None:
            self._protection.tls.record_verified(
                message.rcpt_to.rpartition("@")[2].lower(), dt.datetime.now(dt.UTC)
            )
        await self._audit_sent(
            event_id, event.member.id, decision.level, decision.reason, message.rcpt_to
        )
        log.debug("delivered", extra={"event_id": event_id, "tls": reply.tls_version})
        return delivered

    async def _escrow(
        self,
        event: EobIssued,
        services: ProtectionServices,
        expires: dt.datetime,
        reason: PolicyReason,
        now: dt.datetime,
    ) -> str:
        """Escrow the EOB for the portal; returns the pickup token."""
        assert services.escrow is not None and services.audit is not None
        assert event.member.date_of_birth is not None
        return await escrow_eob(
            services.escrow,
            services.audit,
            EscrowItem(
                event_id=event.event_id,
                member_ref=services.member_ref(event.member.id),
                member_id=event.member.id,
                date_of_birth=event.member.date_of_birth,
                html=self._renderer.render_html(event),
                expires_at=expires,
                language=event.member.preferred_language,
            ),
            actor=self._actor,
            reason=reason,
            now=now,
        )

    def _remember_sent(self, event_id: str, outcome: EventOutcome, address: str) -> None:
        self._sent_unrecorded[event_id] = (outcome, address)
        self._sent_unrecorded.move_to_end(event_id)
        while len(self._sent_unrecorded) > _SENT_UNRECORDED_MAX:
            self._sent_unrecorded.popitem(last=False)

    async def _record_sent_again(
        self, event_id: str, sent: tuple[EventOutcome, str], member_id: str
    ) -> EventOutcome:
        """An attempt run again after its send: only what the first did not get to write,
        at the address the message went to (the gate may have named another than the
        event's)."""
        outcome, address = sent
        await self._record_delivery(event_id, address, member_id)
        self._sent_unrecorded.pop(event_id, None)
        if outcome.protection is not None and outcome.protection_reason is not None:
            await self._audit_sent(
                event_id,
                member_id,
                ProtectionLevel(outcome.protection),
                PolicyReason(outcome.protection_reason),
                address,
            )
        return outcome

    async def _audit_sent(
        self,
        event_id: str,
        member_id: str,
        level: ProtectionLevel,
        reason: PolicyReason,
        to: str,
    ) -> None:
        """The one record of a delivered notice: how it was protected (the level chosen,
        and why) and where it went (`to`, as its opaque reference: the verified address
        when verify-before-resend replaced the event's)."""
        await self._audit(
            event_id, AuditAction.SENT, member_id, protection=level, reason=reason, recipient=to
        )

    async def _audit(
        self,
        event_id: str,
        action: AuditAction,
        member_id: str,
        *,
        reason: str,
        protection: str | None = None,
        recipient: str | None = None,
    ) -> None:
        try:
            await self._protection.record(
                event_id,
                action,
                actor=self._actor,
                member_id=member_id,
                protection=protection,
                reason=reason,
                recipient=recipient,
            )
        except Exception as exc:
            # What happened stands (delivered is delivered: a FAILED status would make the
            # claims system send it again, perhaps on paper). The trail's gap is logged (by
            # type: a driver's message could quote a value) and counted, for someone to mend.
            metrics.AUDIT_GAPS.inc()
            log.error(
                "audit record not written: %s", type(exc).__name__, extra={"event_id": event_id}
            )

    async def _record_delivery(self, event_id: str, address: str, member_id: str) -> None:
        """Tell the bounce service the receiver took the notice, however long its store is
        away: a notice left "sending" would be sent again (a resend, once its lease ends)
        or keep its raw event for good (a first send). The status waits meanwhile; a worker
        that gives up on the attempt (stuck_after) runs it again, and that only records
        the delivery (`_sent_unrecorded`)."""
        bounces = self._bounces
        assert bounces is not None
        await until_written(
            lambda: bounces.on_delivered(event_id, address, member_id=member_id),
            what="bounce store",
            event_id=event_id,
            retries=metrics.DELIVERY_RECORD_RETRIES,
        )

    async def _postpone(
        self, event: EobIssued, to: str, raw: bytes, deferred: EventOutcome
    ) -> EventOutcome:
        """Have the bounce service send it again when shaping allows (or put it on paper
        past the age limit). The status says what it decided: `retry_scheduled` (eobblast
        sends it again at `retry_at`; no bounce category), where `shaping_deferred` alone
        would leave the claims system to publish it again."""
        assert self._bounces is not None and deferred.retry_at is not None
        bounces, retry_at = self._bounces, deferred.retry_at
        decided = await until_written(
            lambda: bounces.on_postponed(event.event_id, event.member.id, to, raw, retry_at),
            what="bounce store",
            event_id=event.event_id,
            retries=metrics.DELIVERY_RECORD_RETRIES,
        )
        return _as_decided(deferred, decided)

    async def _bounce(
        self, event: EobIssued, to: str, raw: bytes, exc: DeliveryError, failed: EventOutcome
    ) -> EventOutcome:
        """Hand a failed delivery to verify-before-resend; the status says what it decided."""
        bounces = self._bounces
        assert bounces is not None
        reply = exc if isinstance(exc, SmtpReplyError) else None
        # However long the store is away: a failure it never heard of would leave the notice
        # "sending" for good, and a hard bounce without its suppression and hold.
        decided = await until_written(
            lambda: bounces.on_delivery_failure(
                event.event_id,
                event.member.id,
                to,
                raw,
                reply.smtp_code if reply else None,
                reply.enhanced if reply else None,
                reply.reply_text if reply else None,
                # No reply at all (connect failure, timeout, lost connection): try later.
                category=None if reply else BounceCategory.SOFT,
            ),
            what="bounce store",
            event_id=event.event_id,
            retries=metrics.DELIVERY_RECORD_RETRIES,
        )
        return _as_decided(failed, decided)


def _as_decided(attempt: EventOutcome, decided: BounceOutcome) -> EventOutcome:
    """An attempt's status (latency, protection, SMTP reply) with the bounce service's
    decision about the notice."""
    return replace(
        attempt,
        outcome=decided.outcome,
        reason=ReasonCode(decided.reason),
        retry_at=decided.retry_at,
        bounce_category=decided.category,
    )


# Failures decided before any message went out: the bounce service forgets such a first
# send (an internal error is not one: it may come after the receiver took the message).
_NOTHING_SENT = frozenset(
    {ReasonCode.PORTAL_UNAVAILABLE, ReasonCode.NO_PORTAL_IDENTITY, ReasonCode.SMIME_FAILED}
)
# First sends remembered as sent but not recorded in the bounce store, at most.
_SENT_UNRECORDED_MAX = 10_000

# Delivery failures that mean "this receiver cannot be trusted with PHI right now".
_TLS_FAILURES = frozenset(
    {
        ReasonCode.STARTTLS_NOT_OFFERED,
        ReasonCode.TLS_CERT_UNTRUSTED,
        ReasonCode.TLS_HANDSHAKE_FAILED,
        ReasonCode.CONNECTION_LOST,
        # An MX the domain's policy does not list may be an attacker's (spoofed DNS).
        ReasonCode.MTA_STS_NO_MATCHING_MX,
    }
)


def _portal_instead(reason: ReasonCode, *, verified: bool) -> bool:
    """Whether a failed send of PHI over verified TLS goes again as a portal notice
    (never as a bounce: the receiver is not at fault, its TLS is not to be trusted)."""
    return verified and reason in _TLS_FAILURES


class _Timing:
    """Per-stage latency of one event, observed into the stage histograms."""

    __slots__ = ("_last", "_start")

    def __init__(self, start: float, t_valid: float) -> None:
        self._start = start
        self._last = t_valid

    def _mark(self, stage: str) -> None:
        now = time.perf_counter()
        metrics.STAGE[stage].observe(now - self._last)
        self._last = now

    def rendered(self) -> None:
        """Rendering (and protection) is done."""
        self._mark("render")

    def signed(self) -> None:
        """DKIM signing is done."""
        self._mark("sign")

    def delivered(self) -> None:
        """The SMTP transaction is over."""
        self._mark("deliver")

    def outcome(
        self,
        event_id: str,
        outcome: Outcome,
        reason: ReasonCode,
        *,
        protection: Decision,
        smtp_code: int | None = None,
        enhanced_status: str | None = None,
        tls_version: str | None = None,
    ) -> EventOutcome:
        """The event's final outcome, with its latency so far."""
        return EventOutcome(
            event_id,
            outcome,
            reason,
            time.perf_counter() - self._start,
            smtp_code=smtp_code,
            enhanced_status=enhanced_status,
            tls_version=tls_version,
            protection=protection.level,
            protection_reason=protection.reason,
        )
