"""The scale benchmark's harness: its pieces, and a whole run at a tiny size against a real
server, h2load and real files (performance is never asserted, only that every figure is
measured and every answer checked)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policy_engine.bench import h2load, scale
from policy_engine.bench.scale import ScaleResult, SetSpec

needs_h2load = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")


def test_rss_and_cpu_time_of_a_process_come_from_proc() -> None:
    assert 1 < scale.rss_mb(os.getpid()) < 100_000
    before = scale.cpu_seconds(os.getpid())
    sum(range(2_000_000))
    assert scale.cpu_seconds(os.getpid()) >= before > 0


def test_wait_idle_sees_a_sleeping_process_idle_and_a_spinning_one_busy() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert scale.wait_idle(sleeper.pid, timeout_s=10) is not None
        assert scale.wait_idle(spinner.pid, timeout_s=1.0) is None
    finally:
        for process in (sleeper, spinner):
            process.kill()
            process.wait()


def test_pinned_commands_and_server_kind() -> None:
    assert scale.pinned(["h2load", "x"], None) == ["h2load", "x"]
    assert scale.pinned(["h2load", "x"], 1) == ["taskset", "-c", "1", "h2load", "x"]
    spec = scale.policy_server(0, {"A": "b"})
    command = spec.command("127.0.0.1:1", scale.ServerOptions(1, 4, Path("/p")))
    assert command[:3] == ["taskset", "-c", "0"]
    assert "serve" in command and "/p" in command
    assert scale.policy_server(None, {}).kind == "policy"


def test_sets_run_smallest_first_so_the_slow_ones_come_last() -> None:
    specs = scale.specs([50_000, 100, 10_000], ["distinct", "templated"], True, 1_000, 20)
    assert [(s.user_policies, s.organizations, s.variant) for s in specs] == [
        (100, 1, "distinct"),
        (100, 1, "templated"),
        (10_000, 1, "distinct"),
        (10_000, 1, "templated"),
        (20_000, 1_000, "distinct"),
        (20_000, 1_000, "templated"),
        (50_000, 1, "distinct"),
        (50_000, 1, "templated"),
    ]
    assert len(scale.specs([100], ["templated"], False, 1_000, 20)) == 1


def test_flags_are_checked() -> None:
    parser = scale.build_parser()
    args = parser.parse_args(["--sizes", "100,1_000", "--variants", "templated", "--orgs", "off"])
    assert args.sizes == [100, 1000] and args.variants == ["templated"] and args.orgs == "off"
    for bad in (["--sizes", "0"], ["--sizes", "ten"], ["--variants", "repeated"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert scale.main(["--duration-scale", "0"]) == 2


def _latency(p50: float) -> h2load.Latency:
    return h2load.Latency(100, 0, p50, p50 * 2, p50 * 3, p50, p50 * 3, 1000.0)


def _result(users: int, variant: str, rate: float, p50: float, **extra: object) -> ScaleResult:
    fields: dict[str, object] = {
        "rules": 2 * users + 8,
        "start_s": 2.0,
        "busy_s": 0.5,
        "req_per_s": rate,
        "load": _latency(p50 * 20),
        "single": _latency(p50),
        "edits_s": (0.3, 0.2),
        "rss_start_mb": 80.0,
        "rss_edits_mb": 82.0,
    }
    fields.update(extra)
    return ScaleResult(SetSpec(users, variant), **fields)  # type: ignore[arg-type]


def test_table_shows_timeouts_and_failures_and_targets_compare_with_the_small_set() -> None:
    results = [
        _result(100, "templated", 2000.0, 0.50),
        _result(10_000, "templated", 1900.0, 0.52, start_s=4.0, edits_s=(0.3, None)),
        ScaleResult(SetSpec(50_000, "distinct"), error="timeout: not SERVING within 300s"),
        ScaleResult(SetSpec(50_000, "templated"), error="before load: wrong answer: x | y"),
    ]
    table = scale.results_table(results, 300.0).splitlines()
    assert table[2].startswith("| 100 users, templated | 100 | 208 | 2.00 | 0.5 | 2,000 |")
    assert "| 0.30, timeout |" in table[3]
    assert "| 50,000 users, distinct | 50,000 | 0 | timeout |" in table[4]
    assert "FAILED: before load: wrong answer: x / y" in table[5]
    met = {t.name.split(": ", 1)[1]: t.met for t in scale.targets(results)}
    assert met == {
        "uncached req/s within 10% of 100": True,
        "p50 at 1 in flight within 10% of 100": True,
        "one-file edit to first new answer <= 0.5 s": False,
        "start to SERVING <= 3 s": False,
        "RSS <= 150 MB": True,
    }
    assert scale.targets(results[:1]) == []  # no 10,000 row: no targets


@needs_h2load
def test_a_tiny_run_measures_every_figure_with_a_real_server(tmp_path: Path) -> None:
    output = tmp_path / "scale.md"
    code = scale.main([
        "--sizes", "30", "--variants", "templated", "--orgs", "off",
        "--duration-scale", "0.05", "--processes", "2", "--streams", "2",
        "--start-timeout", "60", "--output", str(output), "--logs", str(tmp_path / "logs"),
        "--workdir", str(tmp_path),
    ])  # fmt: skip
    text = output.read_text()
    assert code == 0, text
    row = next(line for line in text.splitlines() if line.startswith("| 30 users, templated"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:3] == ["30", "68"]
    assert all(cells[3:]), row  # every figure measured
    assert "timeout" not in row and "FAILED" not in row
    assert len(cells[8].split(", ")) == 2  # both edits served
    assert (tmp_path / "logs" / "o1-u30-templated" / "server.log").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("pdp-scale-")] == []


@needs_h2load
def test_a_server_that_is_not_serving_in_time_is_reported_as_a_timeout(tmp_path: Path) -> None:
    output = tmp_path / "scale.md"
    code = scale.main([
        "--sizes", "10", "--variants", "distinct", "--orgs", "off", "--start-timeout", "0.01",
        "--output", str(output), "--logs", str(tmp_path / "logs"), "--workdir", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    assert "| 10 users, distinct | 10 | 28 | timeout |" in output.read_text()
