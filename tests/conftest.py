import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_search_path(monkeypatch, tmp_path_factory):
    """Tests see only the shipped cluster profiles, whatever the machine's user config holds."""
    monkeypatch.delenv("MOE_LAUNCH_CLUSTERS", raising=False)
    monkeypatch.delenv("MOE_LAUNCH_RUNS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))


def run_launch(*args, cwd=None, env=None, timeout=60):
    """Run the real `launch` command in a subprocess (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
