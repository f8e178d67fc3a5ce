"""Portal escrow: EOBs held encrypted until the member picks them up or they expire.

When an EOB can be sent neither S/MIME-encrypted nor over verified TLS, the email carries a
notice and a single-use pickup link only; the EOB waits here. Each item is sealed with
envelope encryption: a fresh AES-256-GCM data key encrypts the payload (the rendered HTML
and the identity-check answers), and the active key of a `KeyRing` wraps that data key.
Both layers take the item id as associated data, so a ciphertext copied into another row
does not open. The database never holds the pickup token (only its SHA-256), the date of
birth, the member id or any EOB text in plaintext.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import enum
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import string
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eobblast._files import write_whole
from eobblast.errors import ConfigError, EobblastError, ReasonCode, StoreNotAnswering
from eobblast.observe.audit import AuditAction, AuditRecord, AuditTrail
from eobblast.observe.metrics import AUDIT_GAPS
from eobblast.state.fingerprints import fingerprint
from eobblast.state.postgres import PURGE_ANSWER_WAIT, connect_postgres
from eobblast.state.sqlite import open_sqlite, open_store, write_transaction

log = logging.getLogger("eobblast.escrow")

KEY_BYTES = 32
NONCE_BYTES = 12
_TAG_BYTES = 16
ENVELOPE_VERSION = 1
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_SUFFIX = ".key"
_ACTIVE_FILE = "active"
# Domain separation: a wrapped data key can never be mistaken for a payload, or vice versa.
_KEK_AAD = b"eobblast.escrow.v1.kek\x00"
_DEK_AAD = b"eobblast.escrow.v1.dek\x00"
DEFAULT_LOCKOUT_AFTER = 5
# The protection level's name in audit records (protect.policy.ProtectionLevel.PORTAL).
PORTAL_PROTECTION = "portal"
# Why an item was removed before its time: its event was escrowed again, with a new link.
SUPERSEDED = "superseded"


class EscrowError(EobblastError):
    """The escrow cannot do what was asked (details are fixed strings, never content)."""

    def __init__(self, detail: str) -> None:
        super().__init__(ReasonCode.INTERNAL_ERROR, detail)


class EscrowIntegrityError(EscrowError):
    """A sealed item failed authentication: tampered, swapped, or its key is gone."""


# --------------------------------------------------------------------------- key ring


def _check_key_id(key_id: str) -> str:
    if not _KEY_ID.match(key_id):
        raise ConfigError("escrow key ids are 1-64 characters of A-Z a-z 0-9 . _ -")
    return key_id


class KeyRing:
    """Named 256-bit key-encryption keys: one active for sealing, the rest kept for opening."""

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if len(key) != KEY_BYTES:
                raise ConfigError(f"escrow key {key_id} is not {KEY_BYTES} bytes")
        if active not in keys:
            raise ConfigError("the active escrow key is not in the key ring")
        self._aead = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._keys = dict(keys)
        self._active = active

    @property
    def active_id(self) -> str:
        """The id of the key that seals new items."""
        return self._active

    @property
    def key_ids(self) -> frozenset[str]:
        """Every key id the ring can open."""
        return frozenset(self._aead)

    def fingerprints(self, recorded_as: Callable[[str], str]) -> dict[str, str]:
        """Key id -> the fingerprint of the key, recorded under `recorded_as(key id)` (the
        escrow store records it, never the key)."""
        return {key_id: fingerprint(recorded_as(key_id), key) for key_id, key in self._keys.items()}

    @classmethod
    def from_mapping(cls, keys: Mapping[str, str], active: str) -> KeyRing:
        """A ring from config: key id -> base64 of 32 bytes."""
        decoded: dict[str, bytes] = {}
        for key_id, text in keys.items():
            try:
                decoded[key_id] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"escrow key {key_id} is not valid base64") from None
        return cls(decoded, active)

    @classmethod
    def from_directory(cls, directory: Path, *, not_keys: Collection[Path] = ()) -> KeyRing:
        """A ring from `<dir>/<key id>.key` files (base64) and `<dir>/active` naming one.

        `not_keys`: files that may lie there but are no escrow keys (the member-reference
        key does by default): a secret kept for another purpose never opens an envelope.
        """
        skip = {path.resolve() for path in not_keys}
        try:
            active = (directory / _ACTIVE_FILE).read_text("ascii").strip()
            texts = {
                path.name.removesuffix(_KEY_SUFFIX): path.read_text("ascii").strip()
                for path in directory.glob("*" + _KEY_SUFFIX)
                if path.resolve() not in skip
            }
        except OSError:
            raise ConfigError("cannot read the escrow key directory") from None
        except UnicodeDecodeError:
            raise ConfigError("escrow key files must be base64 text") from None
        return cls.from_mapping(texts, active)

    @classmethod
    def generate(
        cls, directory: Path, key_id: str | None = None, *, not_keys: Collection[Path] = ()
    ) -> KeyRing:
        """Add a new random key to `directory`, make it the active one, and load the ring.

        Older keys stay in the directory so items sealed with them still open: this is
        how keys are rotated.
        """
        key_id = _check_key_id(
            key_id or time.strftime("k%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / (key_id + _KEY_SUFFIX)
        key = base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n"
        # A key file is never overwritten, or items sealed with it would be lost.
        if not write_whole(path, key, mode=0o600, replace=False):
            raise FileExistsError(f"escrow key {key_id} exists already")
        # Written then renamed, so a reader never sees a half-written active file.
        write_whole(directory / _ACTIVE_FILE, key_id.encode("ascii") + b"\n", mode=0o600)
        return cls.from_directory(directory, not_keys=not_keys)

    def seal(self, item_id: str, plaintext: bytes) -> bytes:
        """Encrypt `plaintext` for `item_id` under a fresh data key wrapped by the active key."""
        key_id = self._active.encode("ascii")
        dek = AESGCM.generate_key(bit_length=256)
        wrap_nonce = secrets.token_bytes(NONCE_BYTES)
        wrapped = self._aead[self._active].encrypt(
            wrap_nonce, dek, _KEK_AAD + key_id + b"\x00" + item_id.encode()
        )
        data_nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = AESGCM(dek).encrypt(data_nonce, plaintext, _DEK_AAD + item_id.encode())
        return b"".join(
            (
                bytes((ENVELOPE_VERSION, len(key_id))),
                key_id,
                wrap_nonce,
                wrapped,
                data_nonce,
                ciphertext,
            )
        )

    def open(self, item_id: str, envelope: bytes) -> bytes:
        """Decrypt an envelope sealed for `item_id`; EscrowIntegrityError if it does not verify."""
        key_id, wrap_nonce, wrapped, data_nonce, ciphertext = _split(envelope)
        aead = self._aead.get(key_id)
        if aead is None:
            raise EscrowIntegrityError("envelope names a key that is not in the key ring")
        try:
            dek = aead.decrypt(
                wrap_nonce, wrapped, _KEK_AAD + key_id.encode("ascii") + b"\x00" + item_id.encode()
            )
            return AESGCM(dek).decrypt(data_nonce, ciphertext, _DEK_AAD + item_id.encode())
        except InvalidTag:
            raise EscrowIntegrityError("envelope failed authentication") from None

    def rewrap(self, item_id: str, envelope: bytes) -> bytes:
        """The same payload with its data key re-wrapped under the active key (rotation)."""
        return self.seal(item_id, self.open(item_id, envelope))

    @staticmethod
    def key_id_of(envelope: bytes) -> str:
        """The id of the key that wrapped an envelope's data key."""
        return _split(envelope)[0]


