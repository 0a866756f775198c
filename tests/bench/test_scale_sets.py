"""The scale benchmark's generated policy sets: written to real files, loaded by the real
loader, and deciding their probes and their edit as the benchmark expects."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from policy_engine.api import pdp_pb2
from policy_engine.bench import scale_sets
from policy_engine.bench.scale_sets import SetSpec, generate
from policy_engine.bench.workloads import decision_problems
from policy_engine.config import PolicyLimits, Settings
from policy_engine.engine import decide
from policy_engine.policy import load_policy_set
from policy_engine.server.convert import RequestConverter

CONVERTER = RequestConverter(Settings().limits)


def _answer(root: Path, request: pdp_pb2.CheckRequest) -> pdp_pb2.CheckResponse:
    """The in-process decision for a probe, as the response fields the checks read."""
    policies = load_policy_set(root, limits=PolicyLimits(max_set_bytes=64 * 1024 * 1024))
    domain, problems = CONVERTER.convert(request)
    assert not problems
    decision = decide(policies, domain, now=datetime.now(UTC))
    return pdp_pb2.CheckResponse(
        effect=pdp_pb2.Effect.Value(f"EFFECT_{decision.effect.name}"),
        reasons=[
            pdp_pb2.Reason(code=r.code.value, layer=pdp_pb2.Layer.Value(f"LAYER_{r.layer.name}"))
            for r in decision.reasons
        ],
    )


def _documents(root: Path) -> list[dict]:
    return [
        doc
        for path in sorted(root.rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def _conditions(root: Path, layer: str | None = None) -> list[str]:
    return [
        rule["condition"]
        for doc in _documents(root)
        if doc["kind"] == "Policy" and (layer is None or doc["layer"] == layer)
        for rule in doc["rules"]
        if "condition" in rule
    ]


SPECS = [
    SetSpec(12, "distinct"),
    SetSpec(12, "templated"),
    SetSpec(5, "distinct", organizations=3),
    SetSpec(5, "templated", organizations=3),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.slug)
def test_set_loads_and_its_probes_and_edit_get_the_expected_answers(
    spec: SetSpec, tmp_path: Path
) -> None:
    root = tmp_path / "policies"
    generated = generate(spec, root, probe_count=6)
    docs = _documents(root)
    assert generated.files == sum(1 for _ in root.rglob("*.yaml"))
    assert generated.bytes == sum(p.stat().st_size for p in root.rglob("*.yaml"))
    assert generated.rules == sum(len(d["rules"]) for d in docs if d["kind"] == "Policy")
    users = [d for d in docs if d["kind"] == "Policy" and d["name"].startswith("user-")]
    assert len(users) == spec.user_policies
    assert all(len(d["rules"]) == 2 for d in users)
    assert sum(d["kind"] == "Organization" for d in docs) == spec.organizations

    assert len({p.label.split()[0] for p in generated.probes}) == 6  # six different people
    assert {p.expected.effect for p in generated.probes} == {
        pdp_pb2.EFFECT_ALLOW,
        pdp_pb2.EFFECT_DENY,
    }
    for probe in generated.probes:
        assert decision_problems(_answer(root, probe.request), probe.expected) == [], probe.label

    edit = generated.edit
    assert edit.path.read_text() == edit.original
    assert edit.probe.label not in {p.label for p in generated.probes}
    assert decision_problems(_answer(root, edit.probe.request), edit.probe.expected) == []
    scale_sets.write_file(edit.path, edit.flipped)
    assert decision_problems(_answer(root, edit.probe.request), edit.after) == []
    assert decision_problems(_answer(root, edit.probe.request), edit.probe.expected) != []
    scale_sets.write_file(edit.path, edit.original)
    assert decision_problems(_answer(root, edit.probe.request), edit.probe.expected) == []
    assert not list(root.rglob(".*"))  # no temporary file left behind


def test_distinct_conditions_all_differ_and_templated_ones_repeat(tmp_path: Path) -> None:
    distinct = _conditions(generate(SetSpec(8, "distinct", 3), tmp_path / "d").root)
    assert len(distinct) == len(set(distinct))
    templated = generate(SetSpec(40, "templated"), tmp_path / "t").root
    user_texts = _conditions(templated, "user")
    assert len(user_texts) == 2 * 40 + 1  # two per person and the baseline's
    assert len(set(user_texts)) <= 6
    # The distinct variant still uses several shapes, not one text with other literals.
    shapes = {text.split('"')[0] for text in _conditions(tmp_path / "d", "user")}
    assert len(shapes) >= 4


def test_edit_changes_a_condition_text_not_seen_before(tmp_path: Path) -> None:
    for variant in scale_sets.VARIANTS:
        generated = generate(SetSpec(10, variant), tmp_path / variant)
        before = set(_conditions(generated.root))
        scale_sets.write_file(generated.edit.path, generated.edit.flipped)
        assert set(_conditions(generated.root)) - before  # a real compile, not a cache hit


def test_generate_refuses_a_non_empty_directory_and_bad_specs(tmp_path: Path) -> None:
    (tmp_path / "stale.yaml").write_text("kind: Policy\n")
    with pytest.raises(FileExistsError):
        generate(SetSpec(3, "templated"), tmp_path)
    with pytest.raises(ValueError):
        SetSpec(0, "distinct")
    with pytest.raises(ValueError):
        SetSpec(3, "repeated")  # type: ignore[arg-type]


@given(
    users=st.integers(1, 60_000),
    organizations=st.integers(1, 1_200),
    count=st.integers(1, 16),
)
def test_spread_picks_people_that_exist_all_different_and_never_the_edited_one(
    users: int, organizations: int, count: int
) -> None:
    spec = SetSpec(users, "templated", organizations)
    picks = scale_sets.spread(spec, count)
    assert len(picks) == count
    assert all(0 <= o < organizations and 0 <= i < users for o, i in picks)
    if spec.user_policies > 1:
        assert scale_sets.edit_person(spec) not in picks
    if spec.user_policies > count:
        assert len(set(picks)) == count
    if organizations > count or (organizations == count and users > 1):
        # Over organizations too, not all in the first one.
        assert len({o for o, _ in picks}) == count
