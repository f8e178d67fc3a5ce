"""Whether a destination SMTP server would take eobblast's connections: for `eobblast check`."""

from __future__ import annotations

import ssl

import aiosmtplib

from eobblast.transport.routes import Route


class RouteTrouble(Exception):
    """Why a route would not carry notices (no address, no URL, no message content)."""


async def probe_route(route: Route, context: ssl.SSLContext, ehlo_name: str, wait: float) -> str:
    """Connect, greet, and upgrade to TLS verified as delivery verifies it (the route's TLS
    name, `context`'s trust); then QUIT. Returns the server's TLS version; RouteTrouble
    says what failed. The connection and each reply are waited for `wait` seconds."""
    where = f"[{route.host}]:{route.port}" if ":" in route.host else f"{route.host}:{route.port}"
    smtp = aiosmtplib.SMTP(
        hostname=route.host,
        port=route.port,
        local_hostname=ehlo_name,
        timeout=wait,
        start_tls=False,
    )
    try:
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise RouteTrouble(f"{where} refused the connection with {exc.code}") from None
        except aiosmtplib.SMTPConnectTimeoutError:
            raise RouteTrouble(f"{where} not reached within {wait:.0f} s") from None
        except aiosmtplib.SMTPConnectError as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "no connection"
            raise RouteTrouble(f"{where} not reached ({cause})") from None
        await smtp.ehlo()
        if not smtp.supports_extension("starttls"):
            raise RouteTrouble(f"{where} offers no STARTTLS: no notice would go there")
        try:
            await smtp.starttls(server_hostname=route.tls_name, tls_context=context)
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise RouteTrouble(f"{where}: TLS failed ({reason})") from None
        version = smtp.transport.get_extra_info("ssl_object").version()  # type: ignore[union-attr]
        await smtp.quit()
        return str(version)
    except aiosmtplib.SMTPTimeoutError:
        raise RouteTrouble(f"{where} stopped answering within {wait:.0f} s") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise RouteTrouble(f"{where} answered {exc.code}") from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise RouteTrouble(f"{where}: {type(exc).__name__}") from None
    finally:
        smtp.close()