def _split(envelope: bytes) -> tuple[str, bytes, bytes, bytes, bytes]:
    """version | key id length | key id | wrap nonce | wrapped key+tag | data nonce | data+tag."""
    if len(envelope) < 2 or envelope[0] != ENVELOPE_VERSION:
        raise EscrowIntegrityError("unsupported escrow envelope")
    kid_end = 2 + envelope[1]
    wrapped_end = kid_end + NONCE_BYTES + KEY_BYTES + _TAG_BYTES
    data_start = wrapped_end + NONCE_BYTES
    if envelope[1] == 0 or len(envelope) < data_start + _TAG_BYTES:
        raise EscrowIntegrityError("truncated escrow envelope")
    try:
        key_id = envelope[2:kid_end].decode("ascii")
    except UnicodeDecodeError:
        raise EscrowIntegrityError("malformed escrow envelope") from None
    return (
        key_id,
        envelope[kid_end : kid_end + NONCE_BYTES],
        envelope[kid_end + NONCE_BYTES : wrapped_end],
        envelope[wrapped_end:data_start],
        envelope[data_start:],
    )


# --------------------------------------------------------------------------- items


@dataclass(frozen=True, slots=True)
class EscrowItem:
    """What to escrow for one EOB.

    The last four digits of `member_id` and `date_of_birth` are sealed with the HTML (they
    are the identity check; the rest of the id is not kept);
    `member_ref` is the opaque pseudonym (see `observe.audit.member_ref`) kept in clear
    for the audit trail. A member without a date of birth on file cannot use the portal.
    """

    event_id: str
    member_ref: str
    member_id: str
    date_of_birth: dt.date
    html: str
    expires_at: dt.datetime
    language: str = "en"


