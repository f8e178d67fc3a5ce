"""The protection stage's services: policy, TLS knowledge, escrow and audit, opened from config."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import logging
import secrets
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from eobblast._files import file_lock, write_whole
from eobblast.config import Config
from eobblast.errors import ConfigError
from eobblast.observe.audit import (
    AuditAction,
    AuditRecord,
    AuditTrail,
    member_ref,
    open_audit,
    recipient_ref,
)
from eobblast.protect.escrow import EscrowStore, KeyRing, open_escrow
from eobblast.protect.policy import OrgPolicy, TlsCache
from eobblast.state.fingerprints import (
    Change,
    Recorded,
    change_fingerprints,
    fingerprint,
    recorded_fingerprints,
)

log = logging.getLogger("eobblast.secrets")


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    # Worker processes start together and would each create "the" secret or key ring,
    # or read one another's half-written file: the first creates it, the rest read it.
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with file_lock(directory / ".eobblast.lock"):
        yield


def load_or_create_secret(path: Path, *, create: bool = True, what: str = "secret") -> bytes:
    """A 32-byte secret kept in a file (base64), created on first use with mode 0600
    (unless not `create`: then `load_secret(path, what=what)`)."""
    if not create:
        return load_secret(path, what=what)
    with _exclusive(path.parent):
        return _load_or_create_secret(path)


# What a command that only reads the service's secrets says when one is missing.
CREATE_SECRETS_HINT = (
    "create the secrets once with `eobblast keys secrets --config FILE` (or start the "
    "workers first), or copy them from the host that has them"
)


def load_secret(path: Path, *, what: str | None = None) -> bytes:
    """A 32-byte secret a file already holds (base64); a missing file is a ConfigError:
    a key that opens what was made with it cannot be created afresh. `what` names the
    secret in that error, with the way to create it."""
    if not path.exists():
        if what is None:
            raise ConfigError(f"{path} does not exist")
        raise ConfigError(f"the {what} {path} does not exist: {CREATE_SECRETS_HINT}")
    return _load_or_create_secret(path)


def _load_or_create_secret(path: Path) -> bytes:
    if path.exists():
        try:
            return base64.b64decode(path.read_text("ascii").strip(), validate=True)
        except (ValueError, OSError):
            raise ConfigError(f"{path} does not hold a base64 secret") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(32)
    # Never readable by others, not even between writing and a chmod.
    write_whole(path, base64.b64encode(secret) + b"\n", mode=0o600)
    return secret


def load_or_create_keyring(
    directory: Path, *, not_keys: Collection[Path] = (), create: bool = True
) -> KeyRing:
    """The escrow key ring in `directory`, with a first key generated if there is none
    (unless not `create`: then a ConfigError); `not_keys` are other secrets kept there
    (see `KeyRing.from_directory`)."""
    if not create:
        if not (directory / "active").exists():
            raise ConfigError(
                f"the escrow key directory {directory} holds no key ring: {CREATE_SECRETS_HINT}"
            )
        return KeyRing.from_directory(directory, not_keys=not_keys)
    with _exclusive(directory):
        if (directory / "active").exists():
            return KeyRing.from_directory(directory, not_keys=not_keys)
        return KeyRing.generate(directory, not_keys=not_keys)


@dataclass(frozen=True, slots=True)
class SharedSecret:
    """A secret kept in a file (or a key ring in a directory) that every host of a
    deployment must hold the same, and the store that records its fingerprints.

    Its keys are recorded as "`what` `key id`" ("VERP key 1", "escrow key k2026...") or,
    without an id, as `what` ("member-reference key").
    """

    what: str
    argument: str  # its name for `eobblast keys record`: "verp", "escrow", "member-reference"
    key_id: str | None  # None: a key ring, whose ids come with its keys
    setting: str  # where its file is set, as errors name it: "[bounces] verp_key_file"
    check: str  # its name in `eobblast check`: "bounces verp_key_file"
    path: Path
    store: str  # the URL setting of the store that records it
    url: str
    lost: str  # what goes wrong when hosts hold different keys
    made: bool = True  # a missing file is made at the first start (not a rotated-out key)
    not_keys: tuple[Path, ...] = ()  # other secrets kept in a key ring's directory

    def exists(self) -> bool:
        """Whether this host holds it (a key ring: its `active` file)."""
        return (self.path / "active" if self.key_id is None else self.path).exists()

    def recorded_as(self, key_id: str) -> str:
        """The name a store records a key's fingerprint under."""
        return f"{self.what} {key_id}".rstrip()

    def records(self, name: str) -> bool:
        """Whether a store records a key of this kind under `name` (for a VERP key: of any
        VERP key id)."""
        return name == self.what or name.startswith(f"{self.what} ")

    @property
    def single_id(self) -> str:
        """The key id of a secret of one key."""
        assert self.key_id is not None, "a key ring's ids come with its keys"
        return self.key_id

    def load(self, *, create: bool) -> KeyRing | bytes:
        """This host's key ring or key; a missing one is made if `create` (never a previous
        key: its callers said `missing_previous` before), else a ConfigError."""
        if self.key_id is None:
            return load_or_create_keyring(self.path, not_keys=self.not_keys, create=create)
        return load_or_create_secret(self.path, create=create and self.made, what=self.what)

    def fingerprints(self, held: KeyRing | bytes) -> dict[str, str]:
        """Key id -> fingerprint of what `load` returned."""
        if isinstance(held, KeyRing):
            return held.fingerprints(self.recorded_as)
        return {self.single_id: fingerprint(self.recorded_as(self.single_id), held)}

    def missing_previous(self) -> str:
        """Why a previous key that is not there stops a start."""
        return (
            f"{self.setting} {self.path} does not exist: a previous key is never made (a new"
            f" one would open nothing signed before); copy it from the host whose keys the"
            f" {self.store} store records, or take it out of {self.setting}"
        )


