"""Our relaxed canonicalisation gives exactly dkimpy's result, whatever the bytes."""

from __future__ import annotations

import pytest
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from eobblast.protect.dkim import _signed_header_data, relaxed_body, relaxed_header

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")

# Bytes that matter to canonicalisation, weighted up so runs, line ends and their
# near misses (lone CR, lone LF, CR before CRLF) turn up often; any other byte too.
_SPECIAL = st.sampled_from([b" ", b"\t", b"\r\n", b"\r", b"\n", b"  \t ", b"a", b".", b"="])
_CHUNKS = st.lists(st.one_of(_SPECIAL, st.binary(max_size=8)), max_size=60).map(b"".join)


def dkimpy_body(body: bytes) -> bytes:
    """dkimpy's canonical body of what the wire carries: the body, CRLF-terminated."""
    # A body without a final CRLF gets one in transit (SMTP DATA ends with CRLF.CRLF), and
    # the verifier canonicalises what arrived. dkimpy itself would keep the last line's
    # trailing WSP there; RFC 6376 section 3.4.4 and we drop it, as the verifier will.
    wire = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    result: bytes = RELAXED.canonicalize_body(wire)
    return result


@settings(max_examples=1000, deadline=None)
@given(_CHUNKS)
@example(b"")
@example(b"\r\n")
@example(b"\r\n\r\n\r\n")
@example(b"  \r\n\t\r\n")
@example(b"   ")
@example(b"a  \t b \r\n\r\n")
@example(b"  leading\r\n\tand tab\r\n")
@example(b"a \r\r\n\r\n")
@example(b"x\r")
@example(b"x \r \r\n")
def test_relaxed_body_matches_dkimpy(body: bytes) -> None:
    assert relaxed_body(body) == dkimpy_body(body)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_CHUNKS, st.text().map(str.encode)), max_size=40))
def test_relaxed_body_of_crlf_lines_matches_dkimpy(lines: list[bytes]) -> None:
    body = b"\r\n".join(lines) + b"\r\n" if lines else b""
    assert relaxed_body(body) == dkimpy_body(body)


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b"", b""),
        (b"\r\n\r\n", b""),
        (b"  indented\r\n", b" indented\r\n"),  # a leading run becomes one SP, not nothing
        (b"a \t b\t\r\n", b"a b\r\n"),
        (b"last line  ", b"last line\r\n"),
        (b"text\r\n\r\n\r\n", b"text\r\n"),
        (b"keep\r\n\r\ninner\r\n\r\n", b"keep\r\n\r\ninner\r\n"),
        (b"lone\rcr \n lf\r\n", b"lone\rcr \n lf\r\n"),  # only CRLF ends a line
    ],
)
def test_relaxed_body_examples(body: bytes, canonical: bytes) -> None:
    assert relaxed_body(body) == canonical


_NAMES = st.one_of(
    st.sampled_from([b"From", b"SUBJECT", b"Content-Type", b"X-Trace \t", b"to"]),
    st.binary(max_size=12).filter(lambda name: b":" not in name),
)


@settings(max_examples=1000, deadline=None)
@given(_NAMES, _CHUNKS)
@example(b"Subject", b" Your Explanation\r\n\tof   Benefits  ")
@example(b"From", b"\r\n x\n")
@example(b"To", b"\x0b a \x0c")
def test_relaxed_header_matches_dkimpy(name: bytes, value: bytes) -> None:
    ((lname, lvalue),) = RELAXED.canonicalize_headers([(name, value)])
    assert relaxed_header(name, value) == lname + b":" + lvalue


_VALUES = st.one_of(
    st.sampled_from([b" plain value", b" a  b", b" folded\r\n\tline", b"\tx ", b" "]), _CHUNKS
)


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
    st.lists(
        st.sampled_from([b"from", b"subject", b"content-type", b"x-trace", b"to"]), max_size=8
    ),
)
def test_signed_header_data_is_dkimpys_fields_taken_bottom_up(
    headers: list[tuple[bytes, bytes]], extra: list[bytes]
) -> None:
    names = [name.lower().rstrip() for name, _ in headers]
    include = names[::2] + extra
    # The verifier's choice (RFC 6376 section 5.4.2): each h= name takes the bottom-most
    # occurrence not yet taken, and nothing once they are all taken.
    taken: set[int] = set()
    expected = b""
    for wanted in include:
        left = [i for i, name in enumerate(names) if name == wanted and i not in taken]
        if left:
            taken.add(left[-1])
            ((lname, lvalue),) = RELAXED.canonicalize_headers([headers[left[-1]]])
            expected += lname + b":" + lvalue
    assert _signed_header_data(names, headers, include) == expected
