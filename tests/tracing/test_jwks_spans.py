"""A JWKS fetch is a CLIENT span of its own trace (it runs in the background, for every call
of the organization to come), naming the URL without its credentials or query; a failed fetch
is an error span, and the organization's calls are answered as without tracing. Real parts: a
JWKS endpoint on a real socket, a real gRPC server on an ephemeral port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from policy_engine.api import pdp_pb2
from policy_engine.auth.fetch import JwksFetcher
from policy_engine.tracing.otel import Tracing
from tests.auth.local_http import QuietHandler, serve
from tests.auth.material import jwks, rsa_key
from tests.cache.test_key_sets import policy_dir, with_token
from tests.store.support import wait_for
from tests.tracing.support import (
    CHECK_SPAN,
    Recorder,
    metadata,
    recording,
    serving,
    traced_settings,
)

KEY = rsa_key("current")


class Jwks:
    """A JWKS endpoint: `/jwks.json` answers the key set, anything else 404."""

    def __init__(self) -> None:
        self.document = jwks(KEY).encode()
        body = self.document

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/jwks.json":
                    self.head(404, {"Content-Length": "0"})
                    return
                self.head(200, {"Content-Length": str(len(body))})
                self.wfile.write(body)

        self.server, self.base = serve(Handler)
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp() -> Iterator[Jwks]:
    endpoint = Jwks()
    yield endpoint
    endpoint.close()


def _fetches(recorder: Recorder) -> list[ReadableSpan]:
    return [s for s in recorder.spans() if s.kind is SpanKind.CLIENT and s.name == "GET"]


def test_a_jwks_fetch_is_a_client_span_of_its_own_trace(tmp_path: Path, idp: Jwks) -> None:
    # Credentials and a query in the URL stay out of the span.
    url = f"http://reader:hunter2@127.0.0.1:{idp.port}/jwks.json?api_key=s3cret"
    root = policy_dir(tmp_path / "policies", url)
    with recording() as recorder, serving(traced_settings(policy_dir=root)) as (_running, stub):
        [fetch] = wait_for(lambda: _fetches(recorder), timeout=10, what="the JWKS fetch span")
        answer = stub.Check(with_token(KEY), metadata=metadata(), timeout=10)
        assert answer.effect == pdp_pb2.EFFECT_ALLOW
        [call] = recorder.wait_for_calls(CHECK_SPAN, 1)
    assert fetch.parent is None  # the load's background fetch: a trace of its own
    assert fetch.context.trace_id != call.context.trace_id
    assert dict(fetch.attributes or {}) == {
        "http.request.method": "GET",
        "url.full": f"http://127.0.0.1:{idp.port}/jwks.json",
        "server.address": "127.0.0.1",
        "server.port": idp.port,
        "http.response.body.size": len(idp.document),
    }
    assert fetch.status.status_code is StatusCode.UNSET
    assert "hunter2" not in str(fetch.to_json()) and "s3cret" not in str(fetch.to_json())


def test_a_failed_jwks_fetch_is_an_error_span_and_the_tokens_are_denied_as_ever(
    tmp_path: Path, idp: Jwks
) -> None:
    root = policy_dir(tmp_path / "policies", f"{idp.base}/missing.json")
    with recording() as recorder, serving(traced_settings(policy_dir=root)) as (_running, stub):
        [fetch] = wait_for(lambda: _fetches(recorder), timeout=10, what="the JWKS fetch span")
        answer = stub.Check(with_token(KEY), metadata=metadata(), timeout=10)
    assert fetch.status.status_code is StatusCode.ERROR
    assert "HTTP 404" in (fetch.status.description or "")
    assert [r.code for r in answer.reasons] == ["kontext_authorization_required"]


def test_a_fetch_started_inside_a_call_is_linked_to_it_not_parented(idp: Jwks) -> None:
    with recording() as recorder:
        tracing = Tracing(traced_settings(), provider=recorder.provider)
        fetcher = JwksFetcher()
        fetch = tracing.traced_fetch(fetcher.fetch)

        async def refresh_during_a_call() -> tuple[int, bytes]:
            with tracing.tracer.start_as_current_span("a call") as call:
                body = await fetch(f"{idp.base}/jwks.json", 5.0)
            await fetcher.aclose()
            return call.get_span_context().span_id, body

        call_id, body = asyncio.run(refresh_during_a_call())
    assert body == idp.document
    [fetched] = _fetches(recorder)
    assert fetched.parent is None
    assert [link.context.span_id for link in fetched.links] == [call_id]