class PickupFailure(enum.StrEnum):
    """Why a pickup was refused."""

    UNKNOWN = "unknown"
    EXPIRED = "expired"
    LOCKED = "locked"
    ALREADY_USED = "already_used"
    WRONG_ANSWER = "wrong_answer"


@dataclass(frozen=True, slots=True)
class PickupOpened:
    """The identity check passed: the EOB, shown once."""

    item_id: str
    event_id: str
    member_ref: str
    html: str


@dataclass(frozen=True, slots=True)
class PickupRefused:
    """The pickup was refused; ids are None when the link matched no item."""

    reason: PickupFailure
    item_id: str | None = None
    event_id: str | None = None
    member_ref: str | None = None
    failed_attempts: int = 0
    # this very attempt locked the item (so the caller records the lock once)
    just_locked: bool = False


PickupResult = PickupOpened | PickupRefused
# An access record's outcome of a pickup that opened; the others are PickupFailure values.
PICKED_UP = "picked_up"
# What an access record keeps of a User-Agent: enough to tell a browser from a script.
USER_AGENT_CHARS = 128


@dataclass(frozen=True, slots=True)
class PickupClient:
    """Who made a pickup attempt, as the portal saw them: the client's address (through
    its trusted proxies) and the start of its User-Agent, printable ASCII only."""

    address: str
    user_agent: str

    @classmethod
    def of(cls, address: str | None, user_agent: str | None) -> PickupClient:
        """A client from what the request says, made fit to store: an IP address (or
        "unknown") and at most USER_AGENT_CHARS printable characters."""
        try:
            shown = str(ipaddress.ip_address(address or ""))
        except ValueError:
            shown = "unknown"
        agent = "".join(
            ch if " " <= ch <= "~" else "?" for ch in (user_agent or "")[:USER_AGENT_CHARS]
        )
        return cls(shown, agent)


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One pickup attempt in the portal's access records (`portal_access`): when, what
    came of it (PICKED_UP or a PickupFailure), for which item (None: the link matched
    none) and who made it. Never the token or an answer."""

    at: dt.datetime
    outcome: str
    item_id: str | None
    event_id: str | None
    client: PickupClient


def access_outcome(result: PickupResult) -> str:
    """What an attempt's access record says came of it."""
    return PICKED_UP if isinstance(result, PickupOpened) else str(result.reason)


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """What a link points at, without opening it: `failure` is None while it can be picked up."""

    failure: PickupFailure | None
    item_id: str | None = None
    event_id: str | None = None
    member_ref: str | None = None
    language: str = "en"


@dataclass(frozen=True, slots=True)
class PurgedItem:
    """An item removed (at expiry, or revoked by a later one), and the state it was in."""

    item_id: str
    event_id: str
    member_ref: str
    final_state: str  # "picked_up" | "locked" | "unopened"

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> PurgedItem:
        """From a DELETE ... RETURNING item_id, event_id, member_ref, locked, picked_up_at."""
        return cls(str(row[0]), str(row[1]), str(row[2]), _final_state(row[3], row[4]))

    def audit_record(self, actor: str, at: dt.datetime, reason: str) -> AuditRecord:
        """Its `portal_expired_purged` record: `reason` is the state it ended in, or why it
        went before its time."""
        return AuditRecord(
            self.event_id,
            AuditAction.PORTAL_EXPIRED_PURGED,
            actor,
            at,
            member_ref=self.member_ref,
            protection=PORTAL_PROTECTION,
            reason=reason,
            item_id=self.item_id,
        )


@dataclass(frozen=True, slots=True)
class Escrowed:
    """An item just stored, and the earlier items of its event it revoked."""

    item_id: str
    token: str
    revoked: tuple[PurgedItem, ...] = ()


@dataclass(frozen=True, slots=True)
class ItemRow:
    """One `portal_items` row as the decisions see it (the envelope is still sealed)."""

    item_id: str
    event_id: str
    member_ref: str
    language: str
    envelope: bytes | None
    expires_at: float
    failed_attempts: int
    locked: bool
    picked_up_at: float | None


