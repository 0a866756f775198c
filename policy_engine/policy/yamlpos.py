"""YAML loading that keeps line numbers, so every policy error can name file:line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


class PositionedDict(dict):  # type: ignore[type-arg]
    """A mapping that remembers the line of itself, of each key, and of each value's first line."""

    line: int
    key_lines: dict[str, int]
    value_lines: dict[str, int]
    block_scalar: dict[str, bool]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


@dataclass(frozen=True, slots=True)
class YamlDocument:
    value: Any
    line: int


class _PositionLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> PositionedDict:  # type: ignore[override]
        plain = super().construct_mapping(node, deep=deep)
        mapping = PositionedDict(plain)
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        mapping.value_lines = {}
        mapping.block_scalar = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                mapping.key_lines[key] = key_node.start_mark.line + 1
                mapping.value_lines[key] = value_node.start_mark.line + 1
                mapping.block_scalar[key] = getattr(value_node, "style", None) in ("|", ">")
        return mapping


_PositionLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _PositionLoader.construct_mapping,  # type: ignore[arg-type]
)


def load_documents(text: str) -> list[YamlDocument]:
    """Parse every document of a (multi-document) YAML text; raises yaml.YAMLError with a mark."""
    loader = _PositionLoader(text)
    documents: list[YamlDocument] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            documents.append(
                YamlDocument(loader.construct_document(node), node.start_mark.line + 1)
            )
    finally:
        loader.dispose()
    return documents


def error_line(error: yaml.YAMLError) -> int:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return mark.line + 1 if mark is not None else 1
