"""The benchmark's quota rows: a copy of the policy directory with a quota the rows' tuple
counts in (never exhausted by a run), counted in the harness's Redis."""

from __future__ import annotations

from pathlib import Path

from policy_engine.bench import workloads
from policy_engine.bench.server import REDIS_URL, ServerOptions
from policy_engine.policy import load_policy_set

REPOSITORY = Path(__file__).resolve().parents[2]


def test_quota_rows_serve_a_copy_with_a_quota_their_tuple_counts_in(tmp_path: Path) -> None:
    rows = {row.name: row for row in workloads.default_rows()}
    for name, baseline in (
        (workloads.CHECK_LOCAL_QUOTA, workloads.CHECK_LOCAL),
        (workloads.CHECK_UNCACHED_QUOTA, workloads.CHECK_UNCACHED),
    ):
        row = rows[name]
        assert row.baseline == baseline and row.baseline in rows
        assert row.server.needs_redis and row.server.env["PDP_QUOTA__REDIS_URL"] == REDIS_URL
        options = ServerOptions(1, None, REPOSITORY / "policies")
        served = row.server.with_policy_files(options, tmp_path / name.replace(" ", "-"))
        assert served.policy_dir != options.policy_dir
        assert not (options.policy_dir / "acme" / "bench-quota.yaml").exists()
        quotas = load_policy_set(served.policy_dir).organizations["acme"].quotas
        request = row.request
        charges = quotas.charges(
            request.subject.id, request.application.id, request.integration.id, request.scope
        )
        assert [c.spec.name for c in charges] == ["bench-github-per-person"]
        assert charges[0].spec.limit == 1_000_000_000


def test_rows_without_policy_files_serve_the_directory_as_it_is(tmp_path: Path) -> None:
    options = ServerOptions(1, None, REPOSITORY / "policies")
    row = {row.name: row for row in workloads.default_rows()}[workloads.CHECK_LOCAL]
    assert row.server.with_policy_files(options, tmp_path) is options