@dataclass(frozen=True, slots=True)
class RowChange:
    """What an attempt changes in its row; a pickup also drops the envelope."""

    failed_attempts: int
    locked: bool
    picked_up_at: float | None


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a pickup token is stored."""
    # "replace": a mangled path must hash (to nothing stored), not raise.
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


# A member id with fewer digits than this gets no portal notice (NO_PORTAL_IDENTITY): the
# date of birth and one to three digits are too easy to guess within the lockout.
PORTAL_ID_DIGITS = 4
# An item sealed before the check took digits opens on the digits among its id's last four
# characters only if there are at least this many.
LEGACY_MIN_DIGITS = 2


def last4_digits(member_id: str) -> str:
    """The last four digits of a member id, other characters skipped ("XYZ123456789-01":
    "8901"); every digit of an id with fewer than four, and "" for an id without any."""
    return "".join(ch for ch in member_id if ch in string.digits)[-4:]


def normalise_last4(value: str) -> str:
    """A member's answer as compared: without the spaces around it."""
    return value.strip()


def identity_matches(payload: Mapping[str, Any], dob: dt.date, last4: str) -> bool:
    """Whether the answers match a sealed payload's date of birth and member-id digits.

    Both are compared together, in constant time: the reply never tells which was wrong.
    An id without a digit never matches (the date of birth alone is not enough).
    """
    answer = normalise_last4(last4)
    if "last4_digits" in payload:
        digits = str(payload["last4_digits"])
    else:
        # Sealed before the check took digits: the id's last four characters ("9-01"),
        # whose digits ("901") must end the member's answer ("8901"). Such items expire
        # within [portal] item_days of the upgrade.
        digits = last4_digits(str(payload["last4"]))
        if len(digits) < LEGACY_MIN_DIGITS:
            # "5-AB" would leave "the answer ends in 5": too easy to guess. Not opened.
            return False
        answer = answer[-len(digits) :]
    expected = f"{payload['dob']}|{digits}".encode()
    given = f"{dob.isoformat()}|{answer}".encode()
    return hmac.compare_digest(expected, given) and bool(digits)


def link_failure(row: ItemRow | None, now: float) -> PickupFailure | None:
    """Why a link cannot be picked up at `now`, or None if it can."""
    if row is None:
        return PickupFailure.UNKNOWN
    if row.picked_up_at is not None or row.envelope is None:
        return PickupFailure.ALREADY_USED
    if row.locked:
        return PickupFailure.LOCKED
    if now >= row.expires_at:
        return PickupFailure.EXPIRED
    return None


def attempt_pickup(
    keys: KeyRing,
    row: ItemRow | None,
    dob: dt.date,
    last4: str,
    now: float,
    lockout_after: int,
) -> tuple[PickupResult, RowChange | None]:
    """Decide one pickup attempt: the result, and the change to write to its row."""
    failure = link_failure(row, now)
    if failure is not None or row is None or row.envelope is None:
        return _refused(failure or PickupFailure.UNKNOWN, row), None
    payload = orjson.loads(keys.open(row.item_id, row.envelope))
    if identity_matches(payload, dob, last4):
        opened = PickupOpened(row.item_id, row.event_id, row.member_ref, str(payload["html"]))
        return opened, RowChange(row.failed_attempts, row.locked, now)
    attempts = row.failed_attempts + 1
    locked = attempts >= lockout_after
    refused = PickupRefused(
        PickupFailure.WRONG_ANSWER,
        row.item_id,
        row.event_id,
        row.member_ref,
        failed_attempts=attempts,
        just_locked=locked,
    )
    return refused, RowChange(attempts, locked, None)


def _refused(reason: PickupFailure, row: ItemRow | None) -> PickupRefused:
    if row is None:
        return PickupRefused(reason)
    return PickupRefused(
        reason, row.item_id, row.event_id, row.member_ref, failed_attempts=row.failed_attempts
    )


# One attempt decided against its row, inside the store's row-locking transaction.
_Decide = Callable[[ItemRow | None], tuple[PickupResult, RowChange | None]]
# The attempt's access record, made from its result in the same transaction.
_Record = Callable[[PickupResult], AccessRecord]


def _epoch(when: dt.datetime) -> float:
    if when.tzinfo is None:
        raise EscrowError("escrow times must be timezone-aware")
    return when.timestamp()


def _final_state(locked: Any, picked_up_at: Any) -> str:
    if picked_up_at is not None:
        return "picked_up"
    return "locked" if locked else "unopened"


# --------------------------------------------------------------------------- stores

_COLUMNS = (
    "item_id, event_id, member_ref, language, envelope, expires_at,"
    " failed_attempts, locked, picked_up_at"
)


