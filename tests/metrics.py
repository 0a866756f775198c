"""Reading the process's Prometheus metrics in tests (the registry the server counts in)."""

from __future__ import annotations

from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    """One sample's value (0.0 when it has not been counted yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def decisions_total() -> float:
    """pdp_decisions_total over every effect and code."""
    return sum(
        metric_sample.value
        for metric in REGISTRY.collect()
        if metric.name == "pdp_decisions"
        for metric_sample in metric.samples
        if metric_sample.name == "pdp_decisions_total"
    )
