"""Policy files: the model operators write, its loader, and the compiled set the engine uses."""

from policy_engine.policy.compiled import CompiledPolicySet
from policy_engine.policy.loader import PolicyLoadError, load_policy_set
from policy_engine.policy.parse import LoadIssue

__all__ = ["CompiledPolicySet", "LoadIssue", "PolicyLoadError", "load_policy_set"]
