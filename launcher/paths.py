"""Where shipped data lives, for editable and wheel installs alike.

A wheel carries ``templates/`` and ``clusters/`` inside the package as ``launcher/_data/``; a source
checkout (or editable install) has them at the repository root next to ``launcher/``.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The shipped ``templates``, ``clusters`` or ``examples`` directory."""
    for candidate in (PACKAGE_DIR / "_data" / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"moe-launch data directory {name!r} not found next to {PACKAGE_DIR}; reinstall moe-launch")


def recipes_dir() -> Path:
    """The shipped recipes (the ``recipes`` package, installed next to ``launcher``)."""
    return PACKAGE_DIR.parent / "recipes"
