"""A member picks up an EOB in a real browser: Debian's headless Chromium through Selenium.

The driver is the system's /usr/bin/chromedriver, named explicitly, so Selenium Manager
never runs and nothing is downloaded. Selenium is synchronous and the portal runs on this
test's event loop, so every browser call goes through a thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from eobblast.events import EobIssued, validate_event
from eobblast.observe.audit import AuditTrail, member_ref, open_audit
from eobblast.portal import PortalServer, create_app, serve_portal
from eobblast.protect.escrow import EscrowItem, EscrowStore, KeyRing, escrow_eob, open_escrow
from eobblast.render.mime import Renderer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LOCKOUT = 3

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[EscrowStore, AuditTrail, PortalServer]]:
    url = f"sqlite:///{tmp_path / 'portal.db'}"
    escrow = await open_escrow(url, KeyRing.generate(tmp_path / "keys"))
    audit = await open_audit(url)
    server = await serve_portal(create_app(escrow, audit, lockout_after=LOCKOUT))
    try:
        yield escrow, audit, server
    finally:
        await server.stop()
        await escrow.close()
        await audit.close()


async def escrowed(
    escrow: EscrowStore, audit: AuditTrail, event_doc: dict[str, Any]
) -> tuple[str, EobIssued]:
    doc = {**event_doc, "event_id": f"evt-{uuid.uuid4().hex[:12]}"}
    doc["member"] = {**doc["member"], "preferred_language": "en"}
    event = validate_event(orjson.dumps(doc), allow_test_domains=True)
    assert isinstance(event, EobIssued) and event.member.date_of_birth is not None
    message = email.message_from_bytes(Renderer().render(event).to_bytes())
    html = next(
        part.get_payload(decode=True)
        for part in message.walk()
        if part.get_content_type() == "text/html"
    )
    assert isinstance(html, bytes)
    item = EscrowItem(
        event_id=event.event_id,
        member_ref=member_ref(b"browser-test-member-ref-key-0001", event.member.id),
        member_id=event.member.id,
        date_of_birth=event.member.date_of_birth,
        html=html.decode(),
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
    )
    return await escrow_eob(escrow, audit, item, actor="e2e"), event


def answer(driver: Any, dob: dt.date, last4: str) -> str:
    """Fill the identity form as a person would (by its labels) and submit; the new page."""
    for label_text, value in (
        ("Month", f"{dob.month:02d}"),
        ("Day", f"{dob.day:02d}"),
        ("Year", str(dob.year)),
        ("Last 4 digits of your member ID", last4),
    ):
        label = driver.find_element(By.XPATH, f'//label[normalize-space()="{label_text}"]')
        field = driver.find_element(By.ID, label.get_attribute("for"))
        field.clear()
        field.send_keys(value)
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, 'button[type="submit"]').click()
    WebDriverWait(driver, 10).until(lambda d: not _alive(old))
    return str(driver.find_element(By.TAG_NAME, "body").text)


def _alive(element: Any) -> bool:
    try:
        element.tag_name  # noqa: B018 - raises once the page has been replaced
    except Exception:
        return False
    return True


def visit(driver: Any, url: str) -> str:
    driver.get(url)
    return str(driver.find_element(By.TAG_NAME, "body").text)


async def test_member_picks_up_once_and_guesses_lock(
    browser: Any,
    stack: tuple[EscrowStore, AuditTrail, PortalServer],
    event_doc: dict[str, Any],
) -> None:
    escrow, audit, server = stack
    # A dependant's id: its last 4 digits (8901) are what the notice and the form ask for.
    dependant = {**event_doc, "member": {**event_doc["member"], "id": "XYZ123456789-01"}}
    token, event = await escrowed(escrow, audit, dependant)
    assert event.member.date_of_birth is not None
    link = f"{server.url}/p/{token}"

    form = await asyncio.to_thread(visit, browser, link)
    assert "Date of birth" in form and event.member.name not in form

    shown = await asyncio.to_thread(answer, browser, event.member.date_of_birth, "8901")
    assert event.member.name in shown
    assert "NOT A BILL" in shown
    title = await asyncio.to_thread(lambda: browser.title)
    assert "Explanation of Benefits" in title

    again = await asyncio.to_thread(visit, browser, link)
    assert "already been used" in again and event.member.name not in again

    # A second notice: someone without the answers keeps guessing.
    token2, event2 = await escrowed(escrow, audit, event_doc)
    assert event2.member.date_of_birth is not None
    await asyncio.to_thread(visit, browser, f"{server.url}/p/{token2}")
    wrong = event2.member.date_of_birth + dt.timedelta(days=400)
    pages = [await asyncio.to_thread(answer, browser, wrong, "9999") for _ in range(LOCKOUT)]
    assert "Attempts left: 2" in pages[0] and "Attempts left: 1" in pages[1]
    assert "This link is locked" in pages[-1]
    assert event2.member.name not in "".join(pages)
    locked = await asyncio.to_thread(visit, browser, f"{server.url}/p/{token2}")
    assert "This link is locked" in locked

    trail = [str(r.action) for r in await audit.records(event_id=event2.event_id)]
    assert trail.count("portal_pickup_failed") == LOCKOUT and "portal_locked" in trail