def portal_secrets(config: Config) -> tuple[SharedSecret, SharedSecret]:
    """The escrow key ring (recorded by the escrow) and the member-reference key (by the
    audit trail, whose references it makes)."""
    portal = config.portal
    return (
        SharedSecret(
            "escrow key",
            "escrow",
            None,
            "[portal] key_dir",
            "portal key_dir",
            portal.key_dir,
            "portal.escrow_url",
            portal.escrow_url,
            "a portal link from one host would not open with another host's key ring",
            not_keys=(portal.audit_key_file,),
        ),
        SharedSecret(
            "member-reference key",
            "member-reference",
            "",
            "[portal] audit_key_file",
            "portal audit_key_file",
            portal.audit_key_file,
            "portal.audit_url",
            portal.audit_url,
            "the audit trail would name one member by different references",
        ),
    )


def verp_secrets(config: Config) -> list[SharedSecret]:
    """The VERP key, which signs, then the previous ones (`verp_previous_keys`, which are
    not made); the bounce store records them."""
    bounces = config.bounces
    keys = [(bounces.verp_key_id, "verp_key_file", bounces.verp_key_file, "")]
    keys += [
        (key_id, "verp_previous_keys", path, f" {key_id}")
        for key_id, path in bounces.previous_verp_keys()
    ]
    return [
        SharedSecret(
            "VERP key",
            "verp",
            str(key_id),
            f"[bounces] {name}",
            f"bounces {name}{suffix}",
            path,
            "bounces.store_url",
            bounces.store_url,
            "bounces of mail one host signed would match no notice on another, and hard"
            " bounces would never be suppressed",
            made=not suffix,
        )
        for key_id, name, path, suffix in keys
    ]


def shared_secrets(config: Config) -> list[SharedSecret]:
    """Every secret `config` names that the hosts of a deployment must share."""
    verp = verp_secrets(config) if config.bounces.enabled else []
    return [*portal_secrets(config), *verp]


