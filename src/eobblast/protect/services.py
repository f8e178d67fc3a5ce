"""The protection stage's services: policy, TLS knowledge, escrow and audit, opened from config."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import secrets
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from eobblast._files import file_lock, write_whole
from eobblast.config import Config
from eobblast.errors import ConfigError
from eobblast.observe.audit import AuditAction, AuditRecord, AuditTrail, member_ref, open_audit
from eobblast.protect.escrow import EscrowStore, KeyRing, open_escrow
from eobblast.protect.policy import OrgPolicy, TlsCache
from eobblast.state.fingerprints import agree_fingerprints, fingerprint, recorded_fingerprints


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


def ensure_secrets(config: Config) -> list[tuple[str, Path, bool]]:
    """Create the secrets `config` names that do not exist yet; keep those that do.

    The VERP key (when bounces are on), the escrow key ring and the member-reference
    (audit) key. The workers create them on first use, but the bounce listener and the
    portal only read them: a key of their own would not open what the workers made.
    Returns (what, where, created) for each.
    """
    portal = config.portal
    made: list[tuple[str, Path, bool]] = []
    if config.bounces.enabled:
        verp = config.bounces.verp_key_file
        existed = verp.exists()
        load_or_create_secret(verp)
        made.append(("VERP key", verp, not existed))
    existed = (portal.key_dir / "active").exists()
    load_or_create_keyring(portal.key_dir, not_keys=[portal.audit_key_file])
    made.append(("escrow key ring", portal.key_dir, not existed))
    existed = portal.audit_key_file.exists()
    load_or_create_secret(portal.audit_key_file)
    made.append(("member-reference key", portal.audit_key_file, not existed))
    return made


@dataclass(frozen=True, slots=True)
class SharedSecret:
    """A secret kept in a file (or a key ring in a directory) that every host of a
    deployment must hold the same, and the store that records its fingerprints.

    Its keys are recorded as "`what` `key id`" ("VERP key 1", "escrow key k2026...") or,
    without an id, as `what` ("member-reference key").
    """

    what: str
    key_id: str | None  # None: a key ring, whose ids come with its keys
    setting: str  # where its file is set, as errors name it: "[bounces] verp_key_file"
    check: str  # its name in `eobblast check`: "bounces verp_key_file"
    path: Path
    store: str  # the URL setting of the store that records it
    url: str
    lost: str  # what goes wrong when hosts hold different keys
    made: bool = True  # a missing file is made at the first start (not a rotated-out key)

    def exists(self) -> bool:
        """Whether this host holds it (a key ring: its `active` file)."""
        return (self.path / "active" if self.key_id is None else self.path).exists()

    def recorded_as(self, key_id: str) -> str:
        """The name a store records a key's fingerprint under."""
        return f"{self.what} {key_id}".rstrip()

    def of(self, key: bytes) -> dict[str, str]:
        """Key id -> fingerprint, for a secret of one key."""
        assert self.key_id is not None, "a key ring's fingerprints come from the ring"
        return {self.key_id: fingerprint(key)}


def portal_secrets(config: Config) -> tuple[SharedSecret, SharedSecret]:
    """The escrow key ring (recorded by the escrow) and the member-reference key (by the
    audit trail, whose references it makes)."""
    portal = config.portal
    return (
        SharedSecret(
            "escrow key",
            None,
            "[portal] key_dir",
            "portal key_dir",
            portal.key_dir,
            "portal.escrow_url",
            portal.escrow_url,
            "a portal link from one host would not open with another host's key ring",
        ),
        SharedSecret(
            "member-reference key",
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
    """The VERP key and the previous ones (`verp_previous_keys`, which are not made), in
    the order the bounce service takes them; the bounce store records them."""
    bounces = config.bounces
    keys = [(bounces.verp_key_id, "verp_key_file", bounces.verp_key_file, "")]
    keys += [
        (key_id, "verp_previous_keys", path, f" {key_id}")
        for key_id, path in bounces.previous_verp_keys()
    ]
    return [
        SharedSecret(
            "VERP key",
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
        theirs = {n: f for n, f in recorded.items() if n.startswith(f"{secret.what} ")}
    else:
        name = secret.recorded_as(secret.key_id)
        theirs = {name: recorded[name]} if name in recorded else {}
    if not theirs:
        return None
    files = "the key ring's files" if secret.key_id is None else "the key file"
    copy = (
        f"copy {files} from the host that first used the {secret.store} store to"
        f" {secret.path} (every host needs the same), then start again"
    )
    if ours is None:
        return (
            f"{secret.setting} {secret.path} does not exist, but the {secret.store} store"
            f" records another host's {secret.what}: one made here would differ"
            f" ({secret.lost}); {copy}"
        )
    mine = {secret.recorded_as(key_id): value for key_id, value in ours.items()}
    differing = sorted(name for name, value in mine.items() if theirs.get(name, value) != value)
    if differing:
        return (
            f"{', '.join(differing)} in {secret.setting} {secret.path} is not the key the"
            f" {secret.store} store records ({secret.lost}); {copy}"
        )
    if not mine.keys() & theirs.keys():
        return (
            f"{secret.setting} {secret.path} holds none of the keys the {secret.store} store"
            f" records ({', '.join(sorted(theirs))}): it was made on this host"
            f" ({secret.lost}); {copy}"
        )
    return None


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


async def agree_secrets(used: Sequence[tuple[SharedSecret, Mapping[str, str]]]) -> None:
    """Record in their stores the fingerprints (by key id) of the secrets this host uses,
    where none is recorded yet; a ConfigError, recording nothing, if a store records keys
    they disagree with (`secret_trouble`)."""
    by_url: dict[str, list[tuple[SharedSecret, Mapping[str, str]]]] = {}
    for secret, ours in used:
        by_url.setdefault(secret.url, []).append((secret, ours))
    for url, group in by_url.items():
        names = {
            s.recorded_as(key_id): value for s, ours in group for key_id, value in ours.items()
        }
        await agree_fingerprints(
            url, group[0][0].store, names, functools.partial(_refuse_all, group)
        )


def _refuse_all(
    used: Sequence[tuple[SharedSecret, Mapping[str, str]]], recorded: Mapping[str, str]
) -> None:
    for secret, ours in used:
        _refuse(secret, ours, recorded)


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
        if create_keys:
            await refuse_new_keys((ring, reference))
        keys = load_or_create_keyring(
            portal.key_dir, not_keys=[portal.audit_key_file], create=create_keys
        )
        audit_key = load_or_create_secret(
            portal.audit_key_file, create=create_keys, what="member-reference key"
        )
        await agree_secrets([(ring, keys.fingerprints), (reference, reference.of(audit_key))])
        escrow = await open_escrow(portal.escrow_url, keys)
        audit = await open_audit(portal.audit_url)
        return cls(
            org,
            tls,
            escrow,
            audit,
            audit_key,
            portal.base_url,
            dt.timedelta(days=portal.item_days),
        )

    def member_ref(self, member_id: str) -> str:
        """The opaque reference to a member that the audit trail stores."""
        return member_ref(self.audit_key, member_id)

    async def record(
        self,
        event_id: str,
        action: AuditAction,
        *,
        actor: str,
        member_id: str,
        protection: str | None,
        reason: str | None,
    ) -> None:
        """Append to the audit trail, when there is one."""
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
