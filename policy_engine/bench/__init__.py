"""The benchmark harness: `python -m policy_engine.bench` (or `make bench`).

Each workload row starts its own server subprocess, checks one real gRPC answer is what the
row expects, warms up, then drives load with h2load and reads latencies from h2load's log.
Rows are data (see `workloads.ROWS`), so new configurations are added as rows, not code.
"""
