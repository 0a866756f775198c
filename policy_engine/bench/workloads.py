"""The benchmark's rows, as data: which server, which RPC, which request, what answer to expect.

A new configuration (a cache level, Redis down, more workers) is a new `Row` in `ROWS` with a
different `ServerSpec` (flags, environment), not a new code path in the harness.

Requests are the scenarios of DOMAIN.md against the example policies in `policies/` (acme).
Every row carries a check of the answer, run with a real gRPC client before and after the
load, because h2load counts an RPC error as a success (HTTP 200, status in the trailers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle, islice

from google.protobuf.message import Message

from policy_engine import client
from policy_engine.api import pdp_pb2
from policy_engine.bench.h2load import LoadShape
from policy_engine.bench.server import (
    AUDIT_DIR,
    AUDIT_KEY,
    CACHE_KEY_FILE,
    CLOSED_REDIS_URL,
    REDIS_URL,
    ServerSpec,
)

SERVICE = pdp_pb2.DESCRIPTOR.services_by_name["PolicyDecisionService"].full_name

# RPC name -> (request type, response type); the harness calls `/SERVICE/<name>`.
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "Check": (pdp_pb2.CheckRequest, pdp_pb2.CheckResponse),
    "CheckBatch": (pdp_pb2.CheckBatchRequest, pdp_pb2.CheckBatchResponse),
}

Check = Callable[[Message], list[str]]
"""Problems with a response (empty when it is what the row expects)."""


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"


# --- requests --------------------------------------------------------------------------------


def check_request(
    subject: str,
    groups: Sequence[str],
    integration: str,
    scope: str,
    *,
    application: str = "pr-reviewer",
    organization: str = "acme",
) -> pdp_pb2.CheckRequest:
    """One tuple, built as the broker builds it (the client's `check_request`), connected."""
    return client.check_request(
        organization,
        subject,
        application,
        integration,
        scope,
        subject_attributes={"groups": list(groups)},
        connected=True,
    )


@dataclass(frozen=True, slots=True)
class Expected:
    """The decision one tuple should get: an effect and, for a deny, the deciding layer."""

    effect: int  # pdp_pb2.Effect
    layer: int = pdp_pb2.LAYER_UNSPECIFIED  # for a deny: some reason must name this layer
    code: str = "kontext_policy_denied"


ALLOW = Expected(pdp_pb2.EFFECT_ALLOW)


def allow_tuple() -> pdp_pb2.CheckRequest:
    """alice (engineering), pr-reviewer, github, repo: allowed by all three layers."""
    return check_request("alice", ["engineering"], "github", "repo")


def deny_tuple() -> pdp_pb2.CheckRequest:
    """bob (sales), pr-reviewer, github, repo: no org rule applies, the org default denies."""
    return check_request("bob", ["sales"], "github", "repo")


DENY_ORG_DEFAULT = Expected(pdp_pb2.EFFECT_DENY, pdp_pb2.LAYER_ORG)


def _batch_tuple(index: int) -> tuple[pdp_pb2.CheckRequest, Expected]:
    """Item `index` of the mixed batch: even items allow, odd items cycle through the denies.

    Subjects differ per item (engineer-0, engineer-2, ...), so a decision cache added later
    sees 100 distinct tuples rather than one repeated answer.
    """
    if index % 2 == 0:
        scope = "repo" if index % 4 == 0 else "read:org"
        return check_request(f"engineer-{index}", ["engineering"], "github", scope), ALLOW
    denies: list[tuple[pdp_pb2.CheckRequest, Expected]] = [
        (  # org rule: nobody deletes repositories
            check_request(f"engineer-{index}", ["engineering"], "github", "delete_repo"),
            Expected(pdp_pb2.EFFECT_DENY, pdp_pb2.LAYER_ORG),
        ),
        (  # alice's own user-layer rule
            check_request("alice", ["engineering"], "github", "admin:org"),
            Expected(pdp_pb2.EFFECT_DENY, pdp_pb2.LAYER_USER),
        ),
        (  # pr-reviewer's application layer allows github only
            check_request(f"engineer-{index}", ["engineering"], "linear", "read"),
            Expected(pdp_pb2.EFFECT_DENY, pdp_pb2.LAYER_APPLICATION),
        ),
        (  # sales: the org layer's default
            check_request(f"sales-{index}", ["sales"], "github", "repo"),
            DENY_ORG_DEFAULT,
        ),
    ]
    return denies[(index // 2) % len(denies)]


def mixed_batch(size: int) -> tuple[pdp_pb2.CheckBatchRequest, list[Expected]]:
    """`size` tuples, half allowed and half denied by each of the three layers in turn."""
    pairs = [_batch_tuple(i) for i in range(size)]
    return (
        pdp_pb2.CheckBatchRequest(items=[request for request, _ in pairs]),
        [expected for _, expected in pairs],
    )


def repeat_batch(request: pdp_pb2.CheckRequest, size: int) -> pdp_pb2.CheckBatchRequest:
    """One tuple `size` times (for rows that want a batch of identical, e.g. cached, items)."""
    return pdp_pb2.CheckBatchRequest(items=list(islice(cycle([request]), size)))


# --- checks ----------------------------------------------------------------------------------


def decision_problems(response: pdp_pb2.CheckResponse, expected: Expected) -> list[str]:
    """Why one CheckResponse is not the expected decision (empty when it is)."""
    effect = pdp_pb2.Effect.Name(response.effect)
    if response.effect != expected.effect:
        codes = ", ".join(f"{r.code}@{pdp_pb2.Layer.Name(r.layer)}" for r in response.reasons)
        return [f"effect {effect}, expected {pdp_pb2.Effect.Name(expected.effect)} ({codes})"]
    wants_layer = expected.effect == pdp_pb2.EFFECT_DENY and expected.layer != 0
    if wants_layer and not any(
        r.layer == expected.layer and r.code == expected.code for r in response.reasons
    ):
        found = ", ".join(f"{r.code}@{pdp_pb2.Layer.Name(r.layer)}" for r in response.reasons)
        want = f"{expected.code}@{pdp_pb2.Layer.Name(expected.layer)}"
        return [f"deny reasons [{found}] lack {want}"]
    return []


def expect_decision(expected: Expected) -> Check:
    def check(response: Message) -> list[str]:
        assert isinstance(response, pdp_pb2.CheckResponse)
        return decision_problems(response, expected)

    return check


def _level_problems(response: pdp_pb2.CheckResponse, level: int) -> list[str]:
    cached = level != pdp_pb2.CACHE_LEVEL_NONE
    if response.cache_level != level or response.cached is not cached:
        return [
            f"answered from {pdp_pb2.CacheLevel.Name(response.cache_level)} "
            f"(cached={response.cached}), expected {pdp_pb2.CacheLevel.Name(level)}"
        ]
    return []


def expect_cached(expected: Expected, level: int) -> Check:
    """The expected decision, answered by cache `level` (after load: the cache is warm)."""

    def check(response: Message) -> list[str]:
        assert isinstance(response, pdp_pb2.CheckResponse)
        return decision_problems(response, expected) or _level_problems(response, level)

    return check


def expect_batch(expected: Sequence[Expected]) -> Check:
    """Every result in order is its item's expected decision."""

    def check(response: Message) -> list[str]:
        assert isinstance(response, pdp_pb2.CheckBatchResponse)
        if len(response.results) != len(expected):
            return [f"{len(response.results)} results, expected {len(expected)}"]
        problems: list[str] = []
        for index, (result, want) in enumerate(zip(response.results, expected, strict=True)):
            problems += [f"item {index}: {p}" for p in decision_problems(result, want)]
        return problems

    return check


def expect_batch_cached(expected: Sequence[Expected], level: int) -> Check:
    """Every result is its item's expected decision, each answered by cache `level`."""
    decisions = expect_batch(expected)

    def check(response: Message) -> list[str]:
        assert isinstance(response, pdp_pb2.CheckBatchResponse)
        problems = decisions(response)
        for index, result in enumerate(response.results):
            problems += [f"item {index}: {p}" for p in _level_problems(result, level)]
        return problems

    return check


def expect_results(count: int) -> Check:
    """The batch has `count` results (the empty servicer's answers carry no real decision)."""

    def check(response: Message) -> list[str]:
        assert isinstance(response, pdp_pb2.CheckBatchResponse)
        got = len(response.results)
        return [] if got == count else [f"{got} results, expected {count}"]

    return check


# --- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table.

    `baseline` names the row whose req/s this row's ratio is taken against: the empty
    servicer answering the same RPC, so the ratio is the share of the ceiling this row keeps.
    `check` is run before the load and `check_after` (default: `check`) after it, when a
    cache row must be answering from its cache. `shape` overrides the run's load shape
    (connections x streams), for latency rows at moderate load; `family` names the row at
    64 in flight that a `-c1 -m1` row repeats (the latency table pairs them). `in_process`
    names the in-process servicer case (`hit_path`) doing this row's decision work, shown
    beside the row's server CPU per decision.
    """

    name: str
    server: ServerSpec
    method: str
    request: Message
    check: Check
    decisions_per_request: int = 1
    baseline: str = "empty Check"
    notes: str = ""
    check_after: Check | None = None
    shape: LoadShape | None = None
    family: str = ""
    in_process: str = ""

    @property
    def group(self) -> str:
        """The workload this row measures, whatever the load shape (its family or itself)."""
        return self.family or self.name

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"row {self.name!r}: unknown method {self.method!r}")
        if not isinstance(self.request, METHODS[self.method][0]):
            raise ValueError(f"row {self.name!r}: request is not a {self.method} request")


BATCH_SIZE = 100
# Names the report's targets refer to.
EMPTY_CHECK = "empty Check"
CHECK_LOCAL = "Check cached (local)"
CHECK_REDIS = "Check cached (Redis, local off)"
CHECK_REDIS_MODERATE = "Check cached (Redis, -c1 -m1)"
BATCH_LOCAL = f"CheckBatch {BATCH_SIZE} cached (local)"
EMPTY_MODERATE = "empty Check (-c1 -m1)"
CHECK_LOCAL_MODERATE = "Check cached (local, -c1 -m1)"
CHECK_UNCACHED_MODERATE = "Check uncached (-c1 -m1)"
EMPTY_TWO_WORKERS = "empty Check, 2 workers"
CHECK_UNCACHED_TWO_WORKERS = "Check uncached, 2 workers"
MODERATE = LoadShape(clients=1, streams=1)  # one request in flight: latency, not queueing
BATCH_CACHED_TARGET = 150_000  # decisions/s of BATCH_LOCAL on one process (issue 11)

# Environment for the servers, by cache configuration. `{redis_url}` is the harness's own
# redis-server (started only when a selected row needs it); `{closed_redis_url}` a port on
# which nothing listens (Redis down). The Redis level runs only with a signing key: the
# harness writes a random one per run.
CACHE_OFF = {"PDP_CACHE__ENABLED": "false"}
LOCAL_ONLY = {"PDP_CACHE__ENABLED": "true", "PDP_CACHE__REDIS_URL": ""}
REDIS_ONLY = {
    "PDP_CACHE__ENABLED": "true",
    "PDP_CACHE__LOCAL_MAX_ENTRIES": "0",
    "PDP_CACHE__REDIS_URL": REDIS_URL,
    "PDP_CACHE__REDIS_SIGNING_KEY_FILE": CACHE_KEY_FILE,
}
REDIS_DOWN = {**REDIS_ONLY, "PDP_CACHE__REDIS_URL": CLOSED_REDIS_URL}
# The audit log as deployed: a file per worker, signed checkpoints; rotation bounds the disk.
AUDIT_ON = {
    "PDP_AUDIT__ENABLED": "true",
    "PDP_AUDIT__SINKS": "file",
    "PDP_AUDIT__FILE_PATH": f"{AUDIT_DIR}/audit-{{worker}}.jsonl",
    "PDP_AUDIT__SIGNING_KEY_FILE": AUDIT_KEY,
    "PDP_AUDIT__FILE_MAX_BYTES": str(64 * 1024 * 1024),
    "PDP_AUDIT__FILE_KEEP": "1",
}
AUDIT_TARGET = 0.90  # the audit log may cost at most 10% of the same row without it
CHECK_UNCACHED = "Check uncached (cache off)"
BATCH_UNCACHED = f"CheckBatch {BATCH_SIZE}"
CHECK_LOCAL_QUOTA = "Check cached (local) with a quota (Redis counter)"
CHECK_UNCACHED_QUOTA = "Check uncached with a quota (Redis counter)"
# A quota every allowed tuple of the rows counts in, never exhausted during a run: each ALLOW
# costs the quota check (one EVALSHA round trip to the harness's Redis), never a deny.
BENCH_QUOTA = (
    "acme/bench-quota.yaml",
    "kind: Quota\n"
    "name: bench-github-per-person\n"
    "target: {integrations: [github]}\n"
    "limit: 1000000000\n"
    "window: 31d\n"
    "per: [subject]\n",
)
QUOTA_IN_REDIS = {"PDP_QUOTA__REDIS_URL": REDIS_URL}

POLICY = ServerSpec("policy", env=CACHE_OFF)
EMPTY = ServerSpec("empty")
# The in-process servicer cases (`hit_path`) doing the rows' decision work.
IN_PROCESS_HIT = "servicer.Check, local hit"
IN_PROCESS_UNCACHED = "servicer.Check, uncached (cache off)"
IN_PROCESS_BATCH_HITS = f"servicer.CheckBatch {BATCH_SIZE}, local hits"
IN_PROCESS_BATCH_UNCACHED = f"servicer.CheckBatch {BATCH_SIZE}, uncached (cache off)"


def default_rows() -> list[Row]:
    """The rows `python -m policy_engine.bench` runs, in order (baselines first).

    Uncached rows run with the cache off: h2load repeats one body, which a cache would
    otherwise answer from the second request on. The main Check rows run at 64 in flight and
    again at one (`-c1 -m1`); two rows run 2 worker processes, for each worker's share.
    """
    batch, batch_expected = mixed_batch(BATCH_SIZE)
    local, redis = pdp_pb2.CACHE_LEVEL_LOCAL, pdp_pb2.CACHE_LEVEL_REDIS
    local_only, redis_only = (
        ServerSpec("policy", env=LOCAL_ONLY),
        ServerSpec("policy", env=REDIS_ONLY),
    )
    return [
        Row(
            EMPTY_CHECK, EMPTY, "Check", allow_tuple(), expect_decision(ALLOW),
            notes="EmptyServicer: constant answer, no decision work (the ceiling)",
        ),
        Row(
            CHECK_LOCAL, local_only, "Check",
            allow_tuple(), expect_decision(ALLOW), check_after=expect_cached(ALLOW, local),
            in_process=IN_PROCESS_HIT,
            notes="alice, pr-reviewer, github, repo; warmed, then every call an in-process hit",
        ),
        Row(
            CHECK_REDIS, redis_only, "Check",
            allow_tuple(), expect_decision(ALLOW), check_after=expect_cached(ALLOW, redis),
            notes="in-process level off: every call one Redis GET",
        ),
        Row(
            CHECK_UNCACHED, POLICY, "Check", allow_tuple(), expect_decision(ALLOW),
            in_process=IN_PROCESS_UNCACHED,
            notes="alice, pr-reviewer, github, repo; cache disabled",
        ),
        Row(
            "Check deny", POLICY, "Check", deny_tuple(), expect_decision(DENY_ORG_DEFAULT),
            notes="bob (sales), pr-reviewer, github, repo: org layer default deny; uncached",
        ),
        Row(
            "Check (Redis down: breaker open)", ServerSpec("policy", env=REDIS_DOWN), "Check",
            allow_tuple(), expect_decision(ALLOW),
            check_after=expect_cached(ALLOW, pdp_pb2.CACHE_LEVEL_NONE),
            notes="Redis URL on a closed port, local level off: evaluated, breaker open",
        ),
        Row(
            EMPTY_MODERATE, EMPTY, "Check", allow_tuple(), expect_decision(ALLOW),
            baseline=EMPTY_MODERATE, shape=MODERATE, family=EMPTY_CHECK,
            notes="the ceiling at moderate load: one request in flight",
        ),
        Row(
            CHECK_LOCAL_MODERATE, local_only, "Check",
            allow_tuple(), expect_decision(ALLOW), check_after=expect_cached(ALLOW, local),
            baseline=EMPTY_MODERATE, shape=MODERATE, family=CHECK_LOCAL,
            in_process=IN_PROCESS_HIT, notes="in-process hit latency, one request in flight",
        ),
        Row(
            CHECK_REDIS_MODERATE, redis_only, "Check",
            allow_tuple(), expect_decision(ALLOW), check_after=expect_cached(ALLOW, redis),
            baseline=EMPTY_MODERATE, shape=MODERATE, family=CHECK_REDIS,
            notes="Redis hit latency at moderate load (target: p99 < 2 ms)",
        ),
        Row(
            CHECK_UNCACHED_MODERATE, POLICY, "Check", allow_tuple(), expect_decision(ALLOW),
            baseline=EMPTY_MODERATE, shape=MODERATE, family=CHECK_UNCACHED,
            in_process=IN_PROCESS_UNCACHED, notes="uncached latency, one request in flight",
        ),
        Row(
            f"empty CheckBatch {BATCH_SIZE}", EMPTY, "CheckBatch", batch,
            expect_results(BATCH_SIZE), decisions_per_request=BATCH_SIZE,
            baseline=f"empty CheckBatch {BATCH_SIZE}",
            notes="EmptyServicer: one constant result per item",
        ),
        Row(
            BATCH_LOCAL, local_only,
            "CheckBatch", batch, expect_batch(batch_expected),
            check_after=expect_batch_cached(batch_expected, local),
            decisions_per_request=BATCH_SIZE, baseline=f"empty CheckBatch {BATCH_SIZE}",
            in_process=IN_PROCESS_BATCH_HITS,
            notes="100 distinct tuples, warmed: every item an in-process hit",
        ),
        Row(
            BATCH_UNCACHED, POLICY, "CheckBatch", batch,
            expect_batch(batch_expected), decisions_per_request=BATCH_SIZE,
            baseline=f"empty CheckBatch {BATCH_SIZE}", in_process=IN_PROCESS_BATCH_UNCACHED,
            notes="50 allow, 50 deny (org rule, user rule, application layer, org default); "
            "uncached",
        ),
        *audit_rows(batch, batch_expected),
        *quota_rows(),
        Row(
            EMPTY_TWO_WORKERS, ServerSpec("empty", workers=2), "Check", allow_tuple(),
            expect_decision(ALLOW), baseline=EMPTY_TWO_WORKERS,
            notes="the ceiling of 2 processes sharing the port (not pinned): each one's share",
        ),
        Row(
            CHECK_UNCACHED_TWO_WORKERS, ServerSpec("policy", env=CACHE_OFF, workers=2), "Check",
            allow_tuple(), expect_decision(ALLOW), baseline=EMPTY_TWO_WORKERS,
            in_process=IN_PROCESS_UNCACHED,
            notes="2 processes sharing the port (not pinned): each one's share of the decisions",
        ),
    ]  # fmt: skip


def audit_rows(batch: Message, batch_expected: Sequence[Expected]) -> list[Row]:
    """The cached and uncached Check and CheckBatch rows again with the audit log on, each
    compared with its audit-off row (`AUDIT_TARGET`)."""
    local, none = pdp_pb2.CACHE_LEVEL_LOCAL, pdp_pb2.CACHE_LEVEL_NONE
    return [
        Row(
            f"{CHECK_LOCAL}, audit on", ServerSpec("policy", env={**LOCAL_ONLY, **AUDIT_ON}),
            "Check", allow_tuple(), expect_decision(ALLOW), check_after=expect_cached(ALLOW, local),
            baseline=CHECK_LOCAL, notes="as its baseline, every decision also audited to a file",
        ),
        Row(
            f"{CHECK_UNCACHED}, audit on", ServerSpec("policy", env={**CACHE_OFF, **AUDIT_ON}),
            "Check", allow_tuple(), expect_decision(ALLOW),
            check_after=expect_cached(ALLOW, none), baseline=CHECK_UNCACHED,
            notes="as its baseline, every decision also audited to a file",
        ),
        Row(
            f"{BATCH_LOCAL}, audit on", ServerSpec("policy", env={**LOCAL_ONLY, **AUDIT_ON}),
            "CheckBatch", batch, expect_batch(batch_expected),
            check_after=expect_batch_cached(batch_expected, local),
            decisions_per_request=BATCH_SIZE, baseline=BATCH_LOCAL,
            notes="as its baseline, every item also audited to a file",
        ),
        Row(
            f"{BATCH_UNCACHED}, audit on", ServerSpec("policy", env={**CACHE_OFF, **AUDIT_ON}),
            "CheckBatch", batch, expect_batch(batch_expected),
            decisions_per_request=BATCH_SIZE, baseline=BATCH_UNCACHED,
            notes="as its baseline, every item also audited to a file",
        ),
    ]  # fmt: skip


def quota_rows() -> list[Row]:
    """The cached and uncached Check rows again with a quota counted in Redis (issue 14): the
    cost of the quota check, one round trip per call, each compared with its quota-free row."""
    local, none = pdp_pb2.CACHE_LEVEL_LOCAL, pdp_pb2.CACHE_LEVEL_NONE
    return [
        Row(
            CHECK_LOCAL_QUOTA,
            ServerSpec("policy", env={**LOCAL_ONLY, **QUOTA_IN_REDIS}, policy_files=(BENCH_QUOTA,)),
            "Check", allow_tuple(), expect_decision(ALLOW), check_after=expect_cached(ALLOW, local),
            baseline=CHECK_LOCAL,
            notes="as its baseline, every cached ALLOW also counted in a Redis quota counter",
        ),
        Row(
            CHECK_UNCACHED_QUOTA,
            ServerSpec("policy", env={**CACHE_OFF, **QUOTA_IN_REDIS}, policy_files=(BENCH_QUOTA,)),
            "Check", allow_tuple(), expect_decision(ALLOW),
            check_after=expect_cached(ALLOW, none), baseline=CHECK_UNCACHED,
            notes="as its baseline, every ALLOW also counted in a Redis quota counter",
        ),
    ]  # fmt: skip


def select(rows: Sequence[Row], names: Sequence[str]) -> list[Row]:
    """The named rows plus the baselines they are compared with, in table order."""
    by_name = {row.name: row for row in rows}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown row(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    wanted = set(names) | {by_name[n].baseline for n in names if by_name[n].baseline in by_name}
    return [row for row in rows if row.name in wanted]
