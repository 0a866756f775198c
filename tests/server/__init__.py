# Until it is fixed, importing policy_engine.policy before policy_engine.engine is a circular
# import (policy.compiled -> engine.codes -> engine/__init__ -> engine.engine -> policy.compiled).
# Importing the engine first keeps each server test module runnable on its own.
import policy_engine.engine  # noqa: F401
