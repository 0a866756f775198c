"""`python -m policy_engine.replay.bench`: `pdp replay`'s records per second, in-process.

`generate FILE --records N` writes an audit log of N decisions the shipped example policies
(policies/: acme and globex) made, through the real audit writer: varied subjects (groups,
kinds), applications, integrations and scopes (some outside the catalog), client IPs and
sessions, some context times and attributes, some subject tokens (acme reads them unverified,
so their claims are recorded), spread over a week so working-hours rules go both ways. With
`--distinct`, every record carries its own session ID: no two records share their inputs (the
worst case for replay's reuse of decisions); without it, people keep a session for a while, as
a broker's traffic does.

`run FILE [--runs K] [--policies DIR]` replays the log against policies/ (or DIR) K times and
prints each run's records per second, by wall clock and by this process's CPU time (the
steadier figure on a shared machine), and their medians. A candidate with a rule that reads
`context.session_id` makes replay key decisions by the session ID too (see
`policy_engine.replay.reads`): against it, a `--distinct` log reuses no decision at all.
Pin it to one core for issue 13's figure:
`taskset -c 1 .venv/bin/python -m policy_engine.replay.bench run audit.jsonl --runs 5`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from policy_engine.audit.writer import AuditLog
from policy_engine.config import AuditSettings
from policy_engine.domain.request import (
    CheckRequest,
    ConnectionState,
    RequestContext,
    Resource,
    Subject,
    SubjectKind,
)
from policy_engine.engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from policy_engine.replay.replay import replay_files

POLICIES = Path(__file__).resolve().parents[2] / "policies"
START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
WEEK_SECONDS = 7 * 24 * 3600
GROUPS = ("engineering", "sales", "finance", "support")
# organization -> (applications, integrations, scopes); one of each is outside the catalog.
TUPLES = {
    "acme": (
        ("pr-reviewer", "standup-bot", "billing-agent", "unknown-app"),
        ("github", "linear", "slack", "stripe", "jira"),
        ("repo", "read:org", "delete_repo", "admin:org", "chat:write", "admin", "issues:write"),
    ),
    "globex": (
        ("billing-agent", "support-copilot", "release-bot", "unknown-app"),
        ("stripe", "github", "slack", "salesforce", "jira"),
        ("read:charges", "write:refunds", "write:api_keys", "repo", "write:packages", "chat"),
    ),
}
# A key for the bench's subject tokens only (acme reads tokens unverified).
_CONNECTIONS = (ConnectionState.ACTIVE, ConnectionState.UNKNOWN, ConnectionState.ABSENT)
_TOKEN_KEY = "replay-bench-not-a-secret-0123456789abcdef"


@dataclass(frozen=True)
class Person:
    """One subject of the bench's traffic: its organization and the tuples its agents use."""

    id: str
    kind: SubjectKind
    attributes: dict[str, object]
    organization: str
    tuples: tuple[tuple[str, str, str], ...]  # (application, integration, scope)


def _people(rng: random.Random, count: int) -> list[Person]:
    people = []
    for number in range(count):
        kind = rng.choices(
            (SubjectKind.USER, SubjectKind.EXTERNAL_USER, SubjectKind.SERVICE_ACCOUNT),
            (90, 8, 2),
        )[0]
        groups = rng.sample(GROUPS, rng.choice((0, 1, 1, 1, 2)))
        attributes: dict[str, object] = {"groups": groups, "email": f"u{number}@example.com"}
        if rng.random() < 0.2:
            attributes["level"] = rng.randint(1, 9)
        organization = rng.choice(("acme", "globex"))
        applications, integrations, scopes = TUPLES[organization]
        tuples = tuple(
            (rng.choice(applications), rng.choice(integrations), rng.choice(scopes))
            for _ in range(rng.randint(1, 5))
        )
        people.append(Person(f"u{number:05d}", kind, attributes, organization, tuples))
    return people


