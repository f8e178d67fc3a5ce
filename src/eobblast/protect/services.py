"""The protection stage's services: policy, TLS knowledge, escrow and audit, opened from config."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import secrets
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from eobblast._files import file_lock, write_whole
from eobblast.config import Config
from eobblast.errors import ConfigError
from eobblast.observe.audit import AuditAction, AuditRecord, AuditTrail, member_ref, open_audit
from eobblast.protect.escrow import EscrowStore, KeyRing, open_escrow
from eobblast.protect.policy import OrgPolicy, TlsCache


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
        ConfigError, since a fresh key would not open what the workers sealed.
        """
        org, tls = _policy(config)
        portal = config.portal
        keys = load_or_create_keyring(
            portal.key_dir, not_keys=[portal.audit_key_file], create=create_keys
        )
        audit_key = load_or_create_secret(
            portal.audit_key_file, create=create_keys, what="member-reference key"
        )
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
