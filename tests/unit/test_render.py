"""Rendering: a readable EOB in the member's language, and headers that carry no PHI."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import email.utils
import re
from decimal import Decimal
from email.header import decode_header, make_header
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jinja2 import Environment, PackageLoader, StrictUndefined

from eobblast.events import EobIssued, Rejection, validate_event
from eobblast.render import Renderer
from eobblast.render.mime import (
    BOUNDARY_PREFIX,
    _from_header,
    _money,
    _money_text,
    _quoted_printable,
    _transfer_encoded,
)


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


def _template_texts(renderer: Renderer, event: EobIssued) -> tuple[str, str]:
    """The text and HTML parts as the templates write them (LF line ends)."""
    ctx = renderer.context(event)
    texts = []
    for name, autoescape in (("eob.txt.j2", False), ("eob.html.j2", True)):
        env = Environment(
            loader=PackageLoader("eobblast.render", "templates"),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=autoescape,
        )
        texts.append(env.get_template(name).render(ctx))
    return texts[0], texts[1]


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
        for expected in _template_texts(renderer, event):
            assert _transfer_encoded(expected)[1] in rendered.body


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


@pytest.mark.parametrize(
    "amount",
    [
        "\U00011f51\U00011f51.\U00011f50\U00011f50",  # Kawi digits
        "\u0661\u0662.\u0665\u0660",  # Arabic-Indic
        "\uff11\uff12.\uff15\uff10",  # fullwidth
    ],
)
def test_amounts_in_other_scripts_digits_are_refused_not_a_crash(
    event_doc: dict[str, Any], amount: str
) -> None:
    # The validator's \d took any script's digits; Decimal did not know some of them and
    # the event failed with internal_error instead of going to the dead-letter topic.
    event_doc["claim"]["lines"][0]["billed"] = amount
    rejected = validate_event(orjson.dumps(event_doc), allow_test_domains=True)
    assert isinstance(rejected, Rejection) and rejected.field == "claim.lines.0.billed"


def test_negative_amounts_put_the_sign_before_the_currency(event_doc: dict[str, Any]) -> None:
    line = event_doc["claim"]["lines"][0]
    line["coinsurance"], line["copay"] = "-1234.00", "-0.00"
    _, text, html = _parts(Renderer().render(_event(event_doc)).to_bytes())
    for body in (text, html):
        assert "-$1,234.00" in body and "$-" not in body and "-$0.00" not in body


@pytest.mark.parametrize(
    "event_id", ["urn:uuid:6f1c2a9e-8a55-4c1e-9a57-0d3c5c1e2b7a", "a..b.", "x"]
)
def test_every_event_id_makes_a_message_id_that_parses(
    event_doc: dict[str, Any], event_id: str
) -> None:
    event_doc["event_id"] = event_id
    event = _event(event_doc)
    for raw in (
        Renderer().render(event).to_bytes(),
        Renderer()
        .render_notice(event, link="https://p.test/p/x", expires=dt.date(2026, 12, 1))
        .to_bytes(),
    ):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        header = msg["Message-ID"]
        assert not header.defects, header.defects
        assert header.endswith(f"@{event.payer.sending_domain}>")


def test_a_long_non_ascii_payer_name_is_folded_into_short_encoded_words(
    event_doc: dict[str, Any],
) -> None:
    name = "Compañía de Seguros Médicos del Atlántico Norte " + "😀" * 150
    event_doc["payer"]["name"] = name
    raw = Renderer().render(_event(event_doc)).to_bytes()
    head = raw.partition(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    assert all(len(word) <= 75 for word in re.findall(rb"=\?[^?]+\?[bBqQ]\?[^?]*\?=", head))
    # RFC 2047 6.2: the space between adjacent encoded words is not part of the text.
    value = email.message_from_bytes(raw)["From"]
    assert str(make_header(decode_header(value))) == f"{name} <eob-notices@bluehaven.test>"


@pytest.mark.parametrize(
    "name",
    [
        "Aseguradora Médica del Pacífico Occidental y Compañía de Seguros de Salud S.A. de C.V."
        " — División Beneficios",
        'Seguros "La Única", S.A. (México)',
        "Compañía a=?utf-8?q?x?= Ñ",
        "Caja de Previsión Social",
        # ASCII, but with what looks like an encoded word: shown as it is, not decoded.
        "Banco =?utf-8?b?U2VndXJv?=",
    ],
)
def test_a_non_ascii_payer_name_reads_back_whole_in_either_email_parser(name: str) -> None:
    # Encoded words stand between ASCII words, and a run of others is one encoded word when
    # it fits: Python's email parser keeps a space between two adjacent encoded words that
    # RFC 2047 says is not there ("Compa ñía"); other readers follow the RFC.
    raw = b"From: " + _from_header(name, "eob@payer.test") + b"\r\n\r\n"
    modern = email.message_from_bytes(raw, policy=email.policy.default)["From"]
    assert not modern.defects
    assert modern.addresses[0].display_name == name
    assert modern.addresses[0].addr_spec == "eob@payer.test"
    legacy = email.message_from_bytes(raw)["From"]
    assert str(make_header(decode_header(legacy))) == f"{name} <eob@payer.test>"


@settings(max_examples=300, deadline=None)
@given(
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=200).filter(
        lambda name: not name.isascii()
    )
)
@example("Ñ" + "a" * 70)  # the longest Q-encoded first word
@example("A" * 70 + " é")  # the longest atom first
@example("株式会社\u3000日本健康保険組合連合会東京都支部第一事業部")
def test_any_non_ascii_payer_name_reads_back_and_keeps_to_the_line_limits(name: str) -> None:
    raw = b"From: " + _from_header(name, "eob@payer.test") + b"\r\n\r\n"
    head = raw.partition(b"\r\n\r\n")[0]
    # RFC 2047: a line with an encoded word is at most 76 characters; the address's own
    # line aside.
    assert max(len(line) for line in head.split(b"\r\n")[:-1]) <= 76
    legacy = email.message_from_bytes(raw)["From"]
    assert str(make_header(decode_header(legacy))) == f"{name} <eob@payer.test>"
    modern = email.message_from_bytes(raw, policy=email.policy.default)["From"]
    assert modern.addresses[0].addr_spec == "eob@payer.test"


@settings(max_examples=500, deadline=None)
@given(st.from_regex(r"-?[0-9]{1,10}\.[0-9]{2}", fullmatch=True))
def test_amounts_print_as_their_decimal_value_formats(amount: str) -> None:
    # The pattern is the schema's: most amounts skip the Decimal, none may print otherwise.
    assert _money_text(amount) == _money(Decimal(amount))


@pytest.mark.parametrize(
    ("amount", "printed"),
    [
        ("0.00", "$0.00"),
        ("-0.00", "$0.00"),
        ("-0.01", "-$0.01"),
        ("012.50", "$12.50"),
        ("999.99", "$999.99"),
        ("1000.00", "$1,000.00"),
        ("-1234.00", "-$1,234.00"),
        ("9999999999.99", "$9,999,999,999.99"),
    ],
)
def test_money_examples(amount: str, printed: str) -> None:
    assert _money_text(amount) == printed


@pytest.mark.parametrize("amount", ["12.5", "12.345", "1e3", ".50", "+1.00", " 1.00"])
def test_amounts_other_than_the_printable_pattern_are_refused(
    event_doc: dict[str, Any], amount: str
) -> None:
    # _money_text prints such an amount's text as it is; the schema must never let it by.
    event_doc["claim"]["lines"][0]["billed"] = amount
    rejected = validate_event(orjson.dumps(event_doc), allow_test_domains=True)
    assert isinstance(rejected, Rejection) and rejected.field == "claim.lines.0.billed"


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("plain\nlines\n", b"7bit"),
        ("a tab\there, trailing space \n.\n", b"7bit"),
        ("x" * 998, b"7bit"),
        ("a\n" + "x" * 998 + "\nb", b"7bit"),
        ("x" * 999, b"quoted-printable"),
        ("a\n" + "x" * 999 + "\nb", b"quoted-printable"),
        ("caf\u00e9", b"quoted-printable"),
        ("nul \x00", b"quoted-printable"),
        ("bell \x07", b"quoted-printable"),
        ("delete \x7f", b"quoted-printable"),
        ("lone\rcr", b"quoted-printable"),
        ("crlf\r\nline", b"quoted-printable"),
        (f"--{BOUNDARY_PREFIX}{'0' * 32}--", b"quoted-printable"),
        (f"a {BOUNDARY_PREFIX} b", b"quoted-printable"),
    ],
)
def test_parts_are_sent_7bit_only_when_they_are_7bit_data(text: str, encoding: bytes) -> None:
    assert _transfer_encoded(text)[0] == encoding


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["\n", "\r", "\r\n", "\t", " ", "=", ".", "x" * 500, BOUNDARY_PREFIX]),
            st.text(max_size=20),
            st.text(st.characters(max_codepoint=127), max_size=40),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
        ),
        max_size=30,
    ).map("".join)
)
def test_a_7bit_part_is_the_text_itself_with_crlf_lines(text: str) -> None:
    encoding, body = _transfer_encoded(text)
    if encoding == b"quoted-printable":
        assert body == _quoted_printable(text)
        return
    assert encoding == b"7bit"
    assert body == text.replace("\n", "\r\n").encode("ascii")
    lines = body.split(b"\r\n")
    assert all(len(line) <= 998 and b"\r" not in line and b"\n" not in line for line in lines)
    assert all(byte in b"\t" or 0x20 <= byte < 0x7F for byte in body.replace(b"\r\n", b""))
    assert BOUNDARY_PREFIX.encode() not in body


@pytest.mark.parametrize(
    ("language", "name", "encoding"),
    [
        ("en", "Chris Curtis", "7bit"),
        ("en", "Zoë Müller", "quoted-printable"),
        ("es", "Chris Curtis", "quoted-printable"),
    ],
)
def test_ascii_parts_go_7bit_and_every_part_decodes_to_what_was_rendered(
    event_doc: dict[str, Any], language: str, name: str, encoding: str
) -> None:
    event_doc["member"]["preferred_language"] = language
    event_doc["member"]["name"] = name
    event = _event(event_doc)
    renderer = Renderer()
    raw = renderer.render(event).to_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = [part for part in msg.walk() if part.get_content_maintype() == "text"]
    assert [part["Content-Transfer-Encoding"] for part in parts] == [encoding, encoding]
    for part, expected in zip(parts, _template_texts(renderer, event), strict=True):
        # The email package keeps a 7bit part's CRLF; quoted-printable decodes to LF.
        assert part.get_content().replace("\r\n", "\n") == expected
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_the_date_field_is_the_send_time_in_its_own_zone(event_doc: dict[str, Any]) -> None:
    # Date fields are cached per second: one instant in two zones must still differ.
    renderer, event = Renderer(), _event(event_doc)
    utc = dt.datetime(2026, 11, 26, 9, 0, 0, 250_000, tzinfo=dt.UTC)
    berlin = utc.astimezone(dt.timezone(dt.timedelta(hours=1)))
    naive = utc.replace(tzinfo=None)
    for when in (utc, berlin, naive, utc, utc + dt.timedelta(seconds=1)):
        headers = dict(renderer.render(event, now=when).headers)
        assert headers[b"Date"] == email.utils.format_datetime(when).encode()
    assert dict(renderer.render(event, now=berlin).headers)[b"Date"].endswith(b" +0100")
