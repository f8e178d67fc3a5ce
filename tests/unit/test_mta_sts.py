"""MTA-STS parsing, MX matching and the policy cache: pure, no sockets (RFC 8461)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eobblast.protect.mta_sts import (
    MAX_AGE_LIMIT,
    CachedPolicy,
    PolicyCache,
    StoredPolicy,
    StsMode,
    StsPolicy,
    StsProblem,
    StsRecord,
    mx_matches,
    parse_policy,
    parse_txt,
    policy_from_columns,
)

# --- the _mta-sts TXT record -------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=20160831085700Z"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1; id=abc;"], "abc"),  # a trailing delimiter is allowed
        (["v = STSv1 ;\tid = abc ; "], "abc"),  # whitespace around = and ;
        (["v=STSv1; id=abc; ext.x-1=some:value"], "abc"),  # extensions are ignored
        (["v=STSv1; foo=bar; id=A1b2"], "A1b2"),  # id need not come first
        (["v=STSv1; id=" + "a" * 32], "a" * 32),
        # other TXT records at the name are not ours, whatever they say
        (["google-site-verification=xyz", "v=STSv1; id=abc", "v=spf1 -all"], "abc"),
    ],
)
def test_valid_txt_records(texts: list[str], expected: str) -> None:
    assert parse_txt(texts) == StsRecord(expected)


@pytest.mark.parametrize(
    ("texts", "problem"),
    [
        ([], StsProblem.NO_RECORD),
        (["v=spf1 -all"], StsProblem.NO_RECORD),
        (["v=STSv2; id=abc"], StsProblem.NO_RECORD),
        (["v=STSv10; id=abc"], StsProblem.NO_RECORD),  # not the version, a longer word
        (["V=STSv1; id=abc"], StsProblem.NO_RECORD),  # the version is case-sensitive
        ([" v=STSv1; id=abc"], StsProblem.NO_RECORD),  # must begin the record
        (["v=STSv1; id=abc", "v=STSv1; id=def"], StsProblem.TXT_MULTIPLE),
        (["v=STSv1"], StsProblem.TXT_SYNTAX),  # at least one field
        (["v=STSv1;"], StsProblem.TXT_NO_ID),
        (["v=STSv1 id=abc"], StsProblem.TXT_SYNTAX),  # no delimiter
        (["v=STSv1;; id=abc"], StsProblem.TXT_SYNTAX),  # an empty field
        (["v=STSv1; id"], StsProblem.TXT_SYNTAX),
        (["v=STSv1; id="], StsProblem.TXT_SYNTAX),
        (["v=STSv1; =abc"], StsProblem.TXT_SYNTAX),
        (["v=STSv1; id=a b"], StsProblem.TXT_SYNTAX),
        (["v=STSv1; id=ab=c"], StsProblem.TXT_SYNTAX),  # = is not a value character
        (["v=STSv1; id=" + "a" * 33], StsProblem.TXT_SYNTAX),
        (["v=STSv1; id=ab-c"], StsProblem.TXT_SYNTAX),  # an id is letters and digits
        (["v=STSv1; id=abc; id=def"], StsProblem.TXT_SYNTAX),  # which one?
        (["v=STSv1; foo=bar"], StsProblem.TXT_NO_ID),
        (["v=STSv1; ID=abc"], StsProblem.TXT_NO_ID),  # field names are case-sensitive
    ],
)
def test_malformed_txt_records(texts: list[str], problem: StsProblem) -> None:
    assert parse_txt(texts) is problem


# --- the policy file ---------------------------------------------------------------------

POLICY = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    b"max_age: 86400\r\n"
)


def test_a_valid_policy() -> None:
    assert parse_policy(POLICY) == StsPolicy(
        StsMode.ENFORCE, 86400, ("mail.example.com", "*.example.net")
    )


@pytest.mark.parametrize(
    "body",
    [
        POLICY.replace(b"\r\n", b"\n"),  # LF alone
        POLICY.rstrip(b"\r\n"),  # no final line end
        POLICY + b"\r\n\r\n",  # trailing blank lines
        POLICY.replace(b": ", b":"),  # no space after the colon
        POLICY.replace(b"\r\n", b"  \r\n"),  # trailing whitespace
        b"mx: *.example.net\nmax_age: 86400\nfoo_bar: anything at all\nversion: STSv1\n"
        b"mode: enforce\nmx: MAIL.Example.COM\n",  # any order, an extension, upper case
    ],
)
def test_policy_layouts_that_mean_the_same(body: bytes) -> None:
    policy = parse_policy(body)
    assert isinstance(policy, StsPolicy)
    assert policy.mode is StsMode.ENFORCE and policy.max_age == 86400
    assert set(policy.mx) == {"mail.example.com", "*.example.net"}


@pytest.mark.parametrize("mode", list(StsMode))
def test_each_mode(mode: StsMode) -> None:
    policy = parse_policy(POLICY.replace(b"enforce", mode.encode()))
    assert isinstance(policy, StsPolicy) and policy.mode is mode


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 0\n") == StsPolicy(
        StsMode.NONE, 0, ()
    )


@pytest.mark.parametrize("max_age", [b"0", b"1", str(MAX_AGE_LIMIT).encode()])
def test_max_age_within_bounds(max_age: bytes) -> None:
    policy = parse_policy(POLICY.replace(b"86400", max_age))
    assert isinstance(policy, StsPolicy) and policy.max_age == int(max_age)


def _without(field: bytes) -> bytes:
    return b"".join(line for line in POLICY.splitlines(True) if not line.startswith(field))


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", StsProblem.POLICY_VERSION),
        (b"\xff\xfe", StsProblem.POLICY_ENCODING),
        (POLICY.replace(b"STSv1", b"STSv2"), StsProblem.POLICY_VERSION),
        (POLICY.replace(b"version", b"Version"), StsProblem.POLICY_VERSION),
        (_without(b"version"), StsProblem.POLICY_VERSION),
        (POLICY.replace(b"enforce", b"Enforce"), StsProblem.POLICY_MODE),
        (POLICY.replace(b"enforce", b"reject"), StsProblem.POLICY_MODE),
        (_without(b"mode"), StsProblem.POLICY_MODE),
        (_without(b"max_age"), StsProblem.POLICY_MAX_AGE),
        (POLICY.replace(b"86400", str(MAX_AGE_LIMIT + 1).encode()), StsProblem.POLICY_MAX_AGE),
        (POLICY.replace(b"86400", b"12345678901"), StsProblem.POLICY_MAX_AGE),  # 11 digits
        (POLICY.replace(b"86400", b"-1"), StsProblem.POLICY_MAX_AGE),
        (POLICY.replace(b"86400", b"1e5"), StsProblem.POLICY_MAX_AGE),
        # fullwidth digits, which str.isdigit takes
        (POLICY.replace(b"86400", "\uff18\uff16\uff14".encode()), StsProblem.POLICY_MAX_AGE),
        (POLICY.replace(b"86400", b""), StsProblem.POLICY_MAX_AGE),
        (_without(b"mx"), StsProblem.POLICY_MX),  # enforce with no MX allowed
        (_without(b"mx").replace(b"enforce", b"testing"), StsProblem.POLICY_MX),
        (POLICY + b"mx: mail.*.example.com\n", StsProblem.POLICY_MX),  # wildcard not leftmost
        (POLICY + b"mx: *\n", StsProblem.POLICY_MX),
        (POLICY + b"mx: *.\n", StsProblem.POLICY_MX),
        (POLICY + b"mx: **.example.com\n", StsProblem.POLICY_MX),
        (POLICY + b"mx: mail.example.com.\n", StsProblem.POLICY_MX),
        (POLICY + b"mx: -mail.example.com\n", StsProblem.POLICY_MX),
        (POLICY + b"mx: mail..example.com\n", StsProblem.POLICY_MX),
        (POLICY + b"mx: mail_x.example.com\n", StsProblem.POLICY_MX),
        (POLICY + b"mx: " + b"a" * 64 + b".com\n", StsProblem.POLICY_MX),
        (POLICY + b"mx:\n", StsProblem.POLICY_MX),
        (POLICY + b"mode: testing\n", StsProblem.POLICY_DUPLICATE),
        (POLICY + b"max_age: 1\n", StsProblem.POLICY_DUPLICATE),
        (POLICY + b"version: STSv1\n", StsProblem.POLICY_DUPLICATE),
        (POLICY + b"no colon here\n", StsProblem.POLICY_SYNTAX),
        (POLICY + b"mode : enforce\n", StsProblem.POLICY_SYNTAX),  # space before the colon
        (b"<html><body>Not found</body></html>", StsProblem.POLICY_SYNTAX),
    ],
)
def test_malformed_policies(body: bytes, problem: StsProblem) -> None:
    assert parse_policy(body) is problem


@given(st.binary(max_size=400))
def test_parsing_any_bytes_never_raises(body: bytes) -> None:
    assert isinstance(parse_policy(body), StsPolicy | StsProblem)


@given(st.lists(st.text(max_size=80), max_size=4))
def test_parsing_any_txt_never_raises(texts: list[str]) -> None:
    assert isinstance(parse_txt(texts), StsRecord | StsProblem)


# --- MX matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com.", True),  # case and a trailing dot
        ("mail.example.com", "mail2.example.com", False),
        ("mail.example.com", "x.mail.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "MX1.EXAMPLE.COM.", True),
        ("*.example.com", "example.com", False),  # the wildcard is one whole label
        ("*.example.com", "a.b.example.com", False),  # and only one
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mx1.example.org", False),
        ("*.example.com", "mx1.badexample.com", False),
    ],
)
def test_mx_matching(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


def test_a_policy_allows_hosts_matching_any_pattern() -> None:
    policy = StsPolicy(StsMode.ENFORCE, 60, ("mail.example.com", "*.example.net"))
    assert policy.allows("mail.example.com") and policy.allows("mx.example.net")
    assert not policy.allows("mx.attacker.test")


# --- the cache ---------------------------------------------------------------------------

ENFORCE = StsPolicy(StsMode.ENFORCE, 100, ("mx.example.com",))


def test_an_unknown_domain_is_due_and_has_no_policy() -> None:
    cache = PolicyCache(recheck=10)
    assert cache.due("example.com", 0) and cache.current("example.com", 0) is None
    assert cache.needs_fetch("example.com", StsRecord("a"), 0)


def test_a_stored_policy_lasts_max_age_and_is_rechecked_meanwhile() -> None:
    cache = PolicyCache(recheck=10)
    cache.store("example.com", ENFORCE, StsRecord("a"), 0)
    assert cache.current("example.com", 99.9) is ENFORCE
    assert cache.current("example.com", 100) is None  # max_age passed
    assert not cache.due("example.com", 9.9) and cache.due("example.com", 10)


def test_the_same_id_needs_no_fetch_a_new_id_does() -> None:
    cache = PolicyCache(recheck=10)
    cache.store("example.com", ENFORCE, StsRecord("a"), 0)
    assert not cache.needs_fetch("example.com", StsRecord("a"), 50)
    assert cache.needs_fetch("example.com", StsRecord("b"), 50)
    assert cache.needs_fetch("example.com", StsRecord("a"), 100)  # expired: fetch again


def test_a_failed_refresh_keeps_a_valid_policy_until_it_expires() -> None:
    cache = PolicyCache(recheck=10)
    cache.store("example.com", ENFORCE, StsRecord("a"), 0)
    cache.checked("example.com", 50)  # the refresh failed
    assert cache.current("example.com", 50) is ENFORCE
    assert not cache.due("example.com", 55) and cache.due("example.com", 60)
    cache.checked("example.com", 100)
    assert cache.current("example.com", 100) is None


def test_a_domain_without_a_policy_is_not_looked_up_again_until_recheck() -> None:
    cache = PolicyCache(recheck=10)
    cache.checked("example.com", 0)
    assert cache.current("example.com", 0) is None
    assert not cache.due("example.com", 9) and cache.due("example.com", 10)


def test_the_cache_keeps_a_bounded_number_of_domains() -> None:
    cache = PolicyCache(recheck=10, max_domains=3)
    for n in range(10):
        cache.store(f"d{n}.test", ENFORCE, StsRecord("a"), 0)
    assert len(cache) == 3
    assert cache.current("d9.test", 1) is ENFORCE and cache.current("d0.test", 1) is None


# --- policies kept in the shared table (wall clock) ----------------------------------------

WALL = 1_800_000_000.0


def test_a_stored_policy_lasts_what_is_left_of_it() -> None:
    # Written 40 s ago (wall clock), read by a process whose monotonic clock reads 5.
    stored = StoredPolicy("example.com", "a", ENFORCE, WALL + 60)
    cached = stored.cached(5.0, WALL)
    assert cached is not None and cached.expires_at == 65.0 and cached.id == "a"


@pytest.mark.parametrize("wall_now", [WALL + 60, WALL + 61, WALL + 10**9])
def test_an_expired_stored_policy_is_not_used(wall_now: float) -> None:
    assert StoredPolicy("example.com", "a", ENFORCE, WALL + 60).cached(5.0, wall_now) is None


@pytest.mark.parametrize("step", [1.0, 100.0, 10**9])
def test_a_clock_stepped_back_never_keeps_a_policy_past_max_age(step: float) -> None:
    # Written at WALL with max_age 100, read after the wall clock went back by `step`: more
    # than max_age left is no expiry this policy was given. Capped to max_age instead, the
    # row would be good for another max_age each time it is read again, for ever.
    stored = StoredPolicy("example.com", "a", ENFORCE, WALL + 100)
    assert stored.cached(5.0, WALL - step) is None
    assert stored.cached(5.0, WALL) is not None  # read as written: all of it left


@pytest.mark.parametrize("expires_at", [float("nan"), float("inf")])
def test_a_stored_expiry_that_is_no_time_is_not_used(expires_at: float) -> None:
    assert StoredPolicy("example.com", "a", ENFORCE, expires_at).cached(5.0, WALL) is None


def test_a_restored_policy_is_cached_and_its_domain_looked_up_at_once() -> None:
    cache = PolicyCache(recheck=10)
    stored = StoredPolicy("example.com", "a", ENFORCE, WALL + 60).cached(0.0, WALL)
    assert stored is not None
    cache.restore("example.com", stored, 0.0)
    assert cache.current("example.com", 59.9) is ENFORCE
    assert cache.current("example.com", 60.0) is None
    assert cache.due("example.com", 0.0)
    assert not cache.needs_fetch("example.com", StsRecord("a"), 1.0)  # same id: no fetch
    assert cache.needs_fetch("example.com", StsRecord("b"), 1.0)


def test_a_restored_policy_never_replaces_a_valid_one_of_the_same_id() -> None:
    cache = PolicyCache(recheck=10)
    cache.store("example.com", ENFORCE, StsRecord("a"), 0.0)
    testing = StsPolicy(StsMode.TESTING, 100, ("mx.example.com",))
    cache.restore("example.com", CachedPolicy(testing, "a", 50.0), 1.0)
    assert cache.current("example.com", 60.0) is ENFORCE  # this process's, to 100 s


def test_a_restored_policy_of_the_id_the_record_names_replaces_an_older_one() -> None:
    # The TXT record now names id "b", which another worker fetched and stored.
    cache = PolicyCache(recheck=10)
    cache.store("example.com", ENFORCE, StsRecord("a"), 0.0)
    testing = StsPolicy(StsMode.TESTING, 100, ("mx.example.com",))
    cache.restore("example.com", CachedPolicy(testing, "b", 80.0), 1.0)
    assert cache.current("example.com", 1.0) is testing
    assert not cache.needs_fetch("example.com", StsRecord("b"), 1.0)


def test_stored_columns_give_back_the_policy() -> None:
    policy = StsPolicy(StsMode.ENFORCE, 86400, ("mx.example.com", "*.example.net"))
    assert policy_from_columns("enforce", 86400, "mx.example.com *.example.net") == policy
    assert policy_from_columns("none", 60, "") == StsPolicy(StsMode.NONE, 60, ())


@pytest.mark.parametrize(
    ("mode", "max_age", "mx"),
    [
        ("reject", 60, "mx.example.com"),
        ("enforce\nmode: none", 60, "mx.example.com"),
        ("enforce", -1, "mx.example.com"),
        ("enforce", MAX_AGE_LIMIT + 1, "mx.example.com"),
        ("enforce", 60, ""),
        ("enforce", 60, "bad_host!"),
    ],
)
def test_stored_columns_that_make_no_valid_policy_give_none(
    mode: str, max_age: int, mx: str
) -> None:
    assert policy_from_columns(mode, max_age, mx) is None
