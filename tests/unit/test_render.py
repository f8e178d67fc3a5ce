"""Rendering: a readable EOB in the member's language, and headers that carry no PHI."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import Environment, PackageLoader, StrictUndefined

from eobblast.events import EobIssued, validate_event
from eobblast.render import Renderer
from eobblast.render.mime import _quoted_printable


def _event(doc: dict[str, Any]) -> EobIssued:
    event = validate_event(orjson.dumps(doc), allow_test_domains=True)
    assert isinstance(event, EobIssued)
    return event


def _parts(raw: bytes) -> tuple[email.message.EmailMessage, str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    return msg, text.get_content(), html.get_content()


def test_english_eob_is_readable_and_complete(event_doc: dict[str, Any]) -> None:
    event_doc["member"]["preferred_language"] = "en"
    event = _event(event_doc)
    msg, text, html = _parts(Renderer().render(event).to_bytes())
    assert msg.get_content_type() == "multipart/alternative"
    for body in (text, html):
        assert "THIS IS NOT A BILL" in body
        assert event.member.name in body
        assert event.claim.id in body
        for line in event.claim.lines:
            assert line.code in body
        assert "appeal" in body.lower()
    assert msg["Subject"] == "Your Explanation of Benefits is ready"


def test_spanish_member_gets_spanish(event_doc: dict[str, Any]) -> None:
    event_doc["member"]["preferred_language"] = "es"
    msg, text, html = _parts(Renderer().render(_event(event_doc)).to_bytes())
    assert "ESTO NO ES UNA FACTURA" in text and "ESTO NO ES UNA FACTURA" in html
    assert msg["Subject"] == "Su Explicación de Beneficios está disponible"
    assert msg["Content-Language"] == "es"


def test_unknown_language_falls_back_to_english(event_doc: dict[str, Any]) -> None:
    event_doc["member"]["preferred_language"] = "fr"
    msg, text, html = _parts(Renderer().render(_event(event_doc)).to_bytes())
    assert "THIS IS NOT A BILL" in text
    # The message says which language it is in: the one served, not the one asked for.
    assert msg["Content-Language"] == "en"
    assert '<html lang="en">' in html


def test_totals_add_up(event_doc: dict[str, Any]) -> None:
    event = _event(event_doc)
    ctx = Renderer().context(event)
    from decimal import Decimal

    paid = sum(Decimal(line.plan_paid) for line in event.claim.lines)
    assert ctx["totals"]["plan_paid"] == f"${paid:,.2f}"


def test_html_is_escaped(event_doc: dict[str, Any]) -> None:
    event_doc["claim"]["provider"]["name"] = "<script>alert(1)</script> Clinic"
    _, text, html = _parts(Renderer().render(_event(event_doc)).to_bytes())
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<script>alert(1)</script> Clinic" in text  # plain text is not HTML


def test_sentences_with_names_are_escaped_in_html_only(event_doc: dict[str, Any]) -> None:
    # Greeting, intro and appeal sentence are filled in before the template sees them:
    # the whole sentence must still go through autoescape, and the text part stay raw.
    event_doc["member"]["name"] = "Ann <b>&</b> O'Neil"
    event_doc["payer"]["name"] = "Plan <i>"
    for language, greeting in (("en", "Dear {},"), ("es", "Estimado/a {}:")):
        event_doc["member"]["preferred_language"] = language
        _, text, html = _parts(Renderer().render(_event(event_doc)).to_bytes())
        assert greeting.format("Ann <b>&</b> O'Neil") in text
        assert greeting.format("Ann &lt;b&gt;&amp;&lt;/b&gt; O&#39;Neil") in html
        assert "Plan <i>" in text and "Plan &lt;i&gt;" in html and "Plan <i>" not in html
        assert event_doc["appeal"]["deadline"] in text and event_doc["appeal"]["deadline"] in html


def test_words_compiled_in_render_like_the_plain_templates(event_doc: dict[str, Any]) -> None:
    # The renderer compiles each language's words into its templates; the templates as
    # written, rendered the ordinary way, must give the very same parts.
    event_doc["member"]["name"] = "Zoë <O'Neil> & Co"
    renderer = Renderer()
    for language in ("en", "es", "pt-BR"):
        event_doc["member"]["preferred_language"] = language
        event = _event(event_doc)
        rendered = renderer.render(event)
        for name, autoescape in (("eob.txt.j2", False), ("eob.html.j2", True)):
            env = Environment(
                loader=PackageLoader("eobblast.render", "templates"),
                undefined=StrictUndefined,
                trim_blocks=True,
                lstrip_blocks=True,
                autoescape=autoescape,
            )
            expected = env.get_template(name).render(renderer.context(event))
            assert _quoted_printable(expected) in rendered.body


def test_headers_carry_no_phi(event_doc: dict[str, Any]) -> None:
    event = _event(event_doc)
    rendered = Renderer().render(event)
    header_text = b"\n".join(name + b": " + value for name, value in rendered.headers).decode()
    phi = [event.member.name, event.claim.patient_name, event.claim.provider.name, event.member.id]
    phi += [line.billed for line in event.claim.lines] + [event.claim.id]
    for value in phi:
        assert value not in header_text
    assert event.member.email in header_text  # the recipient's address is the one exception


@settings(max_examples=150, deadline=None)
@given(name=st.text(min_size=1, max_size=80))
def test_no_field_value_can_create_a_header(name: str) -> None:
    # Whatever the validator lets through into a name can never add a header line.
    from eobblast.events.synthetic import generate_events
    from tests.conftest import CLEAN

    doc = orjson.loads(next(generate_events(1, seed=1, mix=CLEAN)))
    doc["member"]["name"] = name
    doc["claim"]["provider"]["name"] = name
    result = validate_event(orjson.dumps(doc), allow_test_domains=True)
    if not isinstance(result, EobIssued):
        return
    raw = Renderer().render(result).to_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n") if line[:1] not in b" \t"]
    assert names == [
        b"From",
        b"To",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"MIME-Version",
        b"Content-Type",
        b"Content-Language",
        b"X-EOB-Event-ID",
    ]
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