def secret_trouble(
    secret: SharedSecret, ours: Mapping[str, str] | None, recorded: Mapping[str, str]
) -> str | None:
    """Why this host must not use `secret` with a store that records `recorded` (name ->
    fingerprint), or None if it may. `ours`: its keys' fingerprints by key id; None when
    its file is missing and a new key would be made.

    Refused: a key that differs from the one recorded under its id; a missing file the
    store records a key for (a new one would differ); a key ring that holds none of the
    keys recorded (made on this host, not copied). A key ring with a key the store does
    not know yet is a rotation; one that lacks some recorded keys may have retired them.
    """
    if secret.key_id is None:
        theirs = {n: f for n, f in recorded.items() if secret.records(n)}
    else:
        name = secret.recorded_as(secret.key_id)
        theirs = {name: recorded[name]} if name in recorded else {}
    if not theirs:
        return None
    files = "the key ring's files" if secret.key_id is None else "the key file"
    # The host whose keys the store records: the first to start (after an upgrade, the
    # first to start with this release), or the last an operator recorded.
    copy = (
        f"copy {files} from the host whose keys the {secret.store} store records to"
        f" {secret.path} (every host needs the same), then start again"
    )
    if ours is None:
        return (
            f"{secret.setting} {secret.path} does not exist, but the {secret.store} store"
            f" records another host's {secret.what}: one made here would differ"
            f" ({secret.lost}); {copy}"
        )
    keep = (
        f"; or, if this host's are the ones to keep (after a rotation), record them:"
        f" `eobblast keys record --config FILE {secret.argument} --yes`"
    )
    mine = {secret.recorded_as(key_id): value for key_id, value in ours.items()}
    differing = sorted(name for name, value in mine.items() if theirs.get(name, value) != value)
    if differing:
        return (
            f"{', '.join(differing)} in {secret.setting} {secret.path} is not the key the"
            f" {secret.store} store records ({secret.lost}); {copy}{keep}"
        )
    if not mine.keys() & theirs.keys():
        # Recording this ring forgets the keys the other hosts hold: said so, as this is
        # also what a host that made its own ring would be told.
        return (
            f"{secret.setting} {secret.path} holds none of the keys the {secret.store} store"
            f" records ({', '.join(sorted(theirs))}): it was made or rotated on this host"
            f" alone ({secret.lost}); {copy}; or, only if this ring is to replace the one"
            f" every host holds (its old keys retired on purpose; what was sealed with"
            f" them alone can then not be opened), record it:"
            f" `eobblast keys record --config FILE {secret.argument} --yes`"
        )
    return None


def missed_rotations(
    used: Sequence[tuple[SharedSecret, Mapping[str, str]]], recorded: Mapping[str, Recorded]
) -> list[str]:
    """The keys a store records (by name) that are newer than every key of the same secret
    this host holds: a rotation made on another host and not copied here yet. `used`:
    each secret with its keys' fingerprints by key id."""
    held: dict[str, tuple[SharedSecret, set[str]]] = {}
    for secret, ours in used:
        held.setdefault(secret.what, (secret, set()))[1].update(map(secret.recorded_as, ours))
    missed: list[str] = []
    for secret, names in held.values():
        theirs = {name: row.at for name, row in recorded.items() if secret.records(name)}
        if not names <= theirs.keys():
            continue  # a key of this host's is recorded now: the newest there is
        newest = max(theirs[name] for name in names)
        missed += sorted(name for name, at in theirs.items() if at > newest)
    return missed


def _refuse(
    secret: SharedSecret, ours: Mapping[str, str] | None, recorded: Mapping[str, str]
) -> None:
    trouble = secret_trouble(secret, ours, recorded)
    if trouble is not None:
        raise ConfigError(trouble)


async def refuse_new_keys(wanted: Iterable[SharedSecret]) -> None:
    """Before missing secrets are made: a ConfigError if a store records a key for one
    already (another host's, which a new key would not be)."""
    for secret in wanted:
        if not secret.exists():
            _refuse(secret, None, await recorded_fingerprints(secret.url, secret.store))


@dataclass(frozen=True, slots=True)
class HeldSecrets:
    """This host's keys of the shared secrets, as `hold_secrets` loaded them."""

    held: Mapping[SharedSecret, KeyRing | bytes]

    def ring(self, secret: SharedSecret) -> KeyRing:
        """A key ring's keys."""
        ring = self.held[secret]
        assert isinstance(ring, KeyRing), f"{secret.what} is no key ring"
        return ring

    def key(self, secret: SharedSecret) -> bytes:
        """A secret's one key."""
        key = self.held[secret]
        assert isinstance(key, bytes), f"{secret.what} is a key ring"
        return key


