"""Errors the user can fix. The CLI prints them as one line each and exits 2."""

from __future__ import annotations

import re
from dataclasses import dataclass

EXIT_USAGE = 2

# Characters that never belong in a config string: newlines and other control characters break the
# one-line-per-value formats (YAML scalars, #SBATCH lines, environment variables) that values end up in.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a valid environment variable name
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class UserError(Exception):
    """A problem with the user's input, reported as ``field: message`` without a traceback."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


@dataclass(frozen=True)
class Problem:
    """One pre-flight finding: ``field`` is the recipe/profile key it is about."""

    severity: str  # "error" | "warning"
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_no_control_chars(value: object, where: str) -> None:
    """Reject newlines and control characters anywhere in a (nested) config value."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise UserError(f"contains a newline or control character: {value!r}; use a single-line value", where)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_no_control_chars(str(k), f"{where}.{k}")
            check_no_control_chars(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_no_control_chars(v, f"{where}[{i}]")
