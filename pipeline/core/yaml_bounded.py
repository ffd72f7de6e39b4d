"""YAML for settings, bounded: aliases cannot expand a few hundred bytes into billions of values.

``yaml.safe_load`` builds an alias as a reference, so ``&a [x,x,...]`` nine levels deep loads at
once, but any code that walks the value (a type check's error message, a copy, a repr) expands it
to 9^9 items and hangs. Settings files and ``key=value`` overrides are read with ``load_yaml``:
the document may hold at most ``MAX_VALUES`` values once every alias is expanded (a full config
holds a few hundred), and may not nest deeper than ``MAX_DEPTH``; anything more is a one-line error.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.core.errors import UserError

MAX_VALUES = 10_000
MAX_DEPTH = 50


class YamlTooLarge(UserError):
    """A YAML document whose aliases expand too far, or that nests too deep."""


def _expanded(node: yaml.Node, memo: dict[int, int], active: set[int], depth: int) -> int:
    """Values in ``node`` with every alias expanded (shared nodes counted once per use)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise YamlTooLarge("an alias refers to a value that contains it (a recursive structure)")
    if depth > MAX_DEPTH:
        raise YamlTooLarge(f"nested more than {MAX_DEPTH} levels deep")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        count = 1 + sum(_expanded(child, memo, active, depth + 1) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        count = 1 + sum(_expanded(k, memo, active, depth + 1) + _expanded(v, memo, active, depth + 1)
                        for k, v in node.value)
    else:
        count = 1
    active.discard(key)
    if count > MAX_VALUES:
        raise YamlTooLarge(f"its aliases expand to more than {MAX_VALUES} values (an alias bomb?)")
    memo[key] = count
    return count


class _BoundedLoader(yaml.SafeLoader):
    def construct_document(self, node: yaml.Node) -> Any:
        _expanded(node, {}, set(), 0)
        return super().construct_document(node)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the bounds above (``YamlTooLarge``; ``yaml.YAMLError`` for bad syntax)."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise YamlTooLarge(f"nested more than {MAX_DEPTH} levels deep") from None