async def hold_secrets(wanted: Sequence[SharedSecret], *, create: bool) -> HeldSecrets:
    """This host's keys of `wanted`, agreed with the stores that record them.

    What every start does: if `create`, missing secrets are made (never a previous key),
    unless a store records a key for one (another host's: a ConfigError before anything
    is made); without `create`, a missing one is a ConfigError. Then the stores record
    the keys they do not know yet, or refuse them (`agree_secrets`).
    """
    for secret in wanted:
        if not secret.made and not secret.exists():
            raise ConfigError(secret.missing_previous())
    if create:
        await refuse_new_keys(secret for secret in wanted if secret.made)
    held = {secret: secret.load(create=create) for secret in wanted}
    await agree_secrets([(secret, secret.fingerprints(held[secret])) for secret in wanted])
    return HeldSecrets(held)


# Secrets with their keys' fingerprints by key id.
Used: TypeAlias = Sequence[tuple[SharedSecret, Mapping[str, str]]]


def _by_store(used: Used) -> dict[str, list[tuple[SharedSecret, Mapping[str, str]]]]:
    by_url: dict[str, list[tuple[SharedSecret, Mapping[str, str]]]] = {}
    for secret, ours in used:
        by_url.setdefault(secret.url, []).append((secret, ours))
    return by_url


def _names(used: Used) -> dict[str, str]:
    """Name -> fingerprint of the keys in `used`, as a store records them."""
    return {s.recorded_as(key_id): value for s, ours in used for key_id, value in ours.items()}


async def agree_secrets(used: Used) -> None:
    """Record in their stores the fingerprints (by key id) of the secrets this host uses,
    where none is recorded yet; a ConfigError, recording nothing, if a store records keys
    they disagree with (`secret_trouble`), or a key newer than those of its secret here
    (`missed_rotations`): a rotation not copied here, with which this host could not
    open what other hosts seal or sign now (raw events kept for resends would go to
    paper, bounces of their mail would match nothing)."""
    for group in _by_store(used).values():
        missed: list[str] = []
        store = group[0][0].store
        await change_fingerprints(group[0][0].url, store, functools.partial(_agree, group, missed))
        if missed:
            paths = sorted({str(secret.path) for secret, _ in group})
            raise ConfigError(
                f"the {store} store records {', '.join(missed)}, newer than this host's keys:"
                f" a rotation made on another host; copy the rotated files from the host"
                f" whose keys the store records to {', '.join(paths)}, then start again"
            )


def _agree(used: Used, missed: list[str], recorded: Mapping[str, Recorded]) -> Change:
    fingerprints = {name: row.fingerprint for name, row in recorded.items()}
    for secret, ours in used:
        _refuse(secret, ours, fingerprints)
    missed += missed_rotations(used, recorded)
    return Change({n: v for n, v in _names(used).items() if n not in recorded})


async def record_secrets(wanted: Sequence[SharedSecret], *, write: bool) -> list[str]:
    """Make the stores record this host's keys of `wanted` and no other key of theirs, so
    that hosts with these keys are accepted (after a rotation that reused a VERP key id,
    a new member-reference key, an escrow ring whose recorded keys were all retired).
    What changed, by name ("recorded VERP key 2", "replaced VERP key 1", "forgot escrow
    key k1"); if not `write`, what would change, and nothing does."""
    for secret in wanted:
        if not secret.exists():
            raise ConfigError(
                f"{secret.setting} {secret.path} does not exist: this host holds no"
                f" {secret.what} to record"
            )
    used = [(secret, secret.fingerprints(secret.load(create=False))) for secret in wanted]
    said: list[str] = []
    for group in _by_store(used).values():
        url, store = group[0][0].url, group[0][0].store
        if write:
            await change_fingerprints(url, store, functools.partial(_adopt, group, said))
        else:
            recorded = await recorded_fingerprints(url, store)
            _adopt(group, said, {n: Recorded(value, 0) for n, value in recorded.items()})
    return said


