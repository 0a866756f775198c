"""Policy test suites (`pdp test`): cases beside the policies, run as `pdp eval` decides, with
rule coverage. See README, Policy tests."""

from policy_engine.testing.runner import Coverage, Outcome, find_suites, run_suites
from policy_engine.testing.suite import Suite, SuiteError

__all__ = ["Coverage", "Outcome", "Suite", "SuiteError", "find_suites", "run_suites"]
