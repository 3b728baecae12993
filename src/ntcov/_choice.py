"""Parse a string or enum member into an enum, with an error that lists the choices."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def as_choice(kind: type[E], value: E | str, caller: str, name: str) -> E:
    """``kind(value)``, or a ``ValueError`` naming the caller, the argument and every choice."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in kind)
        raise ValueError(f"{caller}: unknown {name} {value!r}; choose one of {choices}.") from None
