"""What the decision path logs: identifiers as fields (JSON keys with `log_format: json`),
never pasted into the message; and the one warning about the retired `threads` setting."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from policy_engine.config import Settings
from policy_engine.decision import Decider, ServerError
from policy_engine.logs import make_formatter
from policy_engine.server import service
from policy_engine.server.service import build_decider
from tests.cache.support import BASE, settings, tuple_request

PIPELINE_LOGGER = "policy_engine.server.service"  # the decision path's logger


class Unusable:
    """A "policy set" the engine cannot use: every decision fails (a bug's stand-in)."""

    revision = "r1"
    key_sets: dict[str, Any] = {}


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The decision path's records, as `log_format: json` writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter("json"))
    logger = logging.getLogger(PIPELINE_LOGGER)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_failed_decision_logs_its_ids_as_fields(json_log: io.StringIO) -> None:
    decider = Decider(lambda: Unusable(), BASE, cache=None)  # type: ignore[arg-type,return-value]
    decisions = decider.decide_sync([tuple_request(request_id="req-7")])
    (outcome,) = decisions.outcomes
    assert type(outcome) is ServerError  # denied, never an error to the caller
    (record,) = [r for r in _records(json_log) if r["message"].startswith("decision failed")]
    assert record["request_id"] == "req-7"
    assert record["decision_id"] == decisions.only().decision_id == outcome.decision_id.decode()
    assert record["level"] == "ERROR" and "Traceback" in record["exc_info"]
    assert "req-7" not in record["message"] and record["decision_id"] not in record["message"]


class Keyless:
    """A "policy set" without key sets: the cache cannot key any request (a bug's stand-in)."""

    revision = "r1"


def test_a_whole_call_that_fails_logs_every_id(json_log: io.StringIO) -> None:
    decider = Decider(lambda: Keyless(), settings())  # type: ignore[arg-type,return-value]
    items = [tuple_request(request_id="a"), tuple_request("bob", request_id="b")]
    decisions = decider.decide_sync(items)
    (record,) = [r for r in _records(json_log) if r["message"].startswith("decision cache")]
    assert record["request_ids"] == ["a", "b"]
    assert record["decision_ids"] == [r.decision_id for r in decisions.batch().results]


def test_the_retired_threads_setting_is_warned_about_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_threads_warned", False)
    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        build_decider(lambda: Unusable(), Settings(), cache=None)  # type: ignore[arg-type,return-value]
        assert not caplog.records  # the default: nothing to say
        for _ in range(3):
            build_decider(lambda: Unusable(), Settings(threads=8), cache=None)  # type: ignore[arg-type,return-value]
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert "setting threads (8) is ignored" in warning.getMessage()