def _row(values: Sequence[Any] | None) -> ItemRow | None:
    if values is None:
        return None
    return ItemRow(
        str(values[0]),
        str(values[1]),
        str(values[2]),
        str(values[3]),
        None if values[4] is None else bytes(values[4]),
        float(values[5]),
        int(values[6]),
        bool(values[7]),
        None if values[8] is None else float(values[8]),
    )


class EscrowStore(abc.ABC):
    """Sealed EOBs awaiting pickup; SQLite and PostgreSQL behave the same."""

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    @property
    def keys(self) -> KeyRing:
        """The key ring items are sealed with and opened by."""
        return self._keys

    async def put(self, item: EscrowItem, *, now: dt.datetime | None = None) -> str:
        """Seal and store an item; returns the pickup token (it exists only in the link).

        The event's earlier items not picked up are revoked in the same transaction (see
        `Escrowed.revoked`).
        """
        return (await self._put(item, now or dt.datetime.now(dt.UTC))).token

    async def _put(self, item: EscrowItem, now: dt.datetime) -> Escrowed:
        created = _epoch(now)
        token = secrets.token_urlsafe(32)
        item_id = secrets.token_hex(16)
        payload = orjson.dumps(
            {
                "html": item.html,
                "dob": item.date_of_birth.isoformat(),
                "last4_digits": last4_digits(item.member_id),
            }
        )
        revoked = await self._insert_revoking(
            (
                item_id,
                hash_token(token),
                item.event_id,
                item.member_ref,
                item.language,
                self._keys.seal(item_id, payload),
                created,
                _epoch(item.expires_at),
            ),
            (item.event_id, item_id),
        )
        return Escrowed(
            item_id,
            token,
            tuple(map(PurgedItem.from_row, revoked)),
        )

    async def status(self, token: str, now: dt.datetime) -> LinkStatus:
        """What the link points at, without opening it or counting an attempt."""
        row = await self._fetch(hash_token(token))
        failure = link_failure(row, _epoch(now))
        if row is None:
            return LinkStatus(failure)
        return LinkStatus(failure, row.item_id, row.event_id, row.member_ref, row.language)

    async def verify_and_open(
        self,
        token: str,
        dob: dt.date,
        last4: str,
        now: dt.datetime,
        *,
        lockout_after: int = DEFAULT_LOCKOUT_AFTER,
        client: PickupClient | None = None,
    ) -> PickupResult:
        """Check the answers: the EOB once (then the link is spent), or why not.

        A wrong answer is counted; the `lockout_after`-th locks the item for good. With
        `client`, the attempt's access record is written in the same transaction: no
        pickup without it.
        """
        at = _epoch(now)
        return await self._in_row_transaction(
            hash_token(token),
            lambda row: attempt_pickup(self._keys, row, dob, last4, at, lockout_after),
            None if client is None else _recorder(now, client),
        )

    async def record_access(self, record: AccessRecord) -> None:
        """Write an access record of an attempt decided without `verify_and_open` (a link
        already used, expired, locked or unknown)."""
        await self._insert_access(_access_args(record))

    async def access_records(self, *, event_id: str | None = None) -> list[AccessRecord]:
        """The access records kept (of one event's item), oldest first."""
        return [_access_record(values) for values in await self._select_access(event_id)]

    async def purge_access(self, before: dt.datetime) -> int:
        """Delete the access records of attempts made before `before`; returns how many."""
        return await self._delete_access(_epoch(before))

    async def purge_expired(self, now: dt.datetime) -> int:
        """Delete every item whose time is up; returns how many."""
        return len(await self.purge_expired_items(now))

    async def purge_expired_items(self, now: dt.datetime) -> list[PurgedItem]:
        """Delete every item whose time is up; returns what was deleted, for the audit."""
        return list(map(PurgedItem.from_row, await self._delete_expired(_epoch(now))))

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the store cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abc.abstractmethod
    async def _insert_revoking(
        self, values: tuple[Any, ...], revoke: tuple[str, str]
    ) -> list[Sequence[Any]]:
        """Insert an item and, in the same transaction, delete its event's other items
        not picked up (`revoke`: the event id, the new item's id); the deleted rows."""

    @abc.abstractmethod
    async def _fetch(self, token_sha256: str) -> ItemRow | None: ...

    @abc.abstractmethod
    async def _in_row_transaction(
        self, token_sha256: str, decide: _Decide, record: _Record | None
    ) -> PickupResult: ...

    @abc.abstractmethod
    async def _insert_access(self, values: tuple[Any, ...]) -> None: ...

    @abc.abstractmethod
    async def _select_access(self, event_id: str | None) -> list[Sequence[Any]]: ...

    @abc.abstractmethod
    async def _delete_access(self, before: float) -> int: ...

    @abc.abstractmethod
    async def _delete_expired(self, now: float) -> list[Sequence[Any]]: ...

    @abc.abstractmethod
    async def _discard(self, item_id: str) -> None: ...


