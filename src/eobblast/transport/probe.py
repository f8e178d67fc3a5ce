"""Whether a destination SMTP server would take eobblast's connections: for `eobblast check`."""

from __future__ import annotations

import contextlib
import ssl

import aiosmtplib

from eobblast.transport.routes import Route


class RouteTrouble(Exception):
    """Why a route would not carry notices: host, port and what failed, no email address
    and no message content."""


def where(route: Route) -> str:
    """host:port, an IPv6 host in brackets."""
    return f"[{route.host}]:{route.port}" if ":" in route.host else f"{route.host}:{route.port}"


async def probe_route(
    route: Route,
    context: ssl.SSLContext,
    *,
    ehlo_name: str,
    source_address: str | None,
    wait: float,
) -> str:
    """Connect (from `source_address`, as delivery does), greet, and upgrade to TLS verified
    as delivery verifies it (the route's TLS name, `context`'s trust), greet again; then
    QUIT. Returns the TLS version; RouteTrouble says what failed. The connection and each
    reply are waited for `wait` seconds (bound the whole from outside)."""
    place = where(route)
    try:
        smtp = aiosmtplib.SMTP(
            hostname=route.host,
            port=route.port,
            local_hostname=ehlo_name,
            source_address=(source_address, 0) if source_address else None,
            timeout=wait,
            start_tls=False,
        )
    except ValueError as exc:  # an EHLO name aiosmtplib refuses
        raise RouteTrouble(f"{place}: {exc}") from None
    try:
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise RouteTrouble(f"{place} refused the connection with {exc.code}") from None
        except aiosmtplib.SMTPConnectTimeoutError:
            why = "no connection or no greeting"
            raise RouteTrouble(f"{place}: {why} within {wait:.0f} s") from None
        except aiosmtplib.SMTPConnectError as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "no connection"
            raise RouteTrouble(f"{place} not reached ({cause})") from None
        await smtp.ehlo()
        if not smtp.supports_extension("starttls"):
            raise RouteTrouble(f"{place} offers no STARTTLS: no EOB would go there")
        try:
            await smtp.starttls(server_hostname=route.tls_name, tls_context=context)
        except aiosmtplib.SMTPResponseException as exc:
            raise RouteTrouble(f"{place}: STARTTLS refused with {exc.code}") from None
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            raise RouteTrouble(f"{place}: TLS failed ({_tls_reason(exc)})") from None
        tls = smtp.get_transport_info("ssl_object")
        if not isinstance(tls, ssl.SSLObject):
            raise RouteTrouble(f"{place}: the connection is not encrypted after STARTTLS")
        version = str(tls.version())
        await smtp.ehlo()
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()  # verified already: how the server says goodbye is its own
        return version
    except aiosmtplib.SMTPTimeoutError:
        raise RouteTrouble(f"{place} stopped answering within {wait:.0f} s") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise RouteTrouble(f"{place} answered {exc.code}") from None
    except (aiosmtplib.SMTPException, OSError, UnicodeError) as exc:
        raise RouteTrouble(f"{place}: {type(exc).__name__}") from None
    finally:
        smtp.close()


def _tls_reason(exc: BaseException) -> str:
    """A TLS failure's reason, with what certificate verification said."""
    for error in (exc, exc.__cause__, exc.__context__):
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"{error.reason}: {error.verify_message}"
        if isinstance(error, ssl.SSLError) and error.reason:
            return str(error.reason)
    return type(exc).__name__
