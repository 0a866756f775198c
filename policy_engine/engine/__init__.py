"""The pure decision engine and the request/decision values it works on."""

from policy_engine.engine.engine import decide

__all__ = ["decide"]