_INSERT = (
    "INSERT INTO portal_items (item_id, token_sha256, event_id, member_ref, language,"
    " envelope, created_at, expires_at) VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0}, {0})"
)
_SELECT = f"SELECT {_COLUMNS} FROM portal_items WHERE token_sha256 = {{0}}"  # noqa: S608
_UPDATE = (
    "UPDATE portal_items SET failed_attempts = {0}, locked = {0}, picked_up_at = {0},"
    " envelope = CASE WHEN {0} THEN NULL ELSE envelope END WHERE item_id = {0}"
)
_DISCARD = "DELETE FROM portal_items WHERE item_id = {0}"
# An event escrowed again (a retry, a release to a verified address) revokes its earlier
# links: their notices may have been accepted, even at an address that later bounced, and
# one EOB must have one live link. A picked-up item has nothing left to revoke.
_REVOKE = (
    "DELETE FROM portal_items WHERE event_id = {0} AND item_id <> {0} AND picked_up_at IS NULL"
    " RETURNING item_id, event_id, member_ref, locked, picked_up_at"
)
_DELETE = (
    "DELETE FROM portal_items WHERE expires_at <= {0}"
    " RETURNING item_id, event_id, member_ref, locked, picked_up_at"
)


def _table(blob: str) -> str:
    return (
        "CREATE TABLE IF NOT EXISTS portal_items ("
        " item_id TEXT PRIMARY KEY,"
        " token_sha256 TEXT NOT NULL UNIQUE,"
        " event_id TEXT NOT NULL,"
        " member_ref TEXT NOT NULL,"
        " language TEXT NOT NULL,"
        f" envelope {blob},"
        " created_at DOUBLE PRECISION NOT NULL,"
        " expires_at DOUBLE PRECISION NOT NULL,"
        " failed_attempts INTEGER NOT NULL DEFAULT 0,"
        " locked INTEGER NOT NULL DEFAULT 0,"
        " picked_up_at DOUBLE PRECISION)"
    )


_INDEX = "CREATE INDEX IF NOT EXISTS portal_items_expires_at ON portal_items (expires_at)"
# _REVOKE runs with every item escrowed: without this, each would read the whole table.
_EVENT_INDEX = "CREATE INDEX IF NOT EXISTS portal_items_event_id ON portal_items (event_id)"
# The portal's access records: one row per pickup attempt, with the client's address and
# User-Agent, kept [portal] access_days (apart from the items, which go at expiry).
_ACCESS_TABLE = (
    "CREATE TABLE IF NOT EXISTS portal_access ("
    " at DOUBLE PRECISION NOT NULL,"
    " outcome TEXT NOT NULL,"
    " item_id TEXT,"
    " event_id TEXT,"
    " client TEXT NOT NULL,"
    " user_agent TEXT NOT NULL)"
)
_ACCESS_INDEXES = (
    "CREATE INDEX IF NOT EXISTS portal_access_at ON portal_access (at)",
    "CREATE INDEX IF NOT EXISTS portal_access_event_id ON portal_access (event_id)",
)
_SCHEMA = (_INDEX, _EVENT_INDEX, _ACCESS_TABLE, *_ACCESS_INDEXES)
_INSERT_ACCESS = (
    "INSERT INTO portal_access (at, outcome, item_id, event_id, client, user_agent)"
    " VALUES ({0}, {0}, {0}, {0}, {0}, {0})"
)
_SELECT_ACCESS = "SELECT at, outcome, item_id, event_id, client, user_agent FROM portal_access"
_DELETE_ACCESS = "DELETE FROM portal_access WHERE at < {0}"


def _recorder(now: dt.datetime, client: PickupClient) -> _Record:
    def record(result: PickupResult) -> AccessRecord:
        return AccessRecord(now, access_outcome(result), result.item_id, result.event_id, client)

    return record


def _access_args(record: AccessRecord) -> tuple[Any, ...]:
    return (
        _epoch(record.at),
        record.outcome,
        record.item_id,
        record.event_id,
        record.client.address,
        record.client.user_agent,
    )


def _access_record(values: Sequence[Any]) -> AccessRecord:
    return AccessRecord(
        dt.datetime.fromtimestamp(float(values[0]), dt.UTC),
        str(values[1]),
        None if values[2] is None else str(values[2]),
        None if values[3] is None else str(values[3]),
        PickupClient(str(values[4]), str(values[5])),
    )


