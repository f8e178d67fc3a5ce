"""What the shaping path costs when warm-up is off: bench_core's end to end, with and without.

Issue 6: "with warm-up off (mature IPs) the end-to-end benchmark figure does not drop by
more than 5% against the same run without shaping code in the path". Both variants run
bench_core's own `eobblast_e2e` (same events, same receiver: smtp-sink behind the STARTTLS
front) in one process, alternating A B B A ... so drift (thermal, page cache, the other
core's load) falls on both alike; the figure compared is the median of each.

The shaped variant sends through a Shaper whose pool has mature source IPs (127.0.0.2,
127.0.0.3, ...), budgets in SQLite, and per-destination limits set so they never bind
(the same total connections and messages per connection as the unshaped run, no rate
limit worth the name): what is measured is the code in the path, not a throttle.

Prints one JSON line per run and a summary line, then a table (unless --json-only).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import uvloop
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core
from bench_core import (
    BenchError,
    Result,
    _on_sigterm,
    eobblast_config,
    find_smtp_sink,
    prepare,
    receiver,
)
from eobblast.config import TransportConfig
from eobblast.shaping import (
    BudgetLeaser,
    PoolConfig,
    Shaper,
    ShapingConfig,
    ShapingSettings,
    SqliteBudgetStore,
    loads_pools,
)
from eobblast.shaping.settings import default_warmup_text, parse_shaping
from eobblast.transport import Transport

MAX_DROP = 0.05
POOL = "eob-transactional"


def shaping_settings(connections_per_ip: int, messages_per_connection: int) -> ShapingSettings:
    """The packaged warm-up data, with limits that do not bind."""
    head, _, rest = default_warmup_text().partition("\n[limits.default]")
    backoff = rest.partition("\n[backoff]")[2]
    limits = (
        "[limits.default]\n"
        f"max_connections = {connections_per_ip}\n"
        f"messages_per_connection = {messages_per_connection}\n"
        "messages_per_second = 1000000.0\n"
        "burst = 100000\n"
    )
    return parse_shaping(tomllib.loads(f"{head}\n{limits}\n[backoff]{backoff}"), "bench")


def mature_pools(ips: int) -> PoolConfig:
    """One pool of mature IPs 127.0.0.2 ... serving every traffic class."""
    members = "".join(
        f'[[pools.{POOL}.ips]]\naddress = "127.0.0.{n + 2}"\n'
        f'ehlo = "mta{n + 2}.bench.example"\nwarmup_start = "mature"\n'
        for n in range(ips)
    )
    return loads_pools(f'default_pool = "{POOL}"\n{members}')


class ShapedTransports:
    """Stands in for bench_core's `Transport` name: `from_config` builds a shaped one.

    The shaping data is parsed once and each run's budget store is opened by `prepare`,
    before the timed run, as a worker does both once when it starts: the run pays for
    what a worker pays per message.
    """

    def __init__(self, workdir: Path, ips: int, connections: int, per_connection: int) -> None:
        self._workdir = workdir
        self._pools = mature_pools(ips)
        self._settings = shaping_settings(max(1, connections // ips), per_connection)
        self._store: SqliteBudgetStore | None = None
        self._runs = 0
        self.made: list[Shaper] = []

    def prepare(self) -> None:
        """Open a fresh budget store for the next run."""
        self._runs += 1
        self._store = SqliteBudgetStore(self._workdir / f"budgets-{self._runs}.db")

    def from_config(self, config: TransportConfig) -> Transport:
        """A Transport with a Shaper over mature IPs and the prepared store."""
        store, self._store = self._store, None
        if store is None:
            raise BenchError("ShapedTransports.prepare() must run before each shaped run")
        settings = self._settings
        shaper = Shaper(
            self._pools,
            settings,
            BudgetLeaser(store, settings.plan, chunk=ShapingConfig().lease_chunk),
            store,
            owns_store=True,
        )
        self.made.append(shaper)
        return Transport.from_config(config, shaper=shaper)

    def close_all(self) -> None:
        """Give back budgets and close the stores (their SQLite work needs no running loop)."""
        while self.made:
            uvloop.run(self.made.pop().aclose())


def transports(factory: ShapedTransports) -> contextlib.AbstractContextManager[Any]:
    """Make bench_core's end to end build its transport with `factory` for a while."""
    return mock.patch.object(bench_core, "Transport", factory)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up both variants, then alternate timed runs; returns the summary."""
    quiet = args.json_only

    def progress(text: str) -> None:
        if not quiet:
            print(f"... {text}", file=sys.stderr, flush=True)

    find_smtp_sink()
    runs: dict[str, list[Result]] = {"plain": [], "shaped": []}
    with tempfile.TemporaryDirectory(prefix="eobblast-bench-shaping-") as tmp:
        workdir = Path(tmp)
        progress(f"generating keys, test PKI and {args.messages} synthetic events")
        setup = prepare(workdir, args.messages)
        gc.collect()
        gc.freeze()
        with receiver(setup.pki, workdir) as rx:
            config = eobblast_config(setup, rx.port, args.in_flight, args.connections)
            events = setup.events[: args.messages]
            per_connection = config.transport.max_messages_per_connection
            shaped = ShapedTransports(workdir, args.ips, args.connections, per_connection)

            def once(variant: str, batch: list[bytes]) -> Result:
                if variant == "plain":
                    return uvloop.run(bench_core.eobblast_e2e(config, batch, rx))
                shaped.prepare()
                with transports(shaped):
                    try:
                        return uvloop.run(bench_core.eobblast_e2e(config, batch, rx))
                    finally:
                        shaped.close_all()

            progress("warming up both variants")
            for variant in runs:
                once(variant, events[: min(500, len(events))])
            # Pairs run back to back, alternately plain first and shaped first (A B B A ...),
            # and the verdict is the median of the pairs' ratios: a machine that gets
            # busier or quieter during the run moves both halves of a pair together.
            for pair in range(args.rounds):
                variants = ("plain", "shaped") if pair % 2 == 0 else ("shaped", "plain")
                for variant in variants:
                    progress(f"pair {pair + 1}/{args.rounds}: {variant}")
                    result = once(variant, events)
                    runs[variant].append(result)
                    line = {"variant": variant, "pair": pair + 1, **result.as_json()}
                    print(orjson.dumps(line).decode(), flush=True)
    pairs = list(zip(runs["plain"], runs["shaped"], strict=True))
    ratio = statistics.median(b.msgs_per_s / a.msgs_per_s for a, b in pairs)
    cpu_ratio = statistics.median(
        a.detail["cpu_us_per_msg"] / b.detail["cpu_us_per_msg"] for a, b in pairs
    )
    cpu_plain = statistics.median(r.detail["cpu_us_per_msg"] for r in runs["plain"])
    cpu_shaped = statistics.median(r.detail["cpu_us_per_msg"] for r in runs["shaped"])
    return {
        "name": "summary",
        "messages": args.messages,
        "rounds": args.rounds,
        "ips": args.ips,
        "plain_msgs_per_s": round(statistics.median(r.msgs_per_s for r in runs["plain"]), 1),
        "shaped_msgs_per_s": round(statistics.median(r.msgs_per_s for r in runs["shaped"]), 1),
        # shaped / plain throughput, median over pairs: the figure
        "ratio": round(ratio, 4),
        "drop_pct": round((1 - ratio) * 100, 2),
        # plain / shaped CPU per message: what the ratio would be if the sender were the
        # only thing on the machine (steadier than wall time on a shared machine)
        "cpu_ratio": round(cpu_ratio, 4),
        "plain_cpu_us_per_msg": cpu_plain,
        "shaped_cpu_us_per_msg": cpu_shaped,
        "shaping_cpu_us_per_msg": round(cpu_shaped - cpu_plain, 1),
        "max_drop_pct": MAX_DROP * 100,
        "meets_target": ratio >= 1 - MAX_DROP,
    }


def print_table(summary: dict[str, Any]) -> None:
    """The human-readable summary."""
    table = Table(title="shaping with warm-up off (mature IPs) vs no shaping, bench_core e2e")
    table.add_column("variant")
    table.add_column("msgs/s (median)", justify="right")
    table.add_column("eobblast CPU us/msg", justify="right")
    table.add_row(
        "no shaping",
        f"{summary['plain_msgs_per_s']:,.0f}",
        f"{summary['plain_cpu_us_per_msg']:.0f}",
    )
    table.add_row(
        f"shaped, {summary['ips']} mature IPs",
        f"{summary['shaped_msgs_per_s']:,.0f}",
        f"{summary['shaped_cpu_us_per_msg']:.0f}",
    )
    table.add_section()
    verdict = "meets" if summary["meets_target"] else "MISSES"
    table.add_row(
        "shaped vs plain (median of pairs)",
        f"{summary['ratio']:.3f}x",
        f"{summary['shaping_cpu_us_per_msg']:+.1f} ({summary['cpu_ratio']:.3f}x)",
    )
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    print(f"drop {summary['drop_pct']:.1f}% (target <= {MAX_DROP * 100:.0f}%): {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="events per timed run")
    parser.add_argument("--rounds", type=int, default=6, help="timed pairs (plain + shaped)")
    parser.add_argument("--in-flight", type=int, default=64, help="pipeline.max_in_flight")
    parser.add_argument("--connections", type=int, default=16, help="connections in total")
    parser.add_argument("--ips", type=int, default=2, help="mature IPs in the shaped pool")
    parser.add_argument("--json-only", action="store_true", help="no table, no progress")
    args = parser.parse_args(argv)
    for name in ("messages", "rounds", "in_flight", "connections", "ips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when the benchmark ran (whatever the verdict), 1 when it could not."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        summary = run(args)
    except BenchError as exc:
        print(f"bench_shaping: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(summary).decode(), flush=True)
    if not args.json_only:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
