"""Where a launch came from: command line, versions, git state of the recipe's repository."""

from __future__ import annotations

import datetime as dt
import getpass
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jinja2
import yaml

import launcher


def git_state(path: Path) -> dict:
    """Commit and dirty flag of the git work tree holding ``path`` (empty if none)."""
    try:
        out = subprocess.run(["git", "-C", str(path.parent if path.is_file() else path), "status", "--porcelain=v2", "--branch"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    lines = out.stdout.splitlines()
    commit = next((ln.split()[2] for ln in lines if ln.startswith("# branch.oid")), None)
    return {"commit": None if commit == "(initial)" else commit, "dirty": any(not ln.startswith("#") for ln in lines)}


def metadata(argv: list[str], recipe_path: Path, dry_run: bool) -> dict:
    return {
        "command": shlex.join(["launch", *argv]),
        "cwd": os.getcwd(),
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "user": getpass.getuser(),
        "host": os.uname().nodename,  # socket.gethostname() without importing socket
        "dry_run": dry_run,
        "recipe_file": str(recipe_path.resolve()),
        "git": git_state(recipe_path.resolve()),
        "versions": {"moe-launch": launcher.__version__, "python": sys.version.split()[0],
                     "pyyaml": yaml.__version__, "jinja2": jinja2.__version__},
    }
