"""Field validators of eob.issued/v1 against the definitions they must keep to.

The address fast path must give email_validator's answer for every address it answers for;
the NPI check digit must be the CMS Luhn rule; money must keep its reason codes.
"""

from __future__ import annotations

from typing import Any

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict, TypeAdapter, ValidationError

from eobblast.errors import ReasonCode
from eobblast.events import Rejection, validate_event
from eobblast.events.schema import Email, Npi, _plain_address
from tests.conftest import spoiled

_STRICT = ConfigDict(strict=True)
_EMAIL = TypeAdapter(Email, config=_STRICT)
_NPI = TypeAdapter(Npi, config=_STRICT)


def _email_validator_answer(address: str, allow_test: bool) -> str | None:
    try:
        checked = validate_email(
            address,
            check_deliverability=False,
            test_environment=allow_test,
            allow_smtputf8=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
        )
    except EmailNotValidError:
        return None
    return checked.ascii_email


def _schema_answer(address: str, allow_test: bool) -> str | None:
    try:
        value: str = _EMAIL.validate_python(address, context={"allow_test_domains": allow_test})
    except ValidationError:
        return None
    return value


def _assert_agrees(address: str, allow_test: bool) -> str | None:
    expected = _email_validator_answer(address, allow_test)
    fast = _plain_address(address, allow_test=allow_test)
    assert fast is None or fast == expected
    assert _schema_answer(address, allow_test) == expected
    return fast


_DOMAIN_252 = ".".join(["b" * 63] * 3) + "." + "c" * 60
_SPECIAL_TOPS = ["test", "Test", "localhost", "LOCAL", "invalid", "arpa", "onion", "example"]
_ATOM_CHARS = "abzABZ09!#$%&'*+/=?^_`{|}~-"
_LDH = "abzAZ09-"


def _exactly(alphabet: str, size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=size, max_size=size)


_LOCAL_PARTS = st.one_of(
    st.lists(st.text(alphabet=_ATOM_CHARS, max_size=70), min_size=1, max_size=4).map(".".join),
    st.sampled_from(["info", "INFO", "PostMaster", "www", '"a b"', '"a"', "é", "a b", "a<b", "K"]),
    st.text(max_size=12),
)
_LABELS = st.one_of(
    st.sampled_from([1, 2, 3, 4, 10, 61, 62, 63, 64]).flatmap(lambda n: _exactly(_LDH, n)),
    st.sampled_from(
        [
            "xn--bcher-kva",
            "XN--P1AI",
            "ab--cd",
            "a--b",
            "",
            "-",
            "bücher",
            "a_b",
            "\uff43\uff4f\uff4d",
        ]
    ),
)
_TOP_LABELS = st.one_of(
    _LABELS, st.sampled_from([*_SPECIAL_TOPS, "1", "123", "c1", "a-b", "a" * 63, "a" * 64])
)
_DOMAINS = st.builds(
    lambda labels, top, dot: ".".join([*labels, top]) + dot,
    st.lists(_LABELS, max_size=4),
    _TOP_LABELS,
    st.sampled_from(["", "", "", "."]),
)


@st.composite
def _long_addresses(draw: st.DrawFn) -> str:
    # Around the 253-octet domain and 254-octet address limits, with 63-octet labels.
    local = draw(st.text(alphabet="abc", min_size=1, max_size=80))
    labels = ["a" * 63] * draw(st.integers(1, 3))
    top = "c" * draw(st.integers(1, 63))
    return f"{local}@{'.'.join([*labels, top])}"


_ADDRESSES = st.one_of(
    st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL_PARTS, _DOMAINS),
    _long_addresses(),
    st.text(max_size=30),
)


@given(address=_ADDRESSES, allow_test=st.booleans())
@settings(max_examples=1500)
def test_address_fast_path_gives_email_validators_answer(address: str, allow_test: bool) -> None:
    _assert_agrees(address, allow_test)


@pytest.mark.parametrize(
    ("address", "allow_test", "expected"),
    [
        ("a@b.co", False, "a@b.co"),
        ("Ann.Lee+eob@Sink.Bench.TEST", True, "Ann.Lee+eob@sink.bench.test"),
        ("a@b.test", False, None),  # test domains only with the opt-in
        (
            "o'neil!#$%&*/=?^_`{|}~-@x-1.example.com",
            False,
            "o'neil!#$%&*/=?^_`{|}~-@x-1.example.com",
        ),
        ("user@1.2.3.com", False, "user@1.2.3.com"),
        ("l" * 64 + "@b.com", False, "l" * 64 + "@b.com"),
        ("a@" + "b" * 63 + ".com", False, "a@" + "b" * 63 + ".com"),
        ("a@b." + "c" * 63, False, "a@b." + "c" * 63),
        ("a@" + _DOMAIN_252, False, "a@" + _DOMAIN_252),  # 254 octets, the most there may be
        ("ab@" + _DOMAIN_252, False, None),  # 255
    ],
)
def test_plain_addresses_take_the_fast_path(
    address: str, allow_test: bool, expected: str | None
) -> None:
    assert _assert_agrees(address, allow_test) == expected


