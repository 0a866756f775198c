"""Property tests of the layer algebra over generated policy sets and requests."""

from __future__ import annotations

import random
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.domain.decision import POLICY_LAYERS, Effect
from policy_engine.engine import decide
from policy_engine.policy import CompiledPolicySet, load_policy_set
from tests.policy_builder import request, write_organization

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SCOPES = ["repo", "read:org", "admin:org", "delete_repo"]
INTEGRATIONS = ["github", "linear"]
CONDITIONS = [
    None,
    "true",
    "false",
    '"engineering" in subject.attributes.groups',  # errors when groups is missing
    'scope.startsWith("read")',
    "subject.attributes.level > 2",  # errors when level is missing
    'subject.id == "alice"',
]

rules = st.fixed_dictionaries(
    {
        "effect": st.sampled_from(["allow", "deny"]),
        "condition": st.sampled_from(CONDITIONS),
        "scopes": st.sampled_from([None, ["*"], ["read:*"], ["repo", "delete_repo"]]),
    }
)
policies = st.lists(
    st.fixed_dictionaries(
        {
            "layer": st.sampled_from(["org", "user", "application"]),
            "integrations": st.sampled_from([None, ["github"], ["*"]]),
            "rules": st.lists(rules, min_size=1, max_size=3),
        }
    ),
    max_size=6,
)
defaults = st.fixed_dictionaries(
    {layer.value: st.sampled_from(["allow", "deny"]) for layer in POLICY_LAYERS}
)
requests = st.fixed_dictionaries(
    {
        "scope": st.sampled_from(SCOPES),
        "integration": st.sampled_from(INTEGRATIONS),
        "subject": st.sampled_from(["alice", "bob"]),
        "attributes": st.sampled_from(
            [{}, {"groups": ["engineering"]}, {"level": 3}, {"groups": ["sales"], "level": 1}]
        ),
    }
)


def to_policy_documents(generated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    documents = []
    for index, policy in enumerate(generated):
        target: dict[str, Any] = {}
        if policy["layer"] == "user":
            target["subjects"] = ["*"]
        if policy["layer"] == "application":
            target["applications"] = ["*"]
        if policy["integrations"]:
            target["integrations"] = policy["integrations"]
        rule_documents = []
        for rule_index, rule in enumerate(policy["rules"]):
            document: dict[str, Any] = {"name": f"r{rule_index}", "effect": rule["effect"]}
            if rule["condition"]:
                document["condition"] = rule["condition"]
            if rule["scopes"]:
                document["target"] = {"scopes": rule["scopes"]}
            rule_documents.append(document)
        documents.append(
            {
                "name": f"p{index}",
                "layer": policy["layer"],
                "target": target,
                "rules": rule_documents,
            }
        )
    return documents


def load(documents: list[dict[str, Any]], layer_defaults: dict[str, str]) -> CompiledPolicySet:
    with tempfile.TemporaryDirectory() as folder:
        write_organization(Path(folder), "acme", defaults=layer_defaults, policies=documents)
        return load_policy_set(Path(folder))


def decide_one(policy_set: CompiledPolicySet, r: dict[str, Any], explain: bool = False):
    generated = request(
        r["scope"],
        subject=r["subject"],
        integration=r["integration"],
        explain=explain,
        **r["attributes"],
    )
    return decide(policy_set, generated, now=NOW)


def decide_all(
    policy_set: CompiledPolicySet, generated_requests: list[dict[str, Any]], explain: bool = False
) -> list[tuple[Effect, frozenset]]:
    return [
        (decision.effect, frozenset(decision.reasons))
        for decision in (decide_one(policy_set, r, explain) for r in generated_requests)
    ]


PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(
    policies,
    defaults,
    st.lists(requests, min_size=1, max_size=4),
    rules,
    st.sampled_from(["org", "user", "application"]),
)
def test_adding_a_deny_rule_never_turns_a_deny_into_an_allow(
    generated, layer_defaults, reqs, extra, layer
) -> None:
    documents = to_policy_documents(generated)
    before = decide_all(load(documents, layer_defaults), reqs)
    extra_policy = to_policy_documents(
        [{"layer": layer, "integrations": None, "rules": [{**extra, "effect": "deny"}]}]
    )[0]
    extra_policy["name"] = "extra-deny"
    after = decide_all(load([*documents, extra_policy], layer_defaults), reqs)
    for (effect_before, _), (effect_after, _) in zip(before, after, strict=True):
        if effect_before is Effect.DENY:
            assert effect_after is Effect.DENY


@PROPERTY_SETTINGS
@given(policies, defaults, st.lists(requests, min_size=1, max_size=4), st.randoms())
def test_reordering_files_and_rules_never_changes_a_decision(
    generated, layer_defaults, reqs, rng: random.Random
) -> None:
    documents = to_policy_documents(generated)
    shuffled = [
        {**doc, "rules": rng.sample(doc["rules"], len(doc["rules"]))}
        for doc in rng.sample(documents, len(documents))
    ]
    # File names follow list order, so shuffling the list reorders the files on disk too.
    assert decide_all(load(documents, layer_defaults), reqs) == decide_all(
        load(shuffled, layer_defaults), reqs
    )


@PROPERTY_SETTINGS
@given(policies, defaults, st.lists(requests, min_size=1, max_size=4))
def test_allowed_exactly_when_every_layer_allows(generated, layer_defaults, reqs) -> None:
    policy_set = load(to_policy_documents(generated), layer_defaults)
    for r in reqs:
        decision = decide_one(policy_set, r, explain=True)
        layer_effects = [layer.effect for layer in decision.trace]
        assert len(layer_effects) == 3
        assert (decision.effect is Effect.ALLOW) == all(e is Effect.ALLOW for e in layer_effects)
        assert (decision.effect is Effect.ALLOW) == (decision.reasons == ())


@PROPERTY_SETTINGS
@given(policies, defaults, st.lists(requests, min_size=1, max_size=4))
def test_an_erroring_condition_never_allows(generated, layer_defaults, reqs) -> None:
    """Swap every condition for one that always errors: no request may become allowed."""
    documents = to_policy_documents(generated)
    before = decide_all(load(documents, layer_defaults), reqs)
    broken = [
        {
            **doc,
            "rules": [
                {**rule, "condition": "subject.attributes.missing == 1"} for rule in doc["rules"]
            ],
        }
        for doc in documents
    ]
    after = decide_all(load(broken, layer_defaults), reqs)
    for (effect_before, _), (effect_after, _) in zip(before, after, strict=True):
        if effect_before is Effect.DENY:
            assert effect_after is Effect.DENY


@PROPERTY_SETTINGS
@given(policies, policies, defaults, st.lists(requests, min_size=1, max_size=4))
def test_another_organization_never_changes_a_decision(
    generated, other, layer_defaults, reqs
) -> None:
    documents = to_policy_documents(generated)
    alone = decide_all(load(documents, layer_defaults), reqs)
    with tempfile.TemporaryDirectory() as folder:
        write_organization(Path(folder), "acme", defaults=layer_defaults, policies=documents)
        write_organization(Path(folder), "globex", policies=to_policy_documents(other))
        together = decide_all(load_policy_set(Path(folder)), reqs)
    assert alone == together


@PROPERTY_SETTINGS
@given(policies, defaults, st.lists(requests, min_size=1, max_size=4))
def test_explain_never_changes_a_decision(generated, layer_defaults, reqs) -> None:
    policy_set = load(to_policy_documents(generated), layer_defaults)
    assert decide_all(policy_set, reqs) == decide_all(policy_set, reqs, explain=True)