def _select_access(placeholder: str, event_id: str | None) -> tuple[str, tuple[Any, ...]]:
    if event_id is None:
        return _SELECT_ACCESS + " ORDER BY at", ()
    return _SELECT_ACCESS + f" WHERE event_id = {placeholder} ORDER BY at", (event_id,)


_SCHEMA_LOCK = 0x0E0B_E5C0


def _update_args(change: RowChange, item_id: str) -> tuple[Any, ...]:
    picked = change.picked_up_at is not None
    return (change.failed_attempts, int(change.locked), change.picked_up_at, picked, item_id)


class SqliteEscrow(EscrowStore):
    """The escrow in a SQLite file (WAL), for the processes of one machine.

    As in the ledger, statements are single-row and take microseconds, so they run on the
    event loop's thread; decryption of one item is in the same range.
    """

    def __init__(self, path: Path, keys: KeyRing) -> None:
        super().__init__(keys)
        self._db = open_sqlite(path, [_table("BLOB"), *_SCHEMA])
        # Deleted rows are overwritten, not left readable in free pages.
        self._db.execute("PRAGMA secure_delete=ON")

    async def _insert_revoking(
        self, values: tuple[Any, ...], revoke: tuple[str, str]
    ) -> list[Sequence[Any]]:
        db = self._db

        def work() -> list[Sequence[Any]]:
            db.execute(_INSERT.format("?"), values)
            return list(db.execute(_REVOKE.format("?"), revoke).fetchall())

        return await write_transaction(db, work)

    async def _fetch(self, token_sha256: str) -> ItemRow | None:
        return _row(self._db.execute(_SELECT.format("?"), (token_sha256,)).fetchone())

    async def _in_row_transaction(
        self, token_sha256: str, decide: _Decide, record: _Record | None
    ) -> PickupResult:
        db = self._db

        def work() -> PickupResult:
            row = _row(db.execute(_SELECT.format("?"), (token_sha256,)).fetchone())
            result, change = decide(row)
            if change is not None and row is not None:
                db.execute(_UPDATE.format("?"), _update_args(change, row.item_id))
            if record is not None:
                db.execute(_INSERT_ACCESS.format("?"), _access_args(record(result)))
            return result

        return await write_transaction(db, work)

    async def _insert_access(self, values: tuple[Any, ...]) -> None:
        await write_transaction(
            self._db, lambda: self._db.execute(_INSERT_ACCESS.format("?"), values)
        )

    async def _select_access(self, event_id: str | None) -> list[Sequence[Any]]:
        statement, args = _select_access("?", event_id)
        return list(self._db.execute(statement, args).fetchall())

    async def _delete_access(self, before: float) -> int:
        return await write_transaction(
            self._db, lambda: self._db.execute(_DELETE_ACCESS.format("?"), (before,)).rowcount
        )

    async def _delete_expired(self, now: float) -> list[Sequence[Any]]:
        return await write_transaction(
            self._db, lambda: list(self._db.execute(_DELETE.format("?"), (now,)).fetchall())
        )

    async def _discard(self, item_id: str) -> None:
        await write_transaction(
            self._db, lambda: self._db.execute(_DISCARD.format("?"), (item_id,))
        )

    async def ping(self) -> None:
        """Raise if the database cannot be read."""
        self._db.execute("SELECT 1").fetchone()

    async def close(self) -> None:
        """Close the database."""
        self._db.close()


