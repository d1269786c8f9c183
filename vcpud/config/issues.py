"""Positioned config errors: where (Position), what (ConfigIssue), and how they travel.

A converter that finds a problem raises :class:`Invalid` carrying the positioned issues; the
value it was converting is then unusable. A :class:`Batch` collects them at the points where
loading goes on with the next field, policy or file, so one run reports every issue, and a
:class:`ConfigError` hands them all to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Position:
    """A place in a config file; line and column count from 1, like compilers do."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NOWHERE = Position("<unknown>", 0, 0)


@dataclass(frozen=True)
class ConfigIssue:
    pos: Position
    message: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.pos}: {self.message}"


class ConfigError(Exception):
    """Everything wrong with a config, one issue per line when printed."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.issues,))


class Invalid(Exception):
    """A value that cannot be used, with the issues saying why.

    No issues means they were reported elsewhere (an unsupported YAML tag, a broken pool
    that a policy names): the value is unusable but there is nothing more to say.
    """

    def __init__(self, *issues: ConfigIssue) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class Batch:
    """Issues of one value's parts, gathered so that the parts after a bad one are still checked."""

    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self.failed = False  # an Invalid was caught, even one without issues of its own

    def add(self, *issues: ConfigIssue) -> None:
        self.issues.extend(issues)

    def catch(self) -> _Catch:
        """``with batch.catch(): ...`` runs the block; an Invalid it raises is recorded here and ends the block."""
        return _Catch(self)

    def check(self) -> None:
        """Raise :class:`Invalid` with everything gathered, if any part was bad."""
        if self.issues or self.failed:
            raise Invalid(*self.issues)


class _Catch:
    """The context manager of :meth:`Batch.catch` (a class, so type checkers see that it swallows)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> bool:
        if not isinstance(value, Invalid):
            return False
        self.batch.failed = True
        self.batch.issues.extend(value.issues)
        return True