def _adopt(used: Used, said: list[str], recorded: Mapping[str, Recorded]) -> Change:
    ours = _names(used)
    forget = {n for n in recorded if n not in ours and any(s.records(n) for s, _ in used)}
    record = {
        n: value
        for n, value in ours.items()
        if n not in recorded or recorded[n].fingerprint != value
    }
    said += [f"forgot {n}" for n in sorted(forget)]
    said += [f"{'replaced' if n in recorded else 'recorded'} {n}" for n in sorted(record)]
    return Change(record, frozenset(forget))


@dataclass(slots=True)
class ProtectionServices:
    """What the pipeline needs to choose and apply a protection level."""

    org: OrgPolicy
    tls: TlsCache
    escrow: EscrowStore | None
    audit: AuditTrail | None
    audit_key: bytes
    portal_base_url: str
    item_ttl: dt.timedelta

    @classmethod
    def policy_only(cls, config: Config) -> ProtectionServices:
        """Policy and TLS knowledge without a portal (benchmarks, tools): no portal level."""
        org, tls = _policy(config)
        return cls(org, tls, None, None, b"\0" * 32, config.portal.base_url, dt.timedelta(0))

    @classmethod
    async def open(cls, config: Config, *, create_keys: bool = True) -> ProtectionServices:
        """Open escrow and audit stores as configured.

        The escrow key ring and the member-reference key are created on first use, unless
        not `create_keys` (the portal and the bounce listener): then a missing one is a
        ConfigError, since a fresh key would not open what the workers sealed. The escrow
        and the audit trail record their fingerprints; a ConfigError if they record others
        (another host's: `secret_trouble`), or if a missing key would be made where they
        record one.
        """
        org, tls = _policy(config)
        portal = config.portal
        ring, reference = portal_secrets(config)
        held = await hold_secrets((ring, reference), create=create_keys)
        escrow = await open_escrow(portal.escrow_url, held.ring(ring))
        audit = await open_audit(portal.audit_url)
        return cls(
            org,
            tls,
            escrow,
            audit,
            held.key(reference),
            portal.base_url,
            dt.timedelta(days=portal.item_days),
        )

    def member_ref(self, member_id: str) -> str:
        """The opaque reference to a member that the audit trail stores."""
        return member_ref(self.audit_key, member_id)

    def recipient_ref(self, address: str) -> str:
        """The opaque reference to an address that the audit trail stores."""
        return recipient_ref(self.audit_key, address)

    async def record(
        self,
        event_id: str,
        action: AuditAction,
        *,
        actor: str,
        member_id: str,
        protection: str | None,
        reason: str | None,
        recipient: str | None = None,
    ) -> None:
        """Append to the audit trail, when there is one; `recipient` (the address the
        notice went to) is written only as its opaque reference."""
        if self.audit is None:
            return
        await self.audit.append(
            AuditRecord(
                event_id,
                action,
                actor,
                dt.datetime.now(dt.UTC),
                member_ref=self.member_ref(member_id),
                protection=protection,
                reason=reason,
                recipient_ref=None if recipient is None else self.recipient_ref(recipient),
            )
        )

    async def close(self) -> None:
        """Close the stores."""
        if self.escrow is not None:
            await self.escrow.close()
        if self.audit is not None:
            await self.audit.close()


def _policy(config: Config) -> tuple[OrgPolicy, TlsCache]:
    protection = config.protection
    verified_ttl = dt.timedelta(hours=protection.tls_cache_hours)
    failure_ttl = dt.timedelta(hours=protection.failure_hours)
    org = OrgPolicy(
        portal_domains=frozenset(protection.portal_domains),
        tls_policy_domains=frozenset(protection.tls_policy_domains),
        smime_enabled=protection.smime_enabled,
        tls_cache_ttl=verified_ttl,
        failure_ttl=failure_ttl,
        allow_opportunistic_verified_cache=protection.learn_from_handshakes,
    )
    tls = TlsCache(
        verified_ttl=verified_ttl,
        failure_ttl=failure_ttl,
        policy_domains=frozenset(protection.tls_policy_domains),
        mta_sts_enforce_domains=frozenset(protection.mta_sts_enforce_domains),
    )
    return org, tls
