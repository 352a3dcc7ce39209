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


# What a job imports of moe-launch (not the launcher's templates and shipped profiles, nor the recipes).
CODE_PACKAGES = ("launcher", "model", "trainer", "nemo_backend", "export", "generation", "evaluation", "dataprep")


def code_snapshot() -> dict[str, str]:
    """moe-launch's job-side code as run-directory files ``code/<package>/...``: a container job mounts the run
    directory and puts ``RUN_DIR/code`` first on PYTHONPATH, so it runs the code that planned it, whatever the
    image holds (as NeMo-Run's packagers do; ``code/SOURCE.json``: the version and git state it came from)."""
    import json

    from launcher import paths

    root = paths.PACKAGE_DIR.parent
    files = {f"code/{f.relative_to(root).as_posix()}": f.read_text(encoding="utf-8")
             for pkg in CODE_PACKAGES for f in sorted((root / pkg).rglob("*.py")) if "__pycache__" not in f.parts}
    source = {"moe-launch": launcher.__version__, "path": str(root), "git": git_state(root)}
    files["code/SOURCE.json"] = json.dumps(source, indent=2) + "\n"
    return files


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
