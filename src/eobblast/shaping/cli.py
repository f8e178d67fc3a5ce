"""`eobblast pools status`: every pool IP's warm-up day, this hour's budget and suspensions.

The figures come from the shared budget store, so they cover every worker process and
machine; `sent` lags by at most one lease chunk per worker (workers report as they lease).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from eobblast._cli import command_config, config_option
from eobblast.errors import ConfigError
from eobblast.shaping.budgets import BudgetStore, Suspension, open_budgets
from eobblast.shaping.engine import ShapingConfig
from eobblast.shaping.pools import PoolConfig, load_pools
from eobblast.shaping.settings import load_shaping
from eobblast.shaping.status import PoolStatus, read_pool_status
from eobblast.shaping.warmup import WarmupPlan
from eobblast.state.sqlite import sqlite_path


async def _open_existing(url: str) -> BudgetStore:
    """The budget store the workers write; an operator command never creates one."""
    path = sqlite_path(url, "shaping.budgets_url")
    if path is not None and not path.is_file():
        raise ConfigError(
            f"no budget store at {path.absolute()}: no worker has used it yet, or"
            " [shaping] budgets_url names another file"
        )
    return await open_budgets(url)


async def _read(
    url: str, pools: PoolConfig, plan: WarmupPlan, now: float
) -> tuple[tuple[PoolStatus, ...], dict[tuple[str, str], Suspension]]:
    store = await _open_existing(url)
    try:
        return await read_pool_status(store, pools, plan, now), await store.suspensions(now)
    finally:
        await store.close()


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def pool_table(status: PoolStatus) -> Table:
    """One pool as a table: a row per (IP, provider)."""
    hour = _when(status.hour * 3600.0)
    table = Table(title=f"pool {status.name} (hour from {hour})")
    for name in ("IP", "EHLO name", "warm-up day", "provider"):
        table.add_column(name)
    for name in ("sent", "cap", "used", "deferred"):
        table.add_column(name, justify="right")
    table.add_column("suspended")
    for ip in status.ips:
        day = "mature" if ip.warmup_day is None else str(ip.warmup_day)
        for provider in ip.providers:
            suspended = ""
            if provider.suspended_until is not None:
                suspended = f"until {_when(provider.suspended_until)} ({provider.suspension_code})"
            table.add_row(
                ip.address,
                ip.ehlo_name,
                day,
                provider.provider,
                str(provider.sent),
                str(provider.cap),
                str(provider.used),
                str(provider.deferred),
                suspended,
            )
        table.add_section()
    return table


@click.group("pools")
def pools() -> None:
    """Dedicated IP pools: warm-up progress, hourly budgets and suspensions."""


def _configured_pools(config_path: Path | None) -> tuple[ShapingConfig, PoolConfig]:
    """The shaping settings and their pools file (ConfigError when shaping is off)."""
    config = command_config(config_path).shaping
    if config.pools_file is None:
        raise ConfigError("shaping is off: the configuration names no [shaping] pools_file")
    return config, load_pools(config.pools_file)


@pools.command("status")
@config_option("eobblast configuration file (its [shaping] section names pools, data and store).")
@click.option(
    "--at",
    type=float,
    default=None,
    help="Show the hour containing this time (epoch seconds) instead of the current one.",
)
def pools_status(config_path: Path | None, at: float | None) -> None:
    """Print, per pool and IP: this hour's sends, cap, deferrals, warm-up day, suspensions."""
    try:
        config, pool_config = _configured_pools(config_path)
        plan = load_shaping(config.warmup_file).plan
        now = time.time() if at is None else at
        statuses, suspensions = asyncio.run(_read(config.budgets_url, pool_config, plan, now))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    # Piped output (scripts, tests) would otherwise be cut to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    for status in statuses:
        console.print(pool_table(status))
    # Blocks by one site of the fallback provider suspend the IP for that site only.
    names = set(plan.providers.names)
    for (ip, scope), suspension in sorted(suspensions.items()):
        if scope not in names:
            console.print(
                f"{ip} suspended for {scope} until {_when(suspension.until)} ({suspension.code})"
            )


async def _resume(url: str, ip: str, provider: str | None, now: float) -> list[Suspension]:
    store = await _open_existing(url)
    try:
        lifted = [
            suspension
            for (s_ip, scope), suspension in sorted((await store.suspensions(now)).items())
            if s_ip == ip and provider in (None, scope)
        ]
        for suspension in lifted:
            await store.resume(suspension.ip, suspension.provider)
        return lifted
    finally:
        await store.close()


@pools.command("resume")
@config_option("eobblast configuration file (its [shaping] section names the budget store).")
@click.option("--ip", required=True, help="The source IP whose suspension to lift.")
@click.option(
    "--provider",
    default=None,
    help="Only for this provider (or fallback site); default: every provider of the IP.",
)
def pools_resume(config_path: Path | None, ip: str, provider: str | None) -> None:
    """Lift a block suspension before its cooldown ends (workers pick it up within seconds)."""
    try:
        # As the pools file writes it: 2001:DB8::A is 2001:db8::a there.
        ip = str(ipaddress.ip_address(ip.strip()))
    except ValueError:
        raise click.BadParameter(f"{ip!r} is not an IP address", param_hint="--ip") from None
    try:
        config, pool_config = _configured_pools(config_path)
        configured = {source.address for source in pool_config.all_ips()}
        if ip not in configured:
            # A typo would otherwise read as "not suspended": as if the IP were sending.
            raise ConfigError(
                f"{ip} is not a configured IP: it is in no pool of {config.pools_file}"
            )
        lifted = asyncio.run(_resume(config.budgets_url, ip, provider, time.time()))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not lifted:
        scope = f" for {provider}" if provider else ""
        raise click.ClickException(f"{ip} is not suspended{scope}")
    for suspension in lifted:
        click.echo(
            f"{suspension.ip}: suspension for {suspension.provider} lifted"
            f" (was until {_when(suspension.until)}, {suspension.code})"
        )