def requests(count: int, *, seed: int = 13, distinct: bool = False) -> Iterator[
    tuple[CheckRequest, datetime]
]:  # fmt: skip
    """`count` (request, decision time) pairs, in time order, reproducible from `seed`.

    Each person's agents use a few tuples of one organization, in sessions of 20 to 200 calls
    from one client IP; about 1 in 10 requests names its own context time, 1 in 10 of acme's
    carries a subject token (one per session), 3 in 10 of globex's a credential counter.
    """
    rng = random.Random(seed)
    people = _people(rng, 2000)
    # person -> (session ID, client IP, token, calls left in the session)
    sessions: dict[str, tuple[str, str, str, int]] = {}
    for number in range(count):
        at = START + timedelta(seconds=WEEK_SECONDS * number / count)
        person = rng.choice(people)
        session, ip, token, left = sessions.get(person.id, ("", "", "", 0))
        if left <= 0:
            ip = rng.choice((f"10.20.{rng.randint(0, 3)}.{rng.randint(1, 50)}", "203.0.113.7"))
            session, left, token = f"s-{person.id}-{number}", rng.randint(20, 200), ""
            if person.organization == "acme" and rng.random() < 0.1:
                iat = int(at.timestamp()) - 60  # valid all week, from a minute ago
                claims = {"sub": person.id, "groups": person.attributes["groups"], "iat": iat}
                claims["exp"] = iat + WEEK_SECONDS
                token = jwt.encode(claims, _TOKEN_KEY, algorithm="HS256")
        sessions[person.id] = (session, ip, token, left - 1)
        context_attributes: dict[str, object] = {}
        if person.organization == "globex" and rng.random() < 0.3:
            context_attributes["credentials_issued_today"] = rng.choice((3, 120, 499, 500, 640))
        application, integration, scope = rng.choice(person.tuples)
        request = CheckRequest(
            organization=person.organization,
            subject=Subject(person.id, person.kind, person.attributes, token),
            application=Resource(application),
            integration=Resource(integration),
            scope=scope,
            context=RequestContext(
                connection=rng.choices(_CONNECTIONS, (90, 7, 3))[0],
                client_ip=ip,
                time=at - timedelta(minutes=rng.randint(0, 600)) if rng.random() < 0.1 else None,
                session_id=f"{session}-{number}" if distinct else session,
                attributes=context_attributes,
            ),
            request_id=f"r{number}",
        )
        yield request, at


def generate(path: Path, count: int, policies: CompiledPolicySet, *, distinct: bool) -> None:
    """Write `count` decisions of `policies` to the audit log `path` (replaced if present)."""
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    settings = AuditSettings(
        enabled=True,
        file_path=path,
        queue_size=10_000,
        file_max_bytes=0,
        checkpoint_every=10_000,
        checkpoint_seconds=0,
    )
    audit = AuditLog(settings)
    audit.start()
    for number, (request, at) in enumerate(requests(count, distinct=distinct)):
        decision = decide(policies, request, now=at)
        audit.record(request, decision, decision_id=f"d{number:08d}", at=at.timestamp())
    if not audit.close(timeout=600):
        raise RuntimeError("the audit writer did not drain")


def run(path: Path, policies: CompiledPolicySet) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, decision records) of one replay of `path`
    against `policies`. On a shared machine the CPU time is the steadier figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    report = replay_files([path], policies)
    return time.perf_counter() - wall, time.process_time() - cpu, report.decisions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="write a bench audit log")
    make.add_argument("file", type=Path)
    make.add_argument("--records", type=int, default=200_000)
    make.add_argument("--distinct", action="store_true", help="no two records share inputs")
    measure = commands.add_parser("run", help="replay a log, print records/s")
    measure.add_argument("file", type=Path)
    measure.add_argument("--runs", type=int, default=3)
    measure.add_argument(
        "--policies", type=Path, default=POLICIES, help="the candidate (default: policies/)"
    )
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(args.file, args.records, load_policy_set(POLICIES), distinct=args.distinct)
        return
    policies = load_policy_set(args.policies)
    rates, cpu_rates = [], []
    for _ in range(args.runs):
        wall, cpu, records = run(args.file, policies)
        rates.append(records / wall)
        cpu_rates.append(records / cpu)
        print(f"{records} records: {records / wall:,.0f}/s wall, {records / cpu:,.0f}/s CPU")
    print(
        f"median {statistics.median(rates):,.0f} records/s wall, "
        f"{statistics.median(cpu_rates):,.0f} records/s per CPU second"
    )


if __name__ == "__main__":
    main()