class PostgresEscrow(EscrowStore):
    """The escrow in PostgreSQL, for portal and worker processes on several machines."""

    def __init__(self, conn: Any, keys: KeyRing) -> None:
        super().__init__(keys)
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str, keys: KeyRing) -> PostgresEscrow:
        """Connect and create the table if needed."""
        conn = await connect_postgres(dsn, "escrow", _SCHEMA_LOCK, (_table("BYTEA"), *_SCHEMA))
        return cls(conn, keys)

    async def _insert_revoking(
        self, values: tuple[Any, ...], revoke: tuple[str, str]
    ) -> list[Sequence[Any]]:
        async with self._lock, self._conn.transaction():
            await self._conn.execute(_INSERT.format("%s"), values)
            cur = await self._conn.execute(_REVOKE.format("%s"), revoke)
            return list(await cur.fetchall())

    async def _fetch(self, token_sha256: str) -> ItemRow | None:
        async with self._lock:
            cur = await self._conn.execute(_SELECT.format("%s"), (token_sha256,))
            return _row(await cur.fetchone())

    async def _in_row_transaction(
        self, token_sha256: str, decide: _Decide, record: _Record | None
    ) -> PickupResult:
        async with self._lock, self._conn.transaction():
            # FOR UPDATE: two simultaneous correct answers must not both open the item.
            cur = await self._conn.execute(_SELECT.format("%s") + " FOR UPDATE", (token_sha256,))
            row = _row(await cur.fetchone())
            result, change = decide(row)
            if change is not None and row is not None:
                await self._conn.execute(_UPDATE.format("%s"), _update_args(change, row.item_id))
            if record is not None:
                await self._conn.execute(_INSERT_ACCESS.format("%s"), _access_args(record(result)))
        return result

    async def _insert_access(self, values: tuple[Any, ...]) -> None:
        async with self._lock:
            await self._conn.execute(_INSERT_ACCESS.format("%s"), values)

    async def _select_access(self, event_id: str | None) -> list[Sequence[Any]]:
        statement, args = _select_access("%s", event_id)
        async with self._lock:
            cur = await self._conn.execute(statement, args)
            return list(await cur.fetchall())

    async def _delete_access(self, before: float) -> int:
        async with self._lock:
            cur = await self._conn.execute(
                _DELETE_ACCESS.format("%s"), (before,), answer_within=PURGE_ANSWER_WAIT
            )
            return int(cur.rowcount)

    async def _delete_expired(self, now: float) -> list[Sequence[Any]]:
        async with self._lock:
            cur = await self._conn.execute(
                _DELETE.format("%s"), (now,), answer_within=PURGE_ANSWER_WAIT
            )
            return list(await cur.fetchall())

    async def _discard(self, item_id: str) -> None:
        async with self._lock:
            await self._conn.execute(_DISCARD.format("%s"), (item_id,))

    async def ping(self) -> None:
        """Raise if the server cannot be reached."""
        async with self._lock:
            await self._conn.execute("SELECT 1")

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def escrow_eob(
    store: EscrowStore,
    audit: AuditTrail,
    item: EscrowItem,
    *,
    actor: str,
    reason: str | None = None,
    now: dt.datetime | None = None,
) -> str:
    """Escrow an EOB and record `portal_escrowed` in the audit trail; returns the token.

    The event's earlier items not picked up are revoked (their links no longer open), each
    recorded as `portal_expired_purged` with the reason `superseded`.
    """
    when = now or dt.datetime.now(dt.UTC)
    try:
        escrowed = await store._put(item, when)
    except StoreNotAnswering:
        # Its COMMIT may have been kept: the event's earlier items revoked with no record
        # of it. The caller tries again (the new item is unreachable: its link is never sent).
        AUDIT_GAPS.inc()
        log.error(
            "portal escrow's outcome unknown: earlier items may be revoked unrecorded",
            extra={"event_id": item.event_id},
        )
        raise
    try:
        await audit.append(
            AuditRecord(
                item.event_id,
                AuditAction.PORTAL_ESCROWED,
                actor,
                when,
                member_ref=item.member_ref,
                protection=PORTAL_PROTECTION,
                reason=reason,
                item_id=escrowed.item_id,
            )
        )
    except BaseException:
        # No item without its record: the caller tries again, and each try would leave
        # an item nobody can reach (its link was never sent) until it expired.
        with contextlib.suppress(Exception):
            await store._discard(escrowed.item_id)
        _revocations_unrecorded(escrowed.revoked)
        raise
    for revoked in escrowed.revoked:
        try:
            await audit.append(revoked.audit_record(actor, when, SUPERSEDED))
        except Exception:
            # The revocation stands (the item is gone) and the new item is recorded; a
            # gap in the trail must not fail a notice that is ready to go.
            _revocations_unrecorded((revoked,))
    return escrowed.token


def _revocations_unrecorded(revoked: Sequence[PurgedItem]) -> None:
    """Log and count revoked items the audit trail has no record of, for ops to add."""
    for item in revoked:
        AUDIT_GAPS.inc()
        # Ids only: the item and event ids are opaque, and a driver's message could quote
        # a value, so the exception is not logged.
        log.error(
            "portal revocation not recorded in the audit trail",
            extra={"event_id": item.event_id, "item_id": item.item_id, "reason": SUPERSEDED},
        )


async def open_escrow(url: str, keys: KeyRing) -> EscrowStore:
    """Open the escrow named by a URL (`eobblast.state.sqlite.open_store`)."""

    return await open_store(
        url,
        "escrow",
        lambda path: SqliteEscrow(path, keys),
        lambda dsn: PostgresEscrow.connect(dsn, keys),
    )
