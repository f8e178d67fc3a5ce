"""The pickup portal: a link from the notice email, an identity check, the EOB shown once.

Starlette on uvicorn: a small, typed ASGI toolkit from the authors of httpcore, whose pool
our own code is modelled on; uvicorn can be started and stopped from code, which the CLI,
the demo and the tests need. Opening a link (GET) never spends it, because mail scanners
fetch links before people do; only a POST with the right answers does.

Nothing here logs or audits the token, the answers or any EOB content: log lines and
audit records carry opaque item ids and event ids only. uvicorn's access log is off,
since it would print the token in every request line. Who made each pickup attempt (the
client's address as seen through the trusted proxies, the start of its User-Agent) is kept
in the portal's own access records in the escrow store (`portal_access`, [portal]
access_days), never in a log line: logs travel further, and an address beside an event id
identifies a member.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import math
import re
import secrets
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eobblast.errors import EobblastError, ReasonCode, StoreNotAnswering
from eobblast.observe.audit import AuditAction, AuditRecord, AuditTrail, append_or_count_gap
from eobblast.observe.metrics import AUDIT_GAPS, REGISTRY
from eobblast.protect.escrow import (
    DEFAULT_LOCKOUT_AFTER,
    PICKED_UP,
    PORTAL_PROTECTION,
    AccessRecord,
    EscrowIntegrityError,
    EscrowStore,
    LinkStatus,
    PickupClient,
    PickupFailure,
    PickupOpened,
    PickupRefused,
    access_outcome,
    hash_token,
)

log = logging.getLogger("eobblast.portal")

ACTOR = "portal"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
# The last 4 digits of the member id ("XYZ123456789-01": 8901), all of them when it has fewer.
_LAST4 = re.compile(r"^[0-9]{1,4}$")
DEFAULT_ACCESS_DAYS = 365

# What became of each answered pickup attempt (a POST with a link): PICKED_UP, why it was
# refused, or `unavailable` (the store failed: the generic 503 page).
UNAVAILABLE = "unavailable"
PICKUP_OUTCOMES = (PICKED_UP, *(str(failure) for failure in PickupFailure), UNAVAILABLE)
# Which limit refused a request with 429: the client's (its address) or the link's.
RATE_LIMITS = ("client", "link")
PORTAL_PICKUPS = Counter(
    "eobblast_portal_pickups",
    f"Pickup attempts at the portal by outcome ({', '.join(PICKUP_OUTCOMES)}).",
    ["outcome"],
    registry=REGISTRY,
)
PORTAL_LOCKOUTS = Counter(
    "eobblast_portal_lockouts",
    "Pickup links locked for good after [portal] lockout_after wrong answers.",
    registry=REGISTRY,
)
PORTAL_RATE_LIMITED = Counter(
    "eobblast_portal_rate_limited",
    "Portal requests refused with 429, by the limit that refused them (client, link).",
    ["limit"],
    registry=REGISTRY,
)
_MAX_FORM_BYTES = 2048
_CSRF_COOKIE = "portal_csrf"
_CSRF_CONTEXT = b"eobblast.portal.csrf.v1\x00"
_CSRF_KEY_CONTEXT = b"eobblast.portal.csrf-key.v1\x00"

# Plain, readable, no external resources; allowed by its hash in the CSP below.
_CSS = (
    "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Arial,sans-serif;"
    "max-width:40rem;margin:0 auto;padding:1rem;line-height:1.5;color:#1b1b1b}"
    ".brand{font-weight:700;color:#1d4f91;margin:0}"
    "h1{font-size:1.6rem}"
    "fieldset{border:0;padding:0;margin:1.5rem 0}"
    "legend,label{font-weight:600}"
    "legend{padding:0}"
    ".hint{display:block;color:#4a5358}"
    ".date{display:flex;gap:1rem}"
    ".date label{display:block;font-weight:400}"
    "input{font-size:1.1rem;padding:.4rem;border:2px solid #1b1b1b;width:3.5rem}"
    "input.year{width:5rem}"
    "#last4{width:5rem}"
    "input:focus,button:focus{outline:3px solid #ffbf47;outline-offset:0}"
    ".field{margin:1.5rem 0}"
    ".error{border-left:5px solid #b00020;padding:0 1rem;color:#b00020;font-weight:600}"
    "button{font-size:1.1rem;padding:.6rem 1.2rem;background:#1d4f91;color:#fff;border:0}"
    "footer{margin-top:3rem;color:#4a5358;font-size:.95rem}"
)
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
_PAGE_CSP = (
    f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'"
)
# The EOB's own markup uses style attributes (it is the email's HTML part); scripts,
# forms, frames and every fetch stay forbidden, and `sandbox` gives it an opaque origin.
_EOB_CSP = (
    "default-src 'none'; style-src 'none'; style-src-attr 'unsafe-inline'; img-src data:;"
    " form-action 'none'; frame-ancestors 'none'; base-uri 'none'; sandbox"
)
_HEADERS = (
    ("cache-control", "no-store"),
    ("pragma", "no-cache"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("permissions-policy", "camera=(), microphone=(), geolocation=(), interest-cohort=()"),
    ("content-security-policy", _PAGE_CSP),
)

_STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "portal_name": "Secure member notices",
        "title": "View your Explanation of Benefits",
        "intro": "To protect your health information, please confirm who you are.",
        "once": "Your notice can be opened once. When it appears, print it or save it.",
        "dob_legend": "Date of birth",
        "dob_hint": "For example, 03 27 1980",
        "month": "Month",
        "day": "Day",
        "year": "Year",
        "last4_label": "Last 4 digits of your member ID",
        "last4_hint": "Your member ID is on your insurance card. Enter its last 4 digits"
        " only, leaving out letters and dashes; if it has fewer than 4 digits, enter all of"
        " them.",
        "submit": "Show my notice",
        "wrong": "The details you entered do not match our records. Attempts left: {left}.",
        "invalid": "Enter your date of birth as month, day and year, and the last 4 digits"
        " of your member ID.",
        "csrf": "This page had expired. Please enter your details again. If this keeps"
        " happening, allow cookies for this site.",
        "unknown_title": "This link is not valid",
        "unknown": "Check that you opened the whole link from your email.",
        "expired_title": "This link has expired",
        "expired": "For your security, links work for a limited time.",
        "used_title": "This link has already been used",
        "used": "For your security, each link opens your notice only once.",
        "locked_title": "This link is locked",
        "locked": "For your security, this link was locked after too many attempts.",
        "slow_title": "Too many attempts",
        "slow": "Please wait a few minutes, then try again.",
        "error_title": "We cannot show your notice right now",
        "error": "Please try again later.",
        "help": "If you need help or another copy of your notice, call Member Services at"
        " the number on your insurance card.",
    },
    "es": {
        "portal_name": "Avisos seguros para miembros",
        "title": "Vea su Explicación de Beneficios",
        "intro": "Para proteger su información de salud, confirme su identidad.",
        "once": "Su aviso se puede abrir una sola vez. Cuando aparezca, imprímalo o guárdelo.",
        "dob_legend": "Fecha de nacimiento",
        "dob_hint": "Por ejemplo, 03 27 1980",
        "month": "Mes",
        "day": "Día",
        "year": "Año",
        "last4_label": "Últimos 4 dígitos de su número de miembro",
        "last4_hint": "Su número de miembro está en su tarjeta de seguro. Ingrese solo sus"
        " últimos 4 dígitos, sin letras ni guiones; si tiene menos de 4 dígitos, ingréselos"
        " todos.",
        "submit": "Mostrar mi aviso",
        "wrong": "Los datos que ingresó no coinciden con nuestros registros."
        " Intentos restantes: {left}.",
        "invalid": "Ingrese su fecha de nacimiento como mes, día y año, y los últimos 4"
        " dígitos de su número de miembro.",
        "csrf": "Esta página había caducado. Ingrese sus datos de nuevo. Si esto se repite,"
        " permita las cookies para este sitio.",
        "unknown_title": "Este enlace no es válido",
        "unknown": "Verifique que abrió el enlace completo de su correo electrónico.",
        "expired_title": "Este enlace ha caducado",
        "expired": "Por su seguridad, los enlaces funcionan por un tiempo limitado.",
        "used_title": "Este enlace ya se usó",
        "used": "Por su seguridad, cada enlace abre su aviso una sola vez.",
        "locked_title": "Este enlace está bloqueado",
        "locked": "Por su seguridad, este enlace se bloqueó después de demasiados intentos.",
        "slow_title": "Demasiados intentos",
        "slow": "Espere unos minutos y vuelva a intentarlo.",
        "error_title": "No podemos mostrar su aviso en este momento",
        "error": "Inténtelo de nuevo más tarde.",
        "help": "Si necesita ayuda u otra copia de su aviso, llame a Servicios para Miembros"
        " al número que aparece en su tarjeta de seguro.",
    },
}

# failure -> (status code, title key, message key)
_REFUSALS: Mapping[PickupFailure, tuple[int, str, str]] = {
    PickupFailure.UNKNOWN: (404, "unknown_title", "unknown"),
    PickupFailure.EXPIRED: (410, "expired_title", "expired"),
    PickupFailure.ALREADY_USED: (410, "used_title", "used"),
    PickupFailure.LOCKED: (423, "locked_title", "locked"),
}


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: `burst` requests at once, refilled at `per_minute`."""

    burst: int
    per_minute: float


