"""Decisions as JSON-ready dicts, for the CLI and anything else that prints or stores them."""

from __future__ import annotations

from typing import Any

from policy_engine.domain.decision import Decision, reason_to_dict


def decision_to_dict(decision: Decision) -> dict[str, Any]:
    data: dict[str, Any] = {
        "decision": decision.effect.value,
        "reasons": [reason_to_dict(reason) for reason in decision.reasons],
        "policy_revision": decision.revision,
    }
    if decision.mapped_subject_id:  # an external user ID, decided as this person
        data["mapped_subject_id"] = decision.mapped_subject_id
    if decision.trace:
        data["explain"] = [
            {
                "layer": layer.layer.value,
                "effect": layer.effect.value,
                "by_default": layer.by_default,
                "rules": [
                    {
                        "policy": rule.policy,
                        "rule": rule.rule,
                        "effect": rule.effect.value,
                        "result": rule.result.value,
                        **({"detail": rule.detail} if rule.detail else {}),
                    }
                    for rule in layer.rules
                ],
            }
            for layer in decision.trace
        ]
    return data