@pytest.mark.parametrize(
    "address",
    [
        "a@mail.localhost",
        "a@LOCAL",
        "a@x.Local",
        "a@x.invalid",
        "a@10.in-addr.arpa",
        "a@x.onion",
        "a@test",
        "Info@b.com",  # RFC 2142 names come back lowercased
        "a@xn--bcher-kva.example",
        "a@ab--c.com",
        "a@a--b.com",  # valid, but any "--" goes to email_validator
        "a@b.c1",
        "a@b.123",
        "a@b",
        "a@-b.com",
        "a@b-.com",
        "a@b..com",
        "a@b.com.",
        ".a@b.com",
        "a.@b.com",
        "a..b@b.com",
        '"a"@b.com',
        "Ann <a@b.com>",
        "a@[192.0.2.1]",
        "a@b_c.com",
        "é@b.com",
        "a@bücher.example",
        "a@b.com\n",
        "a@" + "b" * 64 + ".com",
        "a@b." + "c" * 64,
        "a" * 64 + "@" + ".".join(["b" * 63] * 3),
        # email_validator's answer depends on its version (2.3+: only strict mode limits it)
        "l" * 65 + "@b.com",
    ],
)
@pytest.mark.parametrize("allow_test", [False, True])
def test_other_addresses_are_left_to_email_validator(address: str, allow_test: bool) -> None:
    assert _assert_agrees(address, allow_test) is None


def _luhn_npi_is_valid(npi: str) -> bool:
    # The CMS definition spelled out: Luhn over "80840" + the NPI, from the right.
    total = 0
    for i, digit in enumerate(int(c) for c in reversed("80840" + npi)):
        if i % 2 == 1:
            digit = sum(divmod(digit * 2, 10))
        total += digit
    return total % 10 == 0


def _npi_accepted(npi: str) -> bool:
    try:
        _NPI.validate_python(npi)
    except ValidationError:
        return False
    return True


@given(st.text(alphabet="0123456789", min_size=10, max_size=10))
@settings(max_examples=500)
def test_npi_check_digit_is_the_cms_luhn_rule(npi: str) -> None:
    assert _npi_accepted(npi) == _luhn_npi_is_valid(npi)


def test_every_single_digit_change_of_a_valid_npi_is_caught() -> None:
    valid = "1234567893"  # the CMS worked example
    assert _npi_accepted(valid)
    for position in range(10):
        for digit in "0123456789":
            changed = valid[:position] + digit + valid[position + 1 :]
            assert _npi_accepted(changed) == (changed == valid)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (12, ReasonCode.MONEY_NOT_DECIMAL_STRING),
        (-0.5, ReasonCode.MONEY_NOT_DECIMAL_STRING),
        (True, ReasonCode.WRONG_TYPE),
        (None, ReasonCode.WRONG_TYPE),
        (["12.34"], ReasonCode.WRONG_TYPE),
        ("12.5", ReasonCode.INVALID_VALUE),
        ("12.345", ReasonCode.INVALID_VALUE),
        ("12345678901.00", ReasonCode.INVALID_VALUE),
        ("١٢.٣٤", ReasonCode.INVALID_VALUE),
        ("12.34\n", ReasonCode.INVALID_VALUE),
    ],
)
def test_money_keeps_its_reasons(event_doc: dict[str, Any], value: Any, reason: ReasonCode) -> None:
    result = validate_event(
        spoiled(event_doc, "claim.lines.0.copay", value), allow_test_domains=True
    )
    assert isinstance(result, Rejection)
    assert (result.reason, result.field) == (reason, "claim.lines.0.copay")


@pytest.mark.parametrize("value", ["0.00", "-12.34", "9999999999.99"])
def test_money_accepts_decimal_strings(event_doc: dict[str, Any], value: str) -> None:
    raw = spoiled(event_doc, "accumulators.deductible.met", value)
    event = validate_event(raw, allow_test_domains=True)
    assert not isinstance(event, Rejection)
    assert event.accumulators.deductible.met == value
