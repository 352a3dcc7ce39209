"""Errors the user can fix. The CLI prints them as one line each and exits 2."""

from __future__ import annotations

import re
from dataclasses import dataclass

EXIT_USAGE = 2

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a valid environment variable name


class UserError(Exception):
    """A problem with the user's input, reported as ``field: message`` without a traceback."""

    def __init__(self, message: str, field: str | None = None):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)


@dataclass(frozen=True)
class Problem:
    """One pre-flight finding: ``field`` is the recipe/profile key it is about."""

    severity: str  # "error" | "warning"
    field: str
    message: str
    fit: bool = False  # another layout, node count or cluster could fix it (else: the input itself is wrong)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"
