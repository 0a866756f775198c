"""Which request fields a compiled policy set's conditions can read: what replay may leave out
of the key under which it reuses a decision.

Only one question is answered, soundly and conservatively: can any rule's condition read
`context.session_id`? The engine itself reads the session ID nowhere but in validation (the
built-in checks, identity mappings and token checks read other fields), so when no condition
can read it, two requests that differ only in a session ID that passes validation get the
same decision (see `Replay` in `policy_engine.replay.replay`).
"""

from __future__ import annotations

from lark import Token, Tree

from policy_engine.cel import CelCompileError
from policy_engine.cel.compiler import _descend, _parse
from policy_engine.engine.activation import CEL_DECLARATIONS
from policy_engine.policy import CompiledPolicySet

CONTEXT = "context"
# The fields of `context` (see policy_engine.engine.activation) whose value never depends on
# the session ID: `context.<one of these>` reads nothing of it.
_SESSION_FREE = frozenset({"connection", "connected", "client_ip", "attributes"})


def may_read_session_id(source: str) -> bool:
    """Whether the CEL condition `source` may read `context.session_id`: False only when every
    occurrence of the name `context` in it is the operand of a plain field selection
    (`context.f`, or `.context.f`, parenthesized or not) of a field other than `session_id`
    (`connection`, `connected`, `client_ip`, `attributes`). Any other occurrence counts as
    reading the whole context: an index (`context["session_id"]`), `has(context.session_id)`,
    an optional selection (`context.?f`), a backquoted field, a method call on it, passing it
    whole (`[context]`, `string(context)`), and a comprehension or `cel.bind` variable named
    `context` (whose uses are not told apart from the variable's). True as well when the
    text does not parse (then it compiled nowhere: never the case for a loaded rule).
    """
    if CONTEXT not in source:  # an identifier is its own text: no escapes spell one
        return False
    try:
        tree = _parse(source)
    except (CelCompileError, RecursionError):
        return True
    pending: list[Tree | Token] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, Token):
            if node.value == CONTEXT:  # any other use of the name: the whole context
                return True
            continue
        if node.data == "member_dot":
            operand, field = node.children
            inner = _descend(operand)
            if inner.data in ("ident", "dot_ident") and inner.children[0] == CONTEXT:
                if (
                    isinstance(field, Token)
                    and field.type == "IDENT"
                    and field.value in _SESSION_FREE
                ):
                    continue  # `context.<session-free field>`: nothing else below it
                return True
        if node.data in ("member_dot", "member_dot_opt"):
            pending.append(node.children[0])  # `x.context` selects a field, named so
            continue
        pending.extend(node.children)
    return False


def organizations_reading_session_id(policies: CompiledPolicySet) -> frozenset[str]:
    """The organizations of `policies` with a rule (in any layer, any integration's bucket)
    whose condition may read `context.session_id` (`may_read_session_id`): a request is only
    ever decided by its own organization's rules. A condition that reads no `context` at all
    (the compiler's own record of the variables it resolved, which every read of a declared
    variable goes through) is not parsed again."""
    if CEL_DECLARATIONS.container:  # `x.context` could then name the variable too
        return frozenset(policies.organizations)
    verdicts: dict[int, bool] = {}  # by condition: shared conditions are parsed once
    readers = set()
    for name, organization in policies.organizations.items():
        for layer in organization.layers.values():
            for bucket in layer.by_integration.values():
                for rule in (*bucket.denies.rules, *bucket.allows.rules):
                    condition = rule.condition
                    if condition is None or CONTEXT not in condition.variables:
                        continue
                    verdict = verdicts.get(id(condition))
                    if verdict is None:
                        verdict = verdicts[id(condition)] = may_read_session_id(condition.source)
                    if verdict:
                        readers.add(name)
    return frozenset(readers)


def policies_may_read_session_id(policies: CompiledPolicySet) -> bool:
    """Whether any organization of `policies` has a rule that may read the session ID."""
    return bool(organizations_reading_session_id(policies))
