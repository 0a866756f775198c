"""Strict JSON reading shared by the token checker and the CLI: an object may not name a key
twice (json.loads would silently keep the last of the two)."""

from __future__ import annotations

from typing import Any

from policy_engine.errors import PolicyEngineError


class DuplicateKeyError(PolicyEngineError, ValueError):
    """A JSON object names `key` more than once."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key!r} appears twice in one object")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An `object_pairs_hook` for json.loads: the object, or DuplicateKeyError."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise DuplicateKeyError(key)
        values[key] = value
    return values
