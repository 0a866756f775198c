"""Cache keys: canonical over attribute order, sensitive to everything a decision reads."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.api import pdp_pb2
from policy_engine.cache import KeyBuilder, settings_fingerprint
from policy_engine.config import RequestLimits, Settings
from policy_engine.server.service import answer_fingerprint
from tests.cache.support import tuple_request

KEYS = KeyBuilder("pdp:v1", settings_fingerprint(("test",)))
REV = "f83dc3a871e81b3d"


def _struct(items: list[tuple[str, Any]]) -> struct_pb2.Struct:
    """A Struct whose entries are inserted in exactly this order."""
    s = struct_pb2.Struct()
    for k, v in items:
        s.update({k: v})
    return s


def _rich(order: list[int]) -> pdp_pb2.CheckRequest:
    """A request with attributes at every level, inserted in the given order."""
    subject_attrs = [
        ("groups", ["engineering", "oncall"]),
        ("email_domain", "acme.example"),
        ("level", 3),
        ("manager", {"id": "carol", "flags": {"a": True, "b": False, "c": None}}),
    ]
    context_attrs = [("ticket", "OPS-1"), ("risk", 0.25), ("tags", {"x": 1, "y": 2, "z": 3})]
    msg = pdp_pb2.CheckRequest(
        organization="acme",
        subject=pdp_pb2.Subject(
            id="alice",
            kind=pdp_pb2.SUBJECT_KIND_USER,
            attributes=_struct([subject_attrs[i] for i in order]),
        ),
        application=pdp_pb2.Application(
            id="pr-reviewer",
            attributes=_struct([("owner", "dev"), ("tier", 1)][:: 1 - 2 * (order[0] % 2)]),
        ),
        integration=pdp_pb2.Integration(id="github"),
        scope="repo",
        context=pdp_pb2.RequestContext(
            connection=pdp_pb2.CONNECTION_STATE_ACTIVE,
            client_ip="10.0.0.1",
            session_id="s-1",
            attributes=_struct([context_attrs[i] for i in order if i < 3]),
        ),
    )
    return msg


def test_attribute_order_never_changes_the_key() -> None:
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]]
    messages = [_rich(order) for order in orders]
    assert all(m == messages[0] for m in messages)
    assert len({KEYS.key(m, REV) for m in messages}) == 1


def _from_wire(entries: list[tuple[str, Any]]) -> pdp_pb2.CheckRequest:
    """A request parsed from bytes whose attribute map entries come in exactly this order.

    Concatenated encodings merge, so one single-entry encoding per attribute gives a wire
    order the test controls, whatever order a serializer would have picked.
    """
    wire = tuple_request().SerializeToString()
    for key, value in entries:
        part = pdp_pb2.CheckRequest()
        part.subject.attributes.update({key: value})
        part.context.attributes.update({key: value})
        wire += part.SerializeToString()
    return pdp_pb2.CheckRequest.FromString(wire)


def test_attribute_order_on_the_wire_never_changes_the_key() -> None:
    entries = [("groups", ["engineering"]), ("level", 3), ("email", "a@acme.example"), ("x", True)]
    forward, backward = _from_wire(entries), _from_wire(entries[::-1])
    assert forward == backward  # the same request ...
    assert KEYS.key(forward, REV) == KEYS.key(backward, REV)  # ... hence the same key


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.integers(-1000, 1000), st.text(max_size=6), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    st.randoms(),
)
def test_any_insertion_order_gives_one_key(attrs: dict[str, Any], rnd: random.Random) -> None:
    items = list(attrs.items())
    shuffled = items[:]
    rnd.shuffle(shuffled)
    a, b = tuple_request(), tuple_request()
    a.subject.attributes.CopyFrom(_struct(items))
    b.subject.attributes.CopyFrom(_struct(shuffled))
    assert KEYS.key(a, REV) == KEYS.key(b, REV)


MUTATIONS: dict[str, Callable[[pdp_pb2.CheckRequest], None]] = {
    "organization": lambda m: setattr(m, "organization", "globex"),
    "subject.id": lambda m: setattr(m.subject, "id", "bob"),
    "subject.kind": lambda m: setattr(m.subject, "kind", pdp_pb2.SUBJECT_KIND_SERVICE_ACCOUNT),
    "subject.attributes value": lambda m: m.subject.attributes.update({"groups": ["sales"]}),
    "subject.attributes list order": lambda m: m.subject.attributes.update(
        {"groups": ["oncall", "engineering"]}
    ),
    "subject.attributes added": lambda m: m.subject.attributes.update({"x": 1}),
    "subject.attributes type": lambda m: m.subject.attributes.update({"level": "3"}),
    "subject.access_token": lambda m: setattr(m.subject, "access_token", "a.b.c"),
    "application.id": lambda m: setattr(m.application, "id", "standup-bot"),
    "application.attributes": lambda m: m.application.attributes.update({"owner": "x"}),
    "integration.id": lambda m: setattr(m.integration, "id", "linear"),
    "integration.attributes": lambda m: m.integration.attributes.update({"region": "eu"}),
    "scope": lambda m: setattr(m, "scope", "read:org"),
    "context.connection": lambda m: setattr(
        m.context, "connection", pdp_pb2.CONNECTION_STATE_ABSENT
    ),
    "context.client_ip": lambda m: setattr(m.context, "client_ip", "10.0.0.2"),
    "context.session_id": lambda m: setattr(m.context, "session_id", "s-2"),
    "context.attributes": lambda m: m.context.attributes.update({"ticket": "OPS-2"}),
    "nested attribute": lambda m: m.subject.attributes.update(
        {"manager": {"id": "carol", "flags": {"a": True, "b": True, "c": None}}}
    ),
}


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_any_change_to_what_a_decision_reads_changes_the_key(field: str) -> None:
    base = _rich([0, 1, 2, 3])
    changed = _rich([0, 1, 2, 3])
    MUTATIONS[field](changed)
    assert changed != base
    assert KEYS.key(changed, REV) != KEYS.key(base, REV)


def test_request_id_explain_and_time_are_not_in_the_key_and_are_restored() -> None:
    base = _rich([0, 1, 2, 3])
    other = _rich([0, 1, 2, 3])
    other.request_id = "req-42"
    other.explain = True
    other.context.time.seconds = 1_700_000_000
    snapshot = other.SerializeToString()
    assert KEYS.key(other, REV) == KEYS.key(base, REV)
    assert other.SerializeToString() == snapshot  # the caller's message is intact
    zero_time = _rich([0, 1, 2, 3])
    zero_time.context.time.SetInParent()  # present, all zeros
    assert KEYS.key(zero_time, REV) == KEYS.key(base, REV)
    assert zero_time.context.HasField("time")


def test_a_token_with_a_broker_time_is_not_cacheable() -> None:
    msg = tuple_request()
    msg.subject.access_token = "a.b.c"
    assert KEYS.key(msg, REV) is not None
    msg.context.time.seconds = 1_700_000_000
    assert KEYS.key(msg, REV) is None


def test_the_revision_is_in_the_key() -> None:
    msg = tuple_request()
    a, b = KEYS.key(msg, "aaaa"), KEYS.key(msg, "bbbb")
    assert a != b
    assert a is not None and a.startswith("pdp:v1:aaaa:")
    assert b is not None and b.startswith("pdp:v1:bbbb:")


def test_settings_that_shape_answers_salt_the_key() -> None:
    msg = tuple_request()
    base = Settings()
    variants = [
        base,
        base.replace(docs_base_url="https://docs.other.example"),
        base.replace(limits=RequestLimits(max_scope_length=64)),
    ]
    keys = {KeyBuilder("pdp:v1", answer_fingerprint(s)).key(msg, REV) for s in variants}
    assert len(keys) == len(variants)
    # ... and nothing else does: the same settings always give the same key.
    assert KeyBuilder("pdp:v1", answer_fingerprint(Settings())).key(msg, REV) in keys


def test_batch_keys_equal_single_keys() -> None:
    plain = _rich([0, 1, 2, 3])
    with_id = _rich([3, 2, 1, 0])
    with_id.request_id = "r-9"
    timed = _rich([1, 0, 2, 3])
    timed.context.time.seconds = 5
    explain = tuple_request(explain=True)
    items = pdp_pb2.CheckBatchRequest(items=[plain, with_id, timed, explain]).items
    keys = KEYS.keys(items, REV)
    assert keys[:3] == [KEYS.key(m, REV) for m in (plain, with_id, timed)]
    assert keys[0] == keys[1] == keys[2]
    assert keys[3] is None  # explain requests bypass the cache
    assert items[1].request_id == "r-9" and items[2].context.time.seconds == 5


def test_an_external_users_namespace_is_part_of_the_key() -> None:
    # The same external ID in two namespaces may be two people: never one cached answer.
    base = tuple_request(subject_id="partner-user-123")
    base.subject.kind = pdp_pb2.SUBJECT_KIND_EXTERNAL_USER
    keys = set()
    for namespace in ("", "partner-portal", "second-issuer"):
        message = pdp_pb2.CheckRequest()
        message.CopyFrom(base)
        message.subject.namespace = namespace
        keys.add(KEYS.key(message, REV))
    assert len(keys) == 3