class KeyedTokenBucket:
    """One token bucket per key (a client IP, a link), the least recently used evicted.

    A refused request is answered at once with 429 and a Retry-After: nobody waits in
    the server. Memory is bounded by `max_keys`; evicting a key refills its bucket, which
    costs an attacker nothing they could not get from the per-link lockout anyway.
    """

    def __init__(self, rate: Rate, *, max_keys: int = 100_000) -> None:
        self._capacity = float(rate.burst)
        self._per_second = rate.per_minute / 60.0
        self._max_keys = max_keys
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        tokens, last = self._buckets.pop(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._per_second)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = math.inf if self._per_second <= 0 else (1.0 - tokens) / self._per_second
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


# A person retyping a date a few times fits easily; a script does not.
DEFAULT_PER_IP = Rate(burst=30, per_minute=20)
DEFAULT_PER_LINK = Rate(burst=6, per_minute=2)


def _language(tag: str) -> str:
    """The portal's strings for a language tag (`es-MX` -> `es`), English when we have none."""
    primary = tag.split("-")[0].lower()
    return primary if primary in _STRINGS else "en"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _csrf_mac(secret: bytes, token_sha256: str, nonce: str, issued: int) -> str:
    message = f"{token_sha256}\x00{nonce}\x00{issued}".encode()
    digest = hmac.new(secret, _CSRF_CONTEXT + message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def csrf_secret_from(key: bytes) -> bytes:
    """The CSRF secret derived from a long-lived key (the member-reference key): the same in
    every portal process and across restarts, so a form shown by one is accepted by another."""
    return hmac.new(key, _CSRF_KEY_CONTEXT, hashlib.sha256).digest()


def csrf_token(secret: bytes, token_sha256: str, nonce: str, issued: int) -> str:
    """The form's CSRF token: bound to the link, the browser's cookie nonce and a time."""
    return f"{issued}.{_csrf_mac(secret, token_sha256, nonce, issued)}"


def csrf_valid(
    secret: bytes, token_sha256: str, nonce: str | None, form_value: str, now: float, max_age: float
) -> bool:
    """Whether a submitted CSRF token was issued by us, for this link and browser, recently."""
    issued_text, _, mac = form_value.partition(".")
    # ASCII first: "²" is a digit to isdigit() but not to int(), and compare_digest refuses
    # non-ASCII text. A crafted field is a failed check, never a server error.
    if not (nonce and issued_text.isascii() and issued_text.isdigit() and mac.isascii()):
        return False
    issued = int(issued_text)
    if not (now - max_age <= issued <= now + 60):
        return False
    return hmac.compare_digest(mac, _csrf_mac(secret, token_sha256, nonce, issued))


def parse_dob(month: str, day: str, year: str) -> dt.date | None:
    """The date from the form's three fields, or None if it is not a plausible birth date."""
    parts = (month.strip(), day.strip(), year.strip())
    if not all(p.isdigit() and p.isascii() for p in parts) or len(parts[2]) != 4:
        return None
    try:
        return dt.date(int(parts[2]), int(parts[0]), int(parts[1]))
    except ValueError:
        return None


class _SecurityHeaders:
    """Adds the portal's security headers to every response that does not set its own."""

    def __init__(self, app: ASGIApp, *, hsts: bool, https: bool) -> None:
        self._app = app
        self._hsts = hsts
        self._https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS:
                    headers.setdefault(name, value)
                if self._hsts and (self._https or scope.get("scheme") == "https"):
                    headers.setdefault("strict-transport-security", "max-age=31536000")
            await send(message)

        await self._app(scope, receive, send_with_headers)


class _Portal:
    """The request handlers and what they share."""

    def __init__(
        self,
        escrow: EscrowStore,
        audit: AuditTrail,
        *,
        lockout_after: int,
        per_ip: Rate,
        per_link: Rate,
        csrf_secret: bytes,
        csrf_max_age: float,
        clock: Callable[[], dt.datetime],
        https: bool,
    ) -> None:
        self.escrow = escrow
        self.audit = audit
        self.lockout_after = lockout_after
        self.per_ip = KeyedTokenBucket(per_ip)
        self.per_link = KeyedTokenBucket(per_link)
        self.csrf_secret = csrf_secret
        self.csrf_max_age = csrf_max_age
        self.clock = clock
        self.https = https
        self.templates = Environment(
            loader=PackageLoader("eobblast.portal", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # ---- rendering

    def _page(
        self,
        template: str,
        language: str,
        status: int,
        *,
        heading_key: str,
        **context: Any,
    ) -> HTMLResponse:
        language = _language(language)
        strings = _STRINGS[language]
        html = self.templates.get_template(template).render(
            lang=language,
            s=strings,
            css=Markup(_CSS),  # noqa: S704 - a constant of ours, allowed by its CSP hash
            heading=strings[heading_key],
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def _notice(self, language: str, status: int, title_key: str, message_key: str) -> Response:
        strings = _STRINGS[_language(language)]
        return self._page(
            "notice.html.j2",
            language,
            status,
            heading_key=title_key,
            message=strings[message_key],
        )

    def _refusal(self, failure: PickupFailure, language: str) -> Response:
        status, title_key, message_key = _REFUSALS[failure]
        return self._notice(language, status, title_key, message_key)

    def _too_many(self, wait: float, language: str = "en") -> Response:
        response = self._notice(language, 429, "slow_title", "slow")
        response.headers["retry-after"] = str(max(1, math.ceil(min(wait, 3600.0))))
        return response

    def _form(
        self,
        request: Request,
        token_sha256: str,
        language: str,
        *,
        status: int = 200,
        error: str | None = None,
    ) -> Response:
        strings = _STRINGS[_language(language)]
        nonce = request.cookies.get(_CSRF_COOKIE, "")
        fresh = not nonce or len(nonce) > 64
        if fresh:
            nonce = secrets.token_urlsafe(16)
        response = self._page(
            "form.html.j2",
            language,
            status,
            heading_key="title",
            error=error,
            csrf=csrf_token(self.csrf_secret, token_sha256, nonce, int(time.time())),
            date_parts=[
                {"name": "month", "label": strings["month"], "size": 2},
                {"name": "day", "label": strings["day"], "size": 2},
                {"name": "year", "label": strings["year"], "size": 4},
            ],
        )
        if fresh:
            response.set_cookie(
                _CSRF_COOKIE,
                nonce,
                path="/p/",
                httponly=True,
                # Lax: a cross-site POST never carries it, while a link opened from a mail
                # client (a cross-site GET) still finds the browser's nonce.
                samesite="lax",
                secure=self.https or request.url.scheme == "https",
            )
        return response

    # ---- audit

    async def _record(
        self,
        action: AuditAction,
        event_id: str,
        item_id: str | None,
        member_ref: str | None,
        reason: str,
    ) -> None:
        record = AuditRecord(
            event_id,
            action,
            ACTOR,
            self.clock(),
            member_ref=member_ref,
            protection=PORTAL_PROTECTION,
            reason=reason,
            item_id=item_id,
        )
        # The member still gets the answer (a notice already marked picked up must not be
        # lost to them); a gap is logged and counted for ops to reconcile from the log and
        # the access records.
        await append_or_count_gap(self.audit, record, log, "portal audit append failed")

    async def _access(self, record: AccessRecord) -> None:
        """Write an access record the attempt's own transaction did not (a dead link)."""
        try:
            await self.escrow.record_access(record)
        except Exception as exc:  # the refusal stands; the gap is counted as an audit gap
            AUDIT_GAPS.inc()
            log.error(
                "portal access record failed",
                extra={
                    "event_id": record.event_id,
                    "item_id": record.item_id,
                    "exc_type": type(exc).__name__,
                },
            )

    # ---- handlers

    def _client_wait(self, request: Request) -> float:
        client = request.client.host if request.client else "unknown"
        return self.per_ip.take(client, time.monotonic())

    @staticmethod
    def _client(request: Request) -> PickupClient:
        # request.client is the X-Forwarded-For client when the peer is a trusted proxy.
        address = request.client.host if request.client else None
        return PickupClient.of(address, request.headers.get("user-agent"))

    async def _link(self, token: str) -> LinkStatus:
        if not _TOKEN.match(token):
            return LinkStatus(PickupFailure.UNKNOWN)
        return await self.escrow.status(token, self.clock())

    async def show_form(self, request: Request) -> Response:
        """GET /p/{token}: the identity form, or why the link cannot be used."""
        wait = self._client_wait(request)
        if wait:
            PORTAL_RATE_LIMITED.labels("client").inc()
            return self._too_many(wait)
        token = request.path_params["token"]
        try:
            link = await self._link(token)
        except EobblastError as exc:
            return self._unavailable(exc, None)
        if link.failure is not None:
            return self._refusal(link.failure, link.language)
        return self._form(request, hash_token(token), link.language)

    async def check_answers(self, request: Request) -> Response:
        """POST /p/{token}: check the answers; the EOB once, or a counted refusal."""
        token = request.path_params["token"]
        token_sha256 = hash_token(token)
        client_wait = self._client_wait(request)
        link_wait = self.per_link.take(token_sha256, time.monotonic())
        if client_wait or link_wait:
            limit = "client" if client_wait else "link"
            PORTAL_RATE_LIMITED.labels(limit).inc()
            log.info("portal attempt rate limited", extra={"limit": limit})
            return self._too_many(max(client_wait, link_wait))
        try:
            link = await self._link(token)
        except EobblastError as exc:
            return self._unavailable(exc, None, attempt=True)
        if link.failure is not None:
            return await self._refuse_dead_link(request, link)
        try:
            return await self._check(request, token, token_sha256, link)
        except EscrowIntegrityError as exc:
            # Tampered with, swapped, or its key is gone: an incident, not a wrong answer.
            if link.event_id is not None:
                await self._record(
                    AuditAction.INCIDENT,
                    link.event_id,
                    link.item_id,
                    link.member_ref,
                    "escrow_integrity",
                )
            return self._unavailable(exc, link.item_id, attempt=True)
        except EobblastError as exc:
            return self._unavailable(exc, link.item_id, attempt=True)

    async def _check(
        self, request: Request, token: str, token_sha256: str, link: LinkStatus
    ) -> Response:
        form = await _read_form(request)
        if form is None:
            return self._notice(link.language, 400, "error_title", "error")
        strings = _STRINGS[_language(link.language)]
        if not csrf_valid(
            self.csrf_secret,
            token_sha256,
            request.cookies.get(_CSRF_COOKIE),
            form.get("csrf", ""),
            time.time(),
            self.csrf_max_age,
        ):
            log.info("portal form failed its csrf check", extra={"item_id": link.item_id})
            return self._form(
                request, token_sha256, link.language, status=403, error=strings["csrf"]
            )
        dob = parse_dob(
            form.get("dob_month", ""), form.get("dob_day", ""), form.get("dob_year", "")
        )
        last4 = form.get("last4", "").strip()
        if dob is None or not _LAST4.match(last4):
            # A typo is not a guess: it is not counted, and it reveals nothing.
            return self._form(
                request, token_sha256, link.language, status=422, error=strings["invalid"]
            )
        result = await self.escrow.verify_and_open(
            token,
            dob,
            last4,
            self.clock(),
            lockout_after=self.lockout_after,
            client=self._client(request),
        )
        PORTAL_PICKUPS.labels(access_outcome(result)).inc()
        if isinstance(result, PickupOpened):
            return await self._opened(result)
        return await self._refused(request, token_sha256, link, result)

    async def _opened(self, result: PickupOpened) -> Response:
        await self._record(
            AuditAction.PORTAL_PICKUP,
            result.event_id,
            result.item_id,
            result.member_ref,
            "identity_verified",
        )
        log.info(
            "portal notice picked up",
            extra={"item_id": result.item_id, "event_id": result.event_id},
        )
        return HTMLResponse(result.html, headers={"content-security-policy": _EOB_CSP})

    async def _refused(
        self, request: Request, token_sha256: str, link: LinkStatus, result: PickupRefused
    ) -> Response:
        if result.event_id is not None:
            await self._record(
                AuditAction.PORTAL_PICKUP_FAILED,
                result.event_id,
                result.item_id,
                result.member_ref,
                str(result.reason),
            )
        ids = {"item_id": result.item_id, "event_id": result.event_id}
        log.info("portal pickup refused", extra={**ids, "reason": str(result.reason)})
        if result.just_locked and result.event_id is not None:
            PORTAL_LOCKOUTS.inc()
            await self._record(
                AuditAction.PORTAL_LOCKED,
                result.event_id,
                result.item_id,
                result.member_ref,
                "too_many_failures",
            )
            log.warning("portal link locked", extra=ids)
            return self._refusal(PickupFailure.LOCKED, link.language)
        if result.reason is PickupFailure.WRONG_ANSWER:
            strings = _STRINGS[_language(link.language)]
            left = max(0, self.lockout_after - result.failed_attempts)
            return self._form(
                request,
                token_sha256,
                link.language,
                status=403,
                error=strings["wrong"].format(left=left),
            )
        return self._refusal(result.reason, link.language)

    async def _refuse_dead_link(self, request: Request, link: LinkStatus) -> Response:
        """A POST to a link that is used, expired, locked or unknown: said so, and audited."""
        assert link.failure is not None
        PORTAL_PICKUPS.labels(str(link.failure)).inc()
        client = self._client(request)
        await self._access(
            AccessRecord(self.clock(), str(link.failure), link.item_id, link.event_id, client)
        )
        if link.event_id is not None:
            await self._record(
                AuditAction.PORTAL_PICKUP_FAILED,
                link.event_id,
                link.item_id,
                link.member_ref,
                str(link.failure),
            )
        log.info(
            "portal pickup refused",
            extra={"item_id": link.item_id, "event_id": link.event_id, "reason": str(link.failure)},
        )
        return self._refusal(link.failure, link.language)

    def _unavailable(
        self, exc: EobblastError, item_id: str | None, *, attempt: bool = False
    ) -> Response:
        # The reason code only: never the exception's text.
        log.error("portal cannot serve a link", extra={"item_id": item_id, "reason": exc.reason})
        if attempt:
            PORTAL_PICKUPS.labels(UNAVAILABLE).inc()
        return self._notice("en", 503, "error_title", "error")

    async def server_error(self, request: Request, exc: Exception) -> Response:
        """Any unexpected failure: the generic page, never a traceback or a detail."""
        if request.method == "POST":  # only pickup attempts are posted
            PORTAL_PICKUPS.labels(UNAVAILABLE).inc()
        response = self._notice("en", 503, "error_title", "error")
        # Starlette answers errors outside the middleware stack: the headers go on here.
        for name, value in _HEADERS:
            response.headers.setdefault(name, value)
        return response

    async def healthz(self, request: Request) -> Response:
        """GET /healthz: 200 when the escrow answers."""
        try:
            await self.escrow.ping()
        except Exception as exc:  # any failure means unhealthy, whatever raised it
            log.warning("portal health check failed", extra={"exc_type": type(exc).__name__})
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})


async def _read_form(request: Request) -> dict[str, str] | None:
    """The urlencoded form, or None if it is not one or is larger than any real answer.

    Read by hand rather than through a multipart parser: four short fields, a hard size cap.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return None
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"), keep_blank_values=True, max_num_fields=8, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError):
        return None
    return dict(pairs)


async def purge_and_record(
    escrow: EscrowStore, audit: AuditTrail, now: dt.datetime, *, actor: str = ACTOR
) -> int:
    """Delete expired items and record each in the audit trail; returns how many.

    An item the trail does not take is gone all the same: counted as a gap, logged by its
    ids, and the rest are recorded."""
    try:
        purged = await escrow.purge_expired_items(now)
    except StoreNotAnswering:
        # The delete may have been kept: items gone with no record, and none to name.
        AUDIT_GAPS.inc()
        log.error("portal purge's outcome unknown: expired items may be gone unrecorded")
        raise
    for item in purged:
        record = item.audit_record(actor, now, item.final_state)
        await append_or_count_gap(
            audit, record, log, "portal purge not recorded in the audit trail"
        )
    if purged:
        log.info("portal purged expired items", extra={"count": len(purged)})
    return len(purged)


async def _purge_forever(
    escrow: EscrowStore,
    audit: AuditTrail,
    interval: float,
    clock: Callable[[], dt.datetime],
    access_days: float,
) -> None:
    while True:
        try:
            await purge_and_record(escrow, audit, clock())
            forgotten = await escrow.purge_access(clock() - dt.timedelta(days=access_days))
            if forgotten:
                log.info("portal purged old access records", extra={"count": forgotten})
        except Exception as exc:  # a database hiccup must not end purging for good
            log.warning("portal purge failed", extra={"exc_type": type(exc).__name__})
        await asyncio.sleep(interval)


def create_app(
    escrow: EscrowStore,
    audit: AuditTrail,
    *,
    lockout_after: int = DEFAULT_LOCKOUT_AFTER,
    per_ip: Rate = DEFAULT_PER_IP,
    per_link: Rate = DEFAULT_PER_LINK,
    csrf_secret: bytes | None = None,
    csrf_max_age: float = 1800.0,
    purge_interval: float | None = 300.0,
    clock: Callable[[], dt.datetime] = _utcnow,
    hsts: bool = True,
    https: bool = False,
    access_days: float = DEFAULT_ACCESS_DAYS,
) -> Starlette:
    """The portal's ASGI app. It does not own (or close) the escrow and the audit trail.

    `csrf_secret` must be shared by every portal process behind one address (a random
    one is made per process otherwise); `purge_interval=None` leaves purging (of expired
    items, and of access records older than `access_days`) to others.
    `https`: members reach the portal over HTTPS (its pickup links are https), though this
    hop may be plain HTTP from a TLS proxy: HSTS and `Secure` cookies regardless. Without
    it, both follow the scheme of the request as the server sees it.
    """
    portal = _Portal(
        escrow,
        audit,
        lockout_after=lockout_after,
        per_ip=per_ip,
        per_link=per_link,
        csrf_secret=csrf_secret or secrets.token_bytes(32),
        csrf_max_age=csrf_max_age,
        clock=clock,
        https=https,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = None
        if purge_interval is not None:
            task = asyncio.create_task(
                _purge_forever(escrow, audit, purge_interval, clock, access_days),
                name="portal-purge",
            )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # Every outcome and limit counted from 0: an alert on the first lockout or 429 needs a
    # sample before it (a labelled series appears only when first counted).
    for outcome in PICKUP_OUTCOMES:
        PORTAL_PICKUPS.labels(outcome)
    for limit in RATE_LIMITS:
        PORTAL_RATE_LIMITED.labels(limit)
    app = Starlette(
        routes=[
            Route("/healthz", portal.healthz, methods=["GET"]),
            Route("/p/{token}", portal.show_form, methods=["GET"]),
            Route("/p/{token}", portal.check_answers, methods=["POST"]),
        ],
        exception_handlers={500: portal.server_error},
        lifespan=lifespan,
    )
    app.add_middleware(_SecurityHeaders, hsts=hsts, https=https)
    return app


class RedactPickupLinks(logging.Filter):
    """Rewrites `/p/<token>` to `/p/[redacted]` in a log record's message and arguments."""

    _PATH = re.compile(r"/p/[^\s\"?#/]+")

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place; never drops it."""
        if isinstance(record.msg, str):
            record.msg = self._PATH.sub("/p/[redacted]", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._PATH.sub("/p/[redacted]", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def _redact_server_logs() -> None:
    # uvicorn logs request lines whenever its access logger has a handler, whatever
    # `access_log` says (a log config or a test harness may add one): the token must
    # not reach any of them.
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactPickupLinks) for f in logger.filters):
            logger.addFilter(RedactPickupLinks())


class PortalStartupError(EobblastError):
    """The portal server could not start (e.g. its startup hook failed)."""

    def __init__(self, detail: str) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, detail)


class PortalServer:
    """A running portal server: its address, `stop()`, and `wait()` until it ends."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], host: str, port: int):
        self._server = server
        self._task = task
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:8080."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def wait(self) -> None:
        """Until the server has stopped (by `stop()` or a signal)."""
        await asyncio.shield(self._task)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, finish open requests (up to `grace` s), run shutdown hooks."""
        self._server.should_exit = True
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> PortalServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve_portal(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    forwarded_allow_ips: str | None = None,
    startup_timeout: float = 10.0,
) -> PortalServer:
    """Start the portal on host:port (0: a free port) and return once it accepts requests.

    Behind a reverse proxy, name it in `forwarded_allow_ips` so rate limits see the
    client's address rather than the proxy's; otherwise forwarding headers are ignored.
    """
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        # Request lines carry the pickup token: never logged.
        access_log=False,
        server_header=False,
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_graceful_shutdown=5,
    )
    _redact_server_logs()
    server = uvicorn.Server(config)
    # Bound here rather than by uvicorn: a busy port raises OSError to the caller instead
    # of uvicorn's sys.exit, and port 0 tells us the port it got.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port = int(sock.getsockname()[1])

    async def run() -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit:
            # uvicorn exits the process when the app's startup fails: not ours to end.
            raise PortalStartupError("portal startup failed") from None
        finally:
            sock.close()

    task = asyncio.create_task(run(), name="portal-server")
    try:
        async with asyncio.timeout(startup_timeout):
            while not server.started:
                if task.done():
                    task.result()
                    raise PortalStartupError("portal server stopped during startup")
                await asyncio.sleep(0.01)
    except BaseException:
        server.should_exit = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, PortalStartupError):
            await task
        raise
    log.info("portal listening", extra={"host": host, "port": bound_port})
    return PortalServer(server, task, host, bound_port)
