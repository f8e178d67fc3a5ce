"""Shaping: IP pools, warm-up schedules, per-destination limits, adaptive backoff, budgets.

Shaping is data (config/warmup.toml, config/pools.toml); this package is the engine over
it. Decisions are pure functions; `budgets` does the store I/O, and `engine.Shaper` is the
per-worker shell the Transport consults for every message (`cli` prints pool status).
"""

from eobblast.shaping.backoff import (
    BackoffPolicy,
    BackoffState,
    ReplySignal,
    available_at,
    current_rate,
    initial_state,
    is_paused,
    is_suspended,
    observe_reply,
    resume,
    sync_suspension,
)
from eobblast.shaping.budgets import (
    BudgetKey,
    BudgetLeaser,
    BudgetStore,
    BudgetUsage,
    Lease,
    LeaseRequest,
    PostgresBudgetStore,
    SqliteBudgetStore,
    Suspension,
    open_budgets,
)
from eobblast.shaping.engine import (
    DeferReason,
    PairView,
    Shaper,
    ShapingConfig,
    ShapingDeferred,
    Ticket,
)
from eobblast.shaping.limits import DestinationLimits, RateShaper, ShapingLimits
from eobblast.shaping.pools import IpPool, PoolConfig, SourceIp, load_pools, loads_pools
from eobblast.shaping.providers import ProviderRule, Providers
from eobblast.shaping.settings import ShapingSettings, load_shaping, load_warmup, loads_shaping
from eobblast.shaping.status import (
    IpStatus,
    PoolStatus,
    ProviderStatus,
    pool_status,
    read_pool_status,
)
from eobblast.shaping.warmup import (
    IpActivity,
    IpBudget,
    WaitReason,
    WaitUntil,
    WarmupPlan,
    WarmupSchedule,
    choose_ip,
    hour_bucket,
)

__all__ = [
    "BackoffPolicy",
    "BackoffState",
    "BudgetKey",
    "BudgetLeaser",
    "BudgetStore",
    "BudgetUsage",
    "DeferReason",
    "DestinationLimits",
    "IpActivity",
    "IpBudget",
    "IpPool",
    "IpStatus",
    "Lease",
    "LeaseRequest",
    "PairView",
    "PoolConfig",
    "PoolStatus",
    "PostgresBudgetStore",
    "ProviderRule",
    "ProviderStatus",
    "Providers",
    "RateShaper",
    "ReplySignal",
    "Shaper",
    "ShapingConfig",
    "ShapingDeferred",
    "ShapingLimits",
    "ShapingSettings",
    "SourceIp",
    "SqliteBudgetStore",
    "Suspension",
    "Ticket",
    "WaitReason",
    "WaitUntil",
    "WarmupPlan",
    "WarmupSchedule",
    "available_at",
    "choose_ip",
    "current_rate",
    "hour_bucket",
    "initial_state",
    "is_paused",
    "is_suspended",
    "load_pools",
    "load_shaping",
    "load_warmup",
    "loads_pools",
    "loads_shaping",
    "observe_reply",
    "open_budgets",
    "pool_status",
    "read_pool_status",
    "resume",
    "sync_suspension",
]
