"""Regex name mappings in FastVideo's convention.

A mapping is an ordered sequence of ``(pattern, target)``; the first pattern that matches a name (``re.match``)
rewrites it with ``re.sub``. A target is a replacement string, or ``(replacement, part_index, num_parts)``
when several checkpoint tensors merge into one parameter along the output dimension. A reverse mapping (for
export) may use a tuple of replacement strings: the parameter is split equally along the output dimension into
one tensor per name. Names no pattern matches map to themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MappedName", "NameMapper"]


@dataclass(frozen=True)
class MappedName:
    """A rewritten name; ``part``/``num_parts`` are set when the tensor is one slice of a merged parameter."""

    name: str
    part: int | None = None
    num_parts: int | None = None
    split: tuple[str, ...] | None = None


class NameMapper:
    """A compiled, ordered regex mapping."""

    def __init__(self, rules: Iterable[tuple[str, str | tuple]] = ()):
        self._rules: list[tuple[re.Pattern, str | tuple]] = []
        for pattern, target in rules:
            if isinstance(target, tuple) and not (_is_merge(target) or all(isinstance(t, str) for t in target)):
                raise ValueError(
                    f"mapping target for {pattern!r} must be a str, (str, index, total) or a tuple of str; got {target!r}"
                )
            self._rules.append((re.compile(pattern), target))

    def __call__(self, name: str) -> MappedName:
        for pattern, target in self._rules:
            if pattern.match(name):
                if isinstance(target, tuple) and _is_merge(target):
                    return MappedName(pattern.sub(target[0], name), target[1], target[2])
                if isinstance(target, tuple):
                    return MappedName(name, split=tuple(pattern.sub(t, name) for t in target))
                return MappedName(pattern.sub(target, name))
        return MappedName(name)


def _is_merge(target: tuple) -> bool:
    return (
        len(target) == 3
        and isinstance(target[0], str)
        and isinstance(target[1], int)
        and isinstance(target[2], int)
        and 0 <= target[1] < target[2]
    )
